"""Two GPUs against one: seconds per 1024x1024 image (9 steps, new seed, cached conditioning) and
each GPU's peak, for one GPU with an 8 GiB budget (streaming), two GPUs with 12 GiB each (the
transformer split, the text encoder on the second, no streaming) and two GPUs with 8 GiB each
(split plus streaming); the split runs' output against the one-GPU output, same seed.
Full-size random weights; each budget caps PyTorch's allocator on its GPU (budget minus the
CUDA context), so a plan that under-counts fails.

    python bench/multi_gpu.py        # env: OUT, WORK, TOKENIZER (see full_size_files.py)
"""
from __future__ import annotations

import gc
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from full_size_files import OUT, TOKENIZER, WORK, write  # noqa: E402  (also puts the repo on sys.path)
from smi_peak import SmiPeak  # noqa: E402

from loaders.generation import decode, denoise  # noqa: E402
from loaders.pipeline_loading import load_parts  # noqa: E402
from loaders.placement import GiB  # noqa: E402

STEPS, RES = 9, 1024
N = torch.cuda.device_count()
R: dict = {"gpus": [torch.cuda.get_device_name(i) for i in range(N)], "torch": torch.__version__, "runs": {}}


def save():
    with open(os.path.join(OUT, "multi_gpu.json"), "w") as f:
        json.dump(R, f, indent=1)


def sync():
    for i in range(N):
        torch.cuda.synchronize(i)


def context_bytes() -> list[int]:
    out = []
    for i in range(N):
        with torch.cuda.device(i):
            (torch.ones(256, 256, device=i, dtype=torch.bfloat16) @ torch.ones(256, 256, device=i,
                                                                             dtype=torch.bfloat16)).sum().item()
            free, total = torch.cuda.mem_get_info(i)
            out.append(total - free - torch.cuda.memory_reserved(i))
    return out


def run(paths, label, devices, budgets, ctx, storage="bf16"):
    for i in range(N):
        torch.cuda.set_per_process_memory_fraction(1.0, i)
    for d, b in zip(devices, budgets):
        if b <= 0:  # automatic: no cap
            continue
        i = torch.device(d).index
        total = torch.cuda.get_device_properties(i).total_memory
        torch.cuda.set_per_process_memory_fraction((b * GiB - ctx[i]) / total, i)
    parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], budgets[0],
                       device=devices[0], comfy_tokenizer=TOKENIZER, devices=devices, vram_budgets_gb=budgets,
                       storage=storage)
    res = {"devices": devices, "budgets_gb": budgets, "storage": storage}
    try:
        latent = torch.zeros(1, 16, RES // 8, RES // 8)
        for i in range(N):
            torch.cuda.reset_peak_memory_stats(i)
        with SmiPeak() as smi:
            pos = parts.text_encoder.encode("a red fox in the snow, photograph, 35mm")
            denoise(parts, pos, None, latent, seed=0, steps=STEPS)  # warm-up: GPU copies, pinned host copies
            ts, den, out0 = [], [], None
            for s in (1, 2, 3):
                sync()
                t0 = time.perf_counter()
                out, rep = denoise(parts, pos, None, latent, seed=s, steps=STEPS)
                sync()
                t1 = time.perf_counter()
                img = decode(parts.vae, out)
                sync()
                ts.append(time.perf_counter() - t0)
                den.append(t1 - t0)
                if s == 1:
                    out0 = (out, img)
        h = parts.transformer
        res.update({"plan": parts.runtime.plan.summary(), "s_per_image": round(statistics.median(ts), 3),
                    "s_per_step": round(statistics.median(den) / STEPS, 4),
                    "streamed_GB_per_step": round(parts.runtime.plan.streamed_bytes_per_step / 1e9, 2),
                    "hops_last_run": h.last_hops.hops if h.last_hops else 0,
                    "peak_reserved_GiB_per_gpu": [round(torch.cuda.max_memory_reserved(i) / GiB, 2) for i in range(N)],
                    "peak_incl_context_GiB_per_gpu": [round((torch.cuda.max_memory_reserved(i) + ctx[i]) / GiB, 2)
                                                      for i in range(N)],
                    "nvidia_smi_peak_GiB_per_gpu": [smi.gib(i) for i in range(N)]})
    finally:
        parts.release()
        del parts
        gc.collect()
        torch.cuda.empty_cache()
    R["runs"][label] = res
    print(label, json.dumps(res), flush=True)
    save()
    return out0


def main():
    paths = write(WORK)
    ctx = context_bytes()
    R["cuda_context_GiB"] = [round(c / GiB, 2) for c in ctx]
    configs = [("one_gpu_8GiB", ["cuda:0"], [8.0], "bf16"),
               ("two_gpus_12GiB_each", ["cuda:0", "cuda:1"], [12.0, 12.0], "bf16"),
               ("two_gpus_8GiB_each", ["cuda:0", "cuda:1"], [8.0, 8.0], "bf16"),
               # fp8 blocks dequantised on the second GPU too (Triton launches on the tensors' GPU)
               ("two_gpus_6GiB_each_fp8", ["cuda:0", "cuda:1"], [6.0, 6.0], "fp8"),
               ("one_gpu_unlimited", ["cuda:0"], [0.0], "bf16")]
    outs = {}
    for label, devs, budgets, storage in configs:
        if len(devs) > N:
            R["runs"][label] = {"skipped": f"needs {len(devs)} GPUs, this machine has {N}"}
            continue
        try:
            outs[label] = run(paths, label, devs, budgets, ctx, storage)
        except Exception as e:
            R["runs"][label] = {"error": repr(e)[:500]}
            print(label, "FAILED", repr(e)[:500], flush=True)
            save()
    ref = outs.get("one_gpu_8GiB")
    for label, o in outs.items():
        if ref is not None and label != "one_gpu_8GiB":
            R["runs"][label]["latent_bitwise_equal_to_one_gpu"] = bool(torch.equal(o[0], ref[0]))
            R["runs"][label]["latent_max_abs_diff_vs_one_gpu"] = float((o[0] - ref[0]).abs().max())
            mse = torch.mean((o[1].float() - ref[1].float()) ** 2).item()
            R["runs"][label]["image_psnr_vs_one_gpu_dB"] = round(10 * math.log10(1 / mse), 2) if mse else float("inf")
    base = R["runs"].get("one_gpu_8GiB", {}).get("s_per_image")
    print(f"\nGPUs: {R['gpus']}  torch {R['torch']}")
    for label, r in R["runs"].items():
        a = r.get("s_per_image")
        print(f"{label:24s} s/img {a or float('nan'):6.3f}  ratio {(a / base) if a and base else float('nan'):5.2f}  "
              f"peak/GPU incl. context {r.get('peak_incl_context_GiB_per_gpu')}  "
              f"smi {r.get('nvidia_smi_peak_GiB_per_gpu')}  equal {r.get('latent_bitwise_equal_to_one_gpu')}  "
              f"PSNR {r.get('image_psnr_vs_one_gpu_dB')}"
              + (f"  ERROR {r['error'][:100]}" if "error" in r else ""))
    save()


if __name__ == "__main__":
    main()
