"""Seconds per 1024x1024 image (9 steps) under VRAM budgets, for the pack's planner and streaming
engine, beside diffusers' memory modes, in one run on one GPU. Full-size random weights.

Each budget caps PyTorch's allocator at (budget - the CUDA context measured at start) with
torch.cuda.set_per_process_memory_fraction, so a plan that under-counts fails; nvidia-smi's
device-wide figure (this process is alone on the GPU) is sampled every 50 ms.

    python bench/streaming_budgets.py            # env: OUT (results folder), WORK (weights folder),
                                                 #      TOKENIZER (Qwen tokenizer folder), QUICK=1,
                                                 #      CONFIGS=label,label (a subset), DIFFUSERS=0,
                                                 #      PROFILE=label,label (kernel table and trace),
                                                 #      PLAIN_KERNELS=modulation,silu_gate (unlimited
                                                 #      again without those modules' kernels),
                                                 #      BUFFERS_AB=1, MOVEBACK_AB=1 (see main)
Cases: (a) a new seed with the prompt's conditioning cached (the usual ComfyUI case),
       (b) a new prompt each image.
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
from smi_peak import SmiPeak  # noqa: E402

from loaders.component_loading import use_diffusers_forwards  # noqa: E402
from loaders.generation import decode, denoise  # noqa: E402
from loaders.group_norm import use_plain_group_norms  # noqa: E402
from loaders.pipeline_loading import load_parts  # noqa: E402
from loaders.placement import GiB, Storage, plan_memory  # noqa: E402

QUICK = os.environ.get("QUICK") == "1"
STEPS, RES = 9, int(os.environ.get("RES", 1024))
R: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "steps": STEPS, "res": RES, "runs": {}}


def log(k, v):
    R[k] = v
    print(k, v, flush=True)


def save():
    with open(os.path.join(OUT, "streaming_budgets.json"), "w") as f:
        json.dump(R, f, indent=1)


def sync():
    torch.cuda.synchronize()


def h2d_rate(registered: bool = False) -> float:
    """Host-to-device bytes/s of a 1 GiB copy from PyTorch's pinned memory, or (registered) from
    page-locked memory as the pack makes it for streamed blocks (cudaHostRegister)."""
    if registered:
        from loaders.pinned_memory import _Owner, pinned_buffer

        owner = _Owner()  # the 1 GiB is unregistered and freed with it, at the end
        x = pinned_buffer(2**30, owner)
        x.fill_(1)
    else:
        x = torch.empty(2**30, dtype=torch.uint8, pin_memory=True)
    y = torch.empty_like(x, device="cuda")
    for _ in range(2):
        sync()
        t = time.perf_counter()
        y.copy_(x, non_blocking=True)
        sync()
        dt = time.perf_counter() - t
    del x, y
    return 2**30 / dt


def psnr(a, b):
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


PROMPTS = [f"a red fox in the snow, photograph {i}" for i in range(64)]


def run_pack(parts, label: str, budget_gb: float, storage: str, ctx: int, total: int, images: int = 3):
    rt = parts.runtime
    parts.release()
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 if budget_gb == 0 else (budget_gb * GiB - ctx) / total)
    rt.vram_budget_gb, rt.storage = budget_gb, Storage(storage)
    sizing_s = None
    if rt.storage == Storage.PACKED and not rt.sizes.transformer_blocks_packed:
        t0 = time.perf_counter()  # what a load with packed storage adds: every weight's exponents read once
        rt.sizes = rt.sizes.with_packed(parts.transformer.component.module, parts.text_encoder.component.module,
                                        rt.dtype, rt.device)
        torch.cuda.empty_cache()
        sizing_s = round(time.perf_counter() - t0, 2)
    rt.plan = plan_memory(rt.sizes, rt.device, budget_gb, rt.ram_budget_gb, RES, RES, 1, storage)
    plan = rt.plan
    res = {"budget_gb": budget_gb, "storage": storage, "plan": plan.summary(),
           "streamed_GB_per_step": round(plan.streamed_bytes_per_step / 1e9, 3),
           "resident_GB": round(plan.resident_bytes / 1e9, 3), "planned_peak_GiB": round(plan.peak_bytes / GiB, 2),
           "pinned_GB": round(plan.pinned_bytes / 1e9, 3)}
    if sizing_s is not None:
        res["packed_sizing_s"] = sizing_s
        res["packed_over_bf16_bytes"] = round(sum(rt.sizes.transformer_blocks_packed) / sum(
            b for _, b in rt.sizes.transformer_blocks), 4)
    print(f"--- {label}\n{plan.summary()}", flush=True)
    latent = torch.zeros(1, 16, RES // 8, RES // 8)
    parts.text_encoder._cache.clear()
    phase_peak = {"encode": 0, "denoise": 0, "decode": 0}
    phase_allocated = dict(phase_peak)  # beside reserved: what the planner's working-memory terms model

    def phase(name, fn, *a, **kw):
        torch.cuda.reset_peak_memory_stats()
        out = fn(*a, **kw)
        sync()
        phase_peak[name] = max(phase_peak[name], torch.cuda.max_memory_reserved())
        phase_allocated[name] = max(phase_allocated[name], torch.cuda.max_memory_allocated())
        return out

    torch.cuda.reset_peak_memory_stats()
    with SmiPeak() as smi:
        pos = phase("encode", parts.text_encoder.encode, PROMPTS[0])
        t0 = time.perf_counter()
        phase("denoise", denoise, parts, pos, None, latent, seed=0, steps=STEPS)  # warm-up: replica, pinned
        res["first_denoise_s"] = round(time.perf_counter() - t0, 2)  # with host copies built (packed: packing)
        t_img, t_den, t_dec, samples = [], [], [], None
        before = torch.cuda.memory_stats()
        with SmiClocks() as clocks:
            for s in range(1, images + 1):  # (a) new seed, cached conditioning
                sync()
                t0 = time.perf_counter()
                out, rep = phase("denoise", denoise, parts, pos, None, latent, seed=s, steps=STEPS)
                sync()
                t1 = time.perf_counter()
                img = phase("decode", decode, parts.vae, out)
                sync()
                t2 = time.perf_counter()
                t_img.append(t2 - t0)
                t_den.append(t1 - t0)
                t_dec.append(t2 - t1)
                if s == images:  # after blocks moved out for a decode came back: compared with unlimited
                    samples = (out, img)
        res["gpu_clocks"] = clocks.summary()
        after = torch.cuda.memory_stats()
        # The allocator frees its cache and synchronises the device when a request meets the cap
        # (a retry); device allocations/frees mean it did not settle into its cache.
        res["allocator_during_cached_images"] = {k: after.get(k, 0) - before.get(k, 0) for k in (
            "num_alloc_retries", "num_device_alloc", "num_device_free", "num_sync_all_streams", "num_ooms")}
        t_new = []
        for i in range(1, 3):  # (b) a new prompt each image
            sync()
            t0 = time.perf_counter()
            p = phase("encode", parts.text_encoder.encode, PROMPTS[(i + len(R["runs"]) * 2) % len(PROMPTS)])
            out, _ = denoise(parts, p, None, latent, seed=10 + i, steps=STEPS)
            decode(parts.vae, out)
            sync()
            t_new.append(time.perf_counter() - t0)
    res.update({"s_per_image_cached_prompt": round(statistics.median(t_img), 3),
                "s_per_image_new_prompt": round(statistics.median(t_new), 3),
                "s_per_step": round(statistics.median(t_den) / STEPS, 4),
                "decode_s": round(statistics.median(t_dec), 3),
                "peak_reserved_GiB_by_phase": {k: round(v / GiB, 2) for k, v in phase_peak.items()},
                "peak_allocated_GiB_by_phase": {k: round(v / GiB, 2) for k, v in phase_allocated.items()},
                "planned_GiB_by_phase": {k: round(v / GiB, 2) for k, v in plan.phases.items()},
                "peak_reserved_GiB": round(max(phase_peak.values()) / GiB, 2),
                "peak_process_GiB_incl_context": round((max(phase_peak.values()) + ctx) / GiB, 2),
                "nvidia_smi_peak_GiB": smi.gib(0)})
    R["runs"][label] = res
    print(json.dumps(res), flush=True)
    save()
    return samples


def profile(parts, label: str):
    """Where a streamed image's time goes, right after `label`'s run (same plan): the top kernels by
    GPU time over 9 steps to $OUT/profile_<label>.txt, and a 3-step trace (copy and compute
    streams side by side, chrome://tracing or Perfetto) to $OUT/trace_<label>.json.gz."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pos = parts.text_encoder.encode(PROMPTS[0])
    latent = torch.zeros(1, 16, RES // 8, RES // 8)
    acts = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with torch_profile(activities=acts) as prof:
        denoise(parts, pos, None, latent, seed=1, steps=STEPS)
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    with open(os.path.join(OUT, f"profile_{label}.txt"), "w") as f:
        f.write(table)
    print(table[:5000], flush=True)
    with torch_profile(activities=acts) as prof:
        denoise(parts, pos, None, latent, seed=1, steps=3)
        sync()
    prof.export_chrome_trace(os.path.join(OUT, f"trace_{label}.json.gz"))


def run_diffusers(parts, pos, ctx, total):
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    torch.cuda.set_per_process_memory_fraction(1.0)
    parts.release()
    tr = parts.transformer.component.module
    use_diffusers_forwards(tr)  # diffusers as it ships, not with the pack's kernels and real RoPE
    vae = parts.vae.component.module.to(torch.bfloat16)
    use_plain_group_norms(vae)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    pipe = ZImagePipeline(scheduler=sched, vae=vae, text_encoder=parts.text_encoder.component.module,
                          tokenizer=parts.text_encoder.tokenizer, transformer=tr)
    emb = [pos.to(torch.bfloat16)]
    sigmas = torch.linspace(1.0, 1 / STEPS, STEPS).tolist()

    def gen(seed):
        return pipe(prompt_embeds=[e.to("cuda") for e in emb], height=RES, width=RES, num_inference_steps=STEPS,
                    sigmas=sigmas, guidance_scale=0.0, generator=torch.Generator("cuda").manual_seed(seed),
                    output_type="pt")

    def measure(tag):
        gc.collect()
        torch.cuda.empty_cache()
        gen(0)
        torch.cuda.reset_peak_memory_stats()
        ts = []
        with SmiPeak() as smi:
            for s in (1, 2):
                sync()
                t = time.perf_counter()
                gen(s)
                sync()
                ts.append(time.perf_counter() - t)
        R["runs"][tag] = {"s_per_image_cached_prompt": round(min(ts), 3),
                          "peak_reserved_GiB": round(torch.cuda.max_memory_reserved() / GiB, 2),
                          "peak_process_GiB_incl_context": round((torch.cuda.max_memory_reserved() + ctx) / GiB, 2),
                          "nvidia_smi_peak_GiB": smi.gib(0)}
        print(tag, R["runs"][tag], flush=True)
        save()

    modes = ["all_on_gpu", "group_offload_block_stream"] if QUICK else \
        ["all_on_gpu", "model_cpu_offload", "group_offload_block_stream"]
    for mode in modes:
        try:
            if mode == "all_on_gpu":
                tr.to("cuda")
                vae.to("cuda")
                measure("diffusers_" + mode)
                tr.to("cpu")
            elif mode == "model_cpu_offload":
                pipe.enable_model_cpu_offload()
                measure("diffusers_" + mode)
                pipe.remove_all_hooks()
                for m in (tr, vae, pipe.text_encoder):
                    m.to("cpu")
            else:
                vae.to("cuda")
                tr.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                                        offload_type="block_level", num_blocks_per_group=1, use_stream=True)
                measure("diffusers_" + mode)
        except Exception as e:
            R["runs"]["diffusers_" + mode] = {"error": repr(e)[:300]}
            print(mode, "failed", repr(e)[:300], flush=True)
            save()


def rerun(parts, configs, suffix: str, ctx: int, total: int, outputs: dict) -> None:
    """`configs` again under `label + suffix` (same-run A/B rows), each compared bit for bit with its
    row without the suffix."""
    for base, budget, storage in configs:
        label = base + suffix
        try:
            outputs[label] = run_pack(parts, label, budget, storage, ctx, total)
            if outputs.get(base) is not None:
                R["runs"][label][f"latent_bitwise_equal_to_{base}"] = bool(torch.equal(outputs[label][0],
                                                                                       outputs[base][0]))
        except Exception as e:  # noqa: BLE001
            R["runs"][label] = {"error": repr(e)[:500]}
            print(label, "FAILED", repr(e)[:500], flush=True)


def main():
    log("h2d_pinned_GBps", round(h2d_rate() / 1e9, 1))
    log("h2d_registered_GBps", round(h2d_rate(registered=True) / 1e9, 1))
    paths = write(WORK)
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    # everything nvidia-smi counts beyond PyTorch's reserved memory; cuBLAS allocates its
    # workspace at the first matrix product, so make one first
    (torch.ones(256, 256, device="cuda", dtype=torch.bfloat16) @ torch.ones(256, 256, device="cuda",
                                                                        dtype=torch.bfloat16)).sum().item()
    free, total = torch.cuda.mem_get_info()
    ctx = total - free - torch.cuda.memory_reserved()
    log("cuda_context_GiB", round(ctx / GiB, 2))
    t0 = time.perf_counter()
    parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], 0, comfy_tokenizer=TOKENIZER)
    log("load_parts_s", round(time.perf_counter() - t0, 2))
    configs = [("unlimited_bf16", 0, "bf16"), ("16GiB_bf16", 16, "bf16"), ("12GiB_bf16", 12, "bf16"),
               ("8GiB_bf16", 8, "bf16"), ("6GiB_bf16", 6, "bf16"), ("4GiB_bf16", 4, "bf16"),
               ("8GiB_fp8", 8, "fp8"), ("6GiB_fp8", 6, "fp8"), ("4GiB_fp8", 4, "fp8"),
               ("8GiB_packed", 8, "packed"), ("6GiB_packed", 6, "packed"), ("4GiB_packed", 4, "packed")]
    if QUICK:
        configs = [c for c in configs if c[0] in ("unlimited_bf16", "8GiB_bf16", "4GiB_fp8")]
    wanted = {c for c in os.environ.get("CONFIGS", "").split(",") if c}  # e.g. CONFIGS=unlimited_bf16,4GiB_fp8
    configs = [c for c in configs if not wanted or c[0] in wanted]
    outputs = {}
    for label, budget, storage in configs:
        try:
            outputs[label] = run_pack(parts, label, budget, storage, ctx, total)
        except Exception as e:
            R["runs"][label] = {"error": repr(e)[:500]}
            print(label, "FAILED", repr(e)[:500], flush=True)
            save()
            continue
        if label in os.environ.get("PROFILE", "").split(","):
            try:
                profile(parts, label)
            except Exception as e:  # noqa: BLE001
                R["runs"][label]["profile_error"] = repr(e)[:500]
    for name in [n for n in os.environ.get("PLAIN_KERNELS", "").split(",") if n]:
        kernels = importlib.import_module(f"loaders.{name}")  # unlimited again without this module's
        kernels.launch.failed = True  # Triton kernels: PyTorch's ops in their place
        rerun(parts, [c for c in configs if c[1] == 0], f"_plain_{name}", ctx, total, outputs)
        kernels.launch.failed = False
    if os.environ.get("BUFFERS_AB") == "1":  # streamed rows again with the other pool size (planned for)
        from loaders import placement

        kept = dict(placement.N_BUFFERS)
        placement.N_BUFFERS.update({k: 5 - v for k, v in kept.items()})  # 2 <-> 3
        rerun(parts, [c for c in configs if c[1] in (12, 8, 6, 4)], "_other_buffers", ctx, total, outputs)
        placement.N_BUFFERS.update(kept)
    if os.environ.get("MOVEBACK_AB") == "1":  # rows with moved-out blocks again, their copies back
        from loaders.streaming import BlockStreamer  # all issued at once on a stream of their own

        def at_once(self, copies):
            side = torch.cuda.Stream()
            for _, c in copies:
                c.issue(side)
        interleave, BlockStreamer.interleave = BlockStreamer.interleave, at_once
        rerun(parts, [c for c in configs if c[1] in (12, 8, 6)], "_copies_back_at_once", ctx, total, outputs)
        BlockStreamer.interleave = interleave
    ref = outputs.get("unlimited_bf16")
    for label, o in outputs.items():
        if ref is None or o is None or label == "unlimited_bf16":
            continue
        r = R["runs"][label]
        r["latent_bitwise_equal_to_unlimited"] = bool(torch.equal(o[0], ref[0]))
        r["image_psnr_vs_unlimited_dB"] = round(psnr(o[1], ref[1]), 2)
        r["image_cosine_vs_unlimited"] = round(torch.nn.functional.cosine_similarity(
            o[1].flatten().double(), ref[1].flatten().double(), dim=0).item(), 6)
    rate = R["h2d_pinned_GBps"] * 1e9
    base = R["runs"].get("unlimited_bf16", {}).get("s_per_step")
    for label, r in R["runs"].items():
        if "s_per_step" in r and base:
            r["copy_bound_s_per_step"] = round(r["streamed_GB_per_step"] * 1e9 / rate, 4)
            r["target_s_per_step"] = round(1.05 * max(base, r["copy_bound_s_per_step"]), 4)
    save()
    pos = parts.text_encoder.encode(PROMPTS[0])
    if os.environ.get("DIFFUSERS", "1") == "1":
        run_diffusers(parts, pos, ctx, total)
    base_img = R["runs"].get("unlimited_bf16", {}).get("s_per_image_cached_prompt")
    print(f"\nGPU: {R['gpu']}   h2d pinned {R['h2d_pinned_GBps']} GB/s   context {R['cuda_context_GiB']} GiB")
    print(f"{'run':34s} {'s/img(a)':>8s} {'s/img(b)':>8s} {'s/step':>7s} {'target':>7s} {'ratio':>6s} "
          f"{'peakGiB':>7s} {'smiGiB':>7s}")
    for label, r in R["runs"].items():
        a = r.get("s_per_image_cached_prompt")
        print(f"{label:34s} {a or float('nan'):8.3f} {r.get('s_per_image_new_prompt', float('nan')):8.3f} "
              f"{r.get('s_per_step', float('nan')):7.4f} {r.get('target_s_per_step', float('nan')):7.4f} "
              f"{(a / base_img) if a and base_img else float('nan'):6.2f} "
              f"{r.get('peak_process_GiB_incl_context', float('nan')):7.2f} {r.get('nvidia_smi_peak_GiB', 0):7.2f}"
              + (f"  ERROR {r['error'][:80]}" if "error" in r else ""))
    save()


if __name__ == "__main__":
    main()
