"""Where a decode's time goes beyond the VAE's own kernels, on full-size random weights at
1024x1024: the pack's decode (VAE copied in, decoded, image to the CPU, cache emptied) five times
in a row under the unlimited plan and under 16 GiB, the same with the cache left alone, and the
VAE module decoding on its own with its weights already on the GPU.

    python bench/decode_overhead.py      # env: OUT, WORK, TOKENIZER (as streaming_budgets.py)
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from full_size_files import OUT, TOKENIZER, WORK, write  # noqa: E402  (also puts the repo on sys.path)

from loaders import runtime  # noqa: E402
from loaders.generation import decode, denoise  # noqa: E402
from loaders.pipeline_loading import load_parts  # noqa: E402
from loaders.placement import plan_memory  # noqa: E402

R: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


def times(fn, n=5) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(round(time.perf_counter() - t, 4))
    return out


def main():
    paths = write(WORK)
    parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], 0, comfy_tokenizer=TOKENIZER)
    pos = parts.text_encoder.encode("a red fox in the snow")
    latent = torch.zeros(1, 16, 128, 128)
    rt = parts.runtime
    for budget in (0, 16):
        parts.release()
        rt.vram_budget_gb = budget
        rt.plan = plan_memory(rt.sizes, rt.device, budget, rt.ram_budget_gb, 1024, 1024, 1, "bf16")
        out, _ = denoise(parts, pos, None, latent, seed=0, steps=2)
        R[f"{budget}GiB_pack_decode_s"] = times(lambda: decode(parts.vae, out))
        keep = runtime.free_device_cache
        runtime.free_device_cache = lambda device, collect=False: None
        try:
            R[f"{budget}GiB_pack_decode_cache_kept_s"] = times(lambda: decode(parts.vae, out))
        finally:
            runtime.free_device_cache = keep
        torch.cuda.empty_cache()
        with parts.vae.on_device() as vae, torch.no_grad():
            z = out.to("cuda", torch.bfloat16)
            R[f"{budget}GiB_vae_module_only_s"] = times(lambda: vae.decode(z, return_dict=False)[0])
        print(json.dumps(R), flush=True)
    with open(os.path.join(OUT, "decode_overhead.json"), "w") as f:
        json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
