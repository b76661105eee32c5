"""Kernel-level options for a Z-Image step, timed on one GPU in one run: fused vs separate q/k/v
and w1/w3 GEMMs at a 1024x1024 step's shapes, SDPA backends at its attention shape, and the fp8
dequantisation of a streamed block compiled with dynamic vs static shapes.

    python bench/kernel_options.py        # env: OUT (results folder)
Without a GPU it runs a smoke test of itself at tiny sizes on the CPU.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float32
OUT = os.environ.get("OUT", "/tmp")
R: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (smoke test)", "torch": torch.__version__}


def timed(fn, reps=20 if CUDA else 2) -> float:
    """Median milliseconds of `fn` after two warm-up calls."""
    fn()
    fn()
    ts = []
    for _ in range(reps):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 3)


def save():
    with open(os.path.join(OUT, "kernel_options.json"), "w") as f:
        json.dump(R, f, indent=1)


def gemms():
    tokens, dim, hidden = (4128, 3840, 10240) if CUDA else (64, 96, 256)
    x = torch.randn(tokens, dim, device=DEV, dtype=DT)
    q, k, v = (torch.randn(dim, dim, device=DEV, dtype=DT) * 0.02 for _ in range(3))
    w1, w3 = (torch.randn(hidden, dim, device=DEV, dtype=DT) * 0.02 for _ in range(2))
    w2 = torch.randn(dim, hidden, device=DEV, dtype=DT) * 0.02
    qkv, w13 = torch.cat([q, k, v]), torch.cat([w1, w3])
    h = torch.randn(tokens, hidden, device=DEV, dtype=DT)
    r = {"qkv_separate_ms": timed(lambda: (F.linear(x, q), F.linear(x, k), F.linear(x, v))),
         "qkv_fused_ms": timed(lambda: F.linear(x, qkv)),
         "out_ms": timed(lambda: F.linear(x, q)),
         "w1_w3_separate_ms": timed(lambda: (F.linear(x, w1), F.linear(x, w3))),
         "w1_w3_fused_ms": timed(lambda: F.linear(x, w13)),
         "w2_ms": timed(lambda: F.linear(h, w2))}
    flops = 2 * tokens * dim * (4 * dim + 3 * hidden)
    sep = r["qkv_separate_ms"] + r["out_ms"] + r["w1_w3_separate_ms"] + r["w2_ms"]
    fused = r["qkv_fused_ms"] + r["out_ms"] + r["w1_w3_fused_ms"] + r["w2_ms"]
    r.update({"block_separate_ms": round(sep, 3), "block_fused_ms": round(fused, 3),
              "block_separate_TFLOPS": round(flops / sep / 1e9, 1),
              "block_fused_TFLOPS": round(flops / fused / 1e9, 1)})
    R["gemms"] = r
    print("gemms", r, flush=True)


def attention():
    heads, tokens, hd = (30, 4128, 128) if CUDA else (2, 64, 32)
    q, k, v = (torch.randn(1, heads, tokens, hd, device=DEV, dtype=DT) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    r = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        if name == "math" and CUDA:
            continue
        try:
            with sdpa_kernel(be):
                r[name + "_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as e:
            r[name + "_ms"] = repr(e)[:120]
    R["attention"] = r
    print("attention", r, flush=True)


def dequantize():
    """One layer block's fp8 weights (per-row scales) to bf16, as the streamer does for fp8-stored
    blocks: the compiled kernel with dynamic shapes (one graph for all blocks) vs static shapes."""
    from loaders.fp8_matmul import _dequantize, fp8_quantize
    from loaders.gpu_kernels import Fused

    dim, hidden = (3840, 10240) if CUDA else (96, 256)
    shapes = [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim), (4 * dim, 256 if CUDA else 32)]
    w8s, scales = zip(*(fp8_quantize(torch.randn(s, device=DEV, dtype=DT)) for s in shapes))
    outs = [torch.empty(s, device=DEV, dtype=DT) for s in shapes]
    nbytes = sum(w.numel() * 3 for w in w8s)  # fp8 read, bf16 written
    r = {}
    for label, fn in (("eager", _dequantize), ("compiled_dynamic", Fused(_dequantize, dynamic=True)),
                      ("compiled_static", Fused(_dequantize, dynamic=False))):
        ms = timed(lambda: fn(list(w8s), list(scales), outs))
        r[label] = {"ms_per_block": ms, "GBps": round(nbytes / ms / 1e6, 1)}
    R["dequantize"] = r
    print("dequantize", r, flush=True)


def main():
    for part in (gemms, attention, dequantize):
        try:
            part()
        except Exception as e:  # noqa: BLE001
            R[part.__name__ + "_error"] = repr(e)[:500]
            print(part.__name__, "FAILED", repr(e)[:500], flush=True)
        save()


if __name__ == "__main__":
    main()
