"""Full-VRAM speed: seconds per 1024x1024 image (9 steps, new seed, cached conditioning) for each
attention backend x compiled blocks x fp8 matmul combination, beside diffusers' best mode
(everything on the GPU, `compile_repeated_blocks`), in one run on one GPU with full-size random
weights; the quality cost of fp8 (PSNR, cosine of the image vs bf16, same seed); compiling on a
new resolution; VAE decode time and peak at 1024² and 2048²; compiled blocks with streaming.

    python bench/speed.py            # env: OUT (results folder), WORK (weights), TOKENIZER,
                                     # CONFIGS=label,label (a subset), PROFILE=compiled_bf16,compiled_fp8
                                     # (kernel tables), PARTS=resolutions,decodes,run_diffusers,
                                     # PLAIN_KERNELS=silu_gate,norm_rope (eager and compiled
                                     # bf16 again without those modules' Triton kernels),
                                     # BLAS_AB=1 (eager bf16 again with cuBLASLt preferred)
Each timed run also records nvidia-smi's SM clock and power, and how often the power cap slowed it.
Without a GPU it runs a smoke test of itself on tiny random models (64x64, CPU).
"""
from __future__ import annotations

import gc
import importlib
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from full_size_files import OUT, TOKENIZER, WORK, write  # noqa: E402  (also puts the repo on sys.path)
from smi_clocks import SmiClocks  # noqa: E402

from loaders.component_loading import use_diffusers_forwards  # noqa: E402
from loaders.generation import decode, denoise  # noqa: E402
from loaders.group_norm import use_plain_group_norms  # noqa: E402
from loaders.pipeline_loading import load_parts  # noqa: E402
from loaders.placement import GiB, Matmul, plan_memory  # noqa: E402

CUDA = torch.cuda.is_available()
STEPS, RES = (9, 1024) if CUDA else (2, 64)
R: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (smoke test)", "torch": torch.__version__,
           "steps": STEPS, "res": RES, "runs": {}, "decode": {}, "resolutions": {}}


def log(k, v):
    R[k] = v
    print(k, v, flush=True)


def save():
    with open(os.path.join(OUT, "speed.json"), "w") as f:
        json.dump(R, f, indent=1)


def sync():
    if CUDA:
        torch.cuda.synchronize()


def peak_reserved() -> int:
    return torch.cuda.max_memory_reserved() if CUDA else 0


def psnr(a, b):
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


FULL_BUDGET_GB: list[float] = []  # the automatic budget, as resolved at load (before we hold memory)


def configure(parts, budget_gb: float, matmul: str):
    """Budget (0 = the automatic one of the load) and matmul for the next runs; the transformer's
    GPU copy is rebuilt for the new plan on its next run."""
    rt = parts.runtime
    rt.vram_budget_gb = budget_gb or FULL_BUDGET_GB[0]
    rt.matmul = Matmul(matmul)
    rt.plan = plan_memory(rt.sizes, rt.device, rt.vram_budget_gb, rt.ram_budget_gb, RES, RES, 1, rt.storage,
                          matmul=rt.matmul)


def run_pack(parts, pos, label, attention="sdpa", compile_blocks=False, matmul="bf16", budget_gb=0.0, images=3):
    configure(parts, budget_gb, matmul)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    latent = torch.zeros(1, 16, RES // 8, RES // 8)
    kw = dict(steps=STEPS, attention_backend=attention, compile_blocks=compile_blocks)
    sync()
    t0 = time.perf_counter()
    _, first = denoise(parts, pos, None, latent, seed=0, **kw)  # warm-up: replica, pinned copies, compile
    sync()
    res = {"attention": attention, "compiled": compile_blocks, "matmul": matmul, "budget_gb": budget_gb,
           "plan": parts.runtime.plan.summary(), "first_image_denoise_s": round(time.perf_counter() - t0, 2),
           "graphs_compiled_first_run": first.compile_graphs, "first_step_s": round(first.first_step_s, 2)}
    t_img, t_den, sample = [], [], None
    with SmiClocks() as clocks:
        for s in range(1, images + 1):
            sync()
            t0 = time.perf_counter()
            out, rep = denoise(parts, pos, None, latent, seed=s, **kw)
            sync()
            t1 = time.perf_counter()
            img = decode(parts.vae, out)
            sync()
            t_img.append(time.perf_counter() - t0)
            t_den.append(t1 - t0)
            if s == 1:
                sample = img
            res["graphs_compiled_later"] = res.get("graphs_compiled_later", 0) + rep.compile_graphs
    res["gpu_clocks"] = clocks.summary()
    res.update({"s_per_image": round(statistics.median(t_img), 3),
                "s_per_step": round(statistics.median(t_den) / STEPS, 4),
                "peak_reserved_GiB": round(peak_reserved() / GiB, 2)})
    R["runs"][label] = res
    print(label, json.dumps(res), flush=True)
    save()
    return sample


def profile(parts, pos, label, attention="sdpa"):
    """Where one image's GPU time goes (`label`: a config's, e.g. eager_cudnnfp8_fp8 with its
    attention backend), after a warm-up: the top kernels by CUDA time, to $OUT/profile_<label>.txt,
    and its trace to $OUT/trace_<label>.json.gz."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    compiled, matmul = label.startswith("compiled"), label.rsplit("_", 1)[1]
    configure(parts, 0, matmul)
    latent = torch.zeros(1, 16, RES // 8, RES // 8)
    kw = dict(steps=STEPS, compile_blocks=compiled, attention_backend=attention)
    out, _ = denoise(parts, pos, None, latent, seed=0, **kw)
    decode(parts.vae, out)
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with torch_profile(activities=acts) as prof:
        out, _ = denoise(parts, pos, None, latent, seed=1, **kw)
        sync()
        decode(parts.vae, out)
        sync()
    key = "cuda_time_total" if CUDA else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=45, max_name_column_width=90)
    with open(os.path.join(OUT, f"profile_{label}.txt"), "w") as f:
        f.write(table)
    print(table[:6000], flush=True)
    if CUDA:  # for bench/trace_gaps.py
        prof.export_chrome_trace(os.path.join(OUT, f"trace_{label}.json.gz"))


def resolutions(parts, pos):
    """Compiled blocks on new resolutions after 1024²: graphs compiled and the first step's time."""
    configure(parts, 0, "bf16")
    for h, w in ((768, 768), (1280, 768), (1536, 1536), (1024, 1024)) if CUDA else ((96, 96), (128, 64)):
        latent = torch.zeros(1, 16, h // 8, w // 8)
        sync()
        t0 = time.perf_counter()
        _, rep = denoise(parts, pos, None, latent, seed=1, steps=STEPS, compile_blocks=True)
        sync()
        R["resolutions"][f"{w}x{h}"] = {"graphs_compiled": rep.compile_graphs,
                                        "first_step_s": round(rep.first_step_s, 2),
                                        "denoise_s": round(time.perf_counter() - t0, 2)}
        print(f"{w}x{h}", R["resolutions"][f"{w}x{h}"], flush=True)
    save()


def decodes(parts, pos):
    configure(parts, 0, "bf16")
    for res in (1024, 2048) if CUDA else (64, 128):
        parts.runtime.plan_for(res, res, 1)
        out, _ = denoise(parts, pos, None, torch.zeros(1, 16, res // 8, res // 8), seed=1, steps=2)
        for tiled in (None, True):
            decode(parts.vae, out, tiled=tiled)  # warm-up
            ts = []
            base = torch.cuda.memory_allocated() if CUDA else 0
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            for _ in range(3):
                sync()
                t0 = time.perf_counter()
                img = decode(parts.vae, out, tiled=tiled)
                sync()
                ts.append(time.perf_counter() - t0)
            key = f"{res}x{res}_{'tiled' if tiled else 'as_planned'}"
            peak = torch.cuda.max_memory_allocated() if CUDA else 0
            R["decode"][key] = {"s": round(statistics.median(ts), 3),
                                "tiled": bool(tiled) or parts.runtime.plan.decode_plan(res, res, 1)[1],
                                "peak_above_before_GiB": round((peak - base) / GiB, 2),
                                "image_finite": bool(torch.isfinite(img).all()),
                                "image_mean": round(img.mean().item(), 4)}
            print(key, R["decode"][key], flush=True)
    save()


def run_diffusers(parts, pos):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    parts.release()
    gc.collect()
    dev = "cuda" if CUDA else "cpu"
    tr = parts.transformer.component.module.to(dev)
    use_diffusers_forwards(tr)  # diffusers as it ships, not with the pack's kernels and real RoPE
    vae = parts.vae.component.module.to(dev, parts.runtime.dtype)
    use_plain_group_norms(vae)
    pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
                          text_encoder=parts.text_encoder.component.module, tokenizer=parts.text_encoder.tokenizer,
                          transformer=tr)
    emb = [pos.to(dev, parts.runtime.dtype)]

    def gen(seed):
        return pipe(prompt_embeds=emb, height=RES, width=RES, num_inference_steps=STEPS, guidance_scale=0.0,
                    generator=torch.Generator(dev).manual_seed(seed), output_type="pt")

    for tag, compile_ in (("diffusers_all_on_gpu", False), ("diffusers_all_on_gpu_compile_repeated_blocks", True)):
        try:
            if compile_:
                tr.compile_repeated_blocks(fullgraph=True)
            sync()
            t0 = time.perf_counter()
            gen(0)
            sync()
            first = time.perf_counter() - t0
            ts = []
            for s in (1, 2, 3):
                sync()
                t0 = time.perf_counter()
                gen(s)
                sync()
                ts.append(time.perf_counter() - t0)
            R["runs"][tag] = {"s_per_image": round(statistics.median(ts), 3), "first_image_s": round(first, 2)}
        except Exception as e:
            R["runs"][tag] = {"error": repr(e)[:300]}
        print(tag, R["runs"][tag], flush=True)
        save()


def main():
    if CUDA:
        paths = write(WORK)
    else:
        from loaders.tiny_models import write_tiny_models

        paths = write_tiny_models(os.path.join(WORK, "tiny"), tokenizer_dir=TOKENIZER)
    t0 = time.perf_counter()
    parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], 0, comfy_tokenizer=TOKENIZER,
                       **({} if CUDA else {"device": "cpu", "dtype": torch.float32}))
    log("load_parts_s", round(time.perf_counter() - t0, 2))
    FULL_BUDGET_GB.append(parts.runtime.vram_budget_gb)
    pos = parts.text_encoder.encode("a red fox in the snow, photograph, 35mm")
    configs = [  # label, attention, compiled, matmul, budget
        ("eager_sdpa_bf16", "sdpa", False, "bf16", 0), ("eager_cudnn_bf16", "sdpa_cudnn", False, "bf16", 0),
        ("eager_sdpa_fp8", "sdpa", False, "fp8", 0), ("eager_cudnnfp8_fp8", "cudnn_fp8", False, "fp8", 0),
        ("eager_cudnnfp8_bf16", "cudnn_fp8", False, "bf16", 0),
        ("compiled_sdpa_bf16", "sdpa", True, "bf16", 0), ("compiled_cudnn_bf16", "sdpa_cudnn", True, "bf16", 0),
        ("compiled_sdpa_fp8", "sdpa", True, "fp8", 0),
        ("compiled_sdpa_bf16_8GiB", "sdpa", True, "bf16", 8),
        ("eager_sdpa_fp8_4GiB", "sdpa", False, "fp8", 4), ("compiled_sdpa_fp8_4GiB", "sdpa", True, "fp8", 4),
    ]
    attention_of = {c[0]: c[1] for c in configs}  # for PROFILE, whether or not CONFIGS runs the label
    wanted = {c for c in os.environ.get("CONFIGS", "").split(",") if c}
    configs = [c for c in configs if not wanted or c[0] in wanted]
    images = {}
    for label, att, comp, mm, budget in configs:
        try:
            images[label] = run_pack(parts, pos, label, att, comp, mm, budget)
        except Exception as e:
            R["runs"][label] = {"error": repr(e)[:500]}
            print(label, "FAILED", repr(e)[:500], flush=True)
            save()
    for name in [n for n in os.environ.get("PLAIN_KERNELS", "").split(",") if n]:
        kernels = importlib.import_module(f"loaders.{name}")
        kernels.launch.failed = True  # PyTorch's ops (compiled: inductor's) in place of this module's kernels
        for compiled in (False, True):
            label = f"{'compiled' if compiled else 'eager'}_sdpa_bf16_plain_{name}"
            images[label] = run_pack(parts, pos, label, compile_blocks=compiled)
        kernels.launch.failed = False
    if os.environ.get("BLAS_AB") == "1" and CUDA:
        # cuBLASLt's heuristics against cuBLAS's for the bf16 products (torch's default: cuBLAS)
        before = torch.backends.cuda.preferred_blas_library()
        torch.backends.cuda.preferred_blas_library("cublaslt")
        try:
            images["eager_sdpa_bf16_cublaslt"] = run_pack(parts, pos, "eager_sdpa_bf16_cublaslt")
        finally:
            torch.backends.cuda.preferred_blas_library(before)
    ref = images.get("eager_sdpa_bf16")
    for label, img in images.items():
        if ref is not None and img is not None and label != "eager_sdpa_bf16":
            R["runs"][label]["image_psnr_vs_eager_bf16_dB"] = round(psnr(img, ref), 2)
            R["runs"][label]["image_cosine_vs_eager_bf16"] = round(cosine(img, ref), 6)
            R["runs"][label]["image_bitwise_equal_eager_bf16"] = bool(torch.equal(img, ref))
    save()
    for label in [c for c in os.environ.get("PROFILE", "").split(",") if c]:
        profile(parts, pos, label, attention_of.get(label, "sdpa"))
    parts_wanted = os.environ.get("PARTS", "resolutions,decodes,run_diffusers").split(",")
    for fn in [f for f in (resolutions, decodes, run_diffusers) if f.__name__ in parts_wanted]:
        try:
            fn(parts, pos)
        except Exception as e:
            R[fn.__name__ + "_error"] = repr(e)[:500]
            print(fn.__name__, "FAILED", repr(e)[:500], flush=True)
    base = R["runs"].get("eager_sdpa_bf16", {}).get("s_per_image")
    print(f"\nGPU: {R['gpu']}  torch {R['torch']}")
    print(f"{'run':46s} {'s/img':>6s} {'s/step':>7s} {'ratio':>6s} {'PSNR':>6s} {'first':>6s}")
    for label, r in R["runs"].items():
        a = r.get("s_per_image")
        print(f"{label:46s} {a or float('nan'):6.3f} {r.get('s_per_step', float('nan')):7.4f} "
              f"{(a / base) if a and base else float('nan'):6.2f} "
              f"{r.get('image_psnr_vs_eager_bf16_dB', float('nan')):6.1f} "
              f"{r.get('first_image_denoise_s', r.get('first_image_s', float('nan'))):6.1f}"
              + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))
    save()


if __name__ == "__main__":
    main()
