"""Which attention backend is fastest for Z-Image on this GPU, and how far each one's output is
from PyTorch's SDPA: seconds per step at 1024x1024, full-size random weights, everything resident.

    python bench/attention_backends.py      # env: OUT, WORK (weights folder), TOKENIZER
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from full_size_files import OUT, TOKENIZER, WORK, write  # noqa: E402  (also puts the repo on sys.path)

from loaders.attention import AttentionBackend, why_unavailable  # noqa: E402
from loaders.generation import denoise  # noqa: E402
from loaders.pipeline_loading import load_parts  # noqa: E402

STEPS, RES = 9, 1024


def main():
    paths = write(WORK)
    parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], 0, comfy_tokenizer=TOKENIZER)
    pos = parts.text_encoder.encode("a red fox in the snow")
    latent = torch.zeros(1, 16, RES // 8, RES // 8)
    R = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "backends": {}}
    ref = None
    for b in AttentionBackend:
        if b == AttentionBackend.AUTO:
            continue
        reason = why_unavailable(b, torch.device("cuda"))
        if reason:
            R["backends"][b.value] = {"unavailable": reason}
            continue
        try:
            denoise(parts, pos, None, latent, seed=0, steps=2, attention_backend=b.value)  # warm-up
            ts, out = [], None
            for s in (1, 2):
                torch.cuda.synchronize()
                t = time.perf_counter()
                o, rep = denoise(parts, pos, None, latent, seed=1, steps=STEPS, attention_backend=b.value)
                torch.cuda.synchronize()
                ts.append((time.perf_counter() - t) / STEPS)
                out = o
            r = {"s_per_step": round(statistics.median(ts), 4), "ran": rep.attention}
            if b == AttentionBackend.SDPA:
                ref = out
            elif ref is not None:
                r["max_abs_diff_vs_sdpa"] = round((out - ref).abs().max().item(), 5)
                r["rel_l2_vs_sdpa"] = round(((out - ref).norm() / ref.norm()).item(), 6)
            R["backends"][b.value] = r
        except Exception as e:
            R["backends"][b.value] = {"error": repr(e)[:300]}
        print(b.value, R["backends"][b.value], flush=True)
        with open(os.path.join(OUT, "attention_backends.json"), "w") as f:
            json.dump(R, f, indent=1)
    print(f"\nGPU: {R['gpu']}")
    for k, v in R["backends"].items():
        print(f"{k:16s} {v}")


if __name__ == "__main__":
    main()
