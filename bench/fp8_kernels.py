"""fp8 activation rows and fp8 GEMMs at a 1024x1024 step's shapes, on one GPU: PyTorch's path
(the norm or gate, then the absolute maximum and the division) against loaders/fp8_rows.py's Triton
kernels that write the rows in the pass that makes them (GPU ms from CUDA-graph replays; whether
their fp8 bits agree), the gate's kernel at a few chunk sizes, and the fp8 GEMMs with and without
fast accumulation and with per-tensor scales; fp8 attention (`cudnn_fp8`) against bf16 SDPA.

    python bench/fp8_kernels.py        # env: OUT (results folder), PARTS=fp8_rows,attention
Without a GPU it runs a smoke test of itself at tiny sizes on the CPU. bench/fp8_rows_interpreter.py
checks the same kernels in Triton's interpreter on a CPU.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kernel_options import CUDA, DEV, DT, OUT, replayed_ms, seeded_norm, timed  # noqa: E402

R: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (smoke test)", "torch": torch.__version__}


def fp8_rows():
    """Activations quantised to fp8 rows (loaders/fp8_rows.py) at a step's shapes: PyTorch's path
    (the norm or gate, then amax and division) against the Triton kernels that write the rows in
    the pass that makes them, the gate's kernel at other chunk sizes, and the fp8 GEMMs (see the
    module's note)."""
    from loaders import fp8_rows as fr
    from loaders import modulation
    from loaders import silu_gate as sg

    dim, hidden, tokens = (3840, 10240, 4128) if CUDA else (64, 160, 48)
    norm = seeded_norm(dim)
    x = torch.randn(1, tokens, dim, device=DEV, dtype=DT)
    raw = (0.5 * torch.randn(1, 1, dim, device=DEV)).to(DT)
    a = torch.randn(1, tokens, hidden, device=DEV, dtype=DT) * 3
    b = torch.randn(1, tokens, hidden, device=DEV, dtype=DT)

    def torch_rows(t):
        return fr.quantize_torch(t.reshape(-1, t.shape[-1]))

    spent = a.clone()  # the gate's fp8 kernel writes its products over its first input: each call
    # (timed ones too) gets a fresh copy of `a`, whose copying time is then taken off. (Replays on
    # the products they leave behind grow them to inf and NaN, which the divisions run slowly on.)

    def fresh(run):
        def call():
            spent.copy_(a)
            return run()
        return call

    r: dict = {}
    with torch.no_grad():
        for name, plain, fused in (
                ("quantize", lambda: torch_rows(x), lambda: fr.quantize(x.reshape(-1, dim))),
                ("norm_scale", lambda: torch_rows(modulation.norm_scale(x, norm, raw, raw=True)),
                 lambda: modulation.norm_scale(x, norm, raw, raw=True, fp8=True)),
                ("silu_mul", lambda: torch_rows(sg.silu_mul(a, b)), fresh(lambda: sg.silu_mul(spent, b, fp8=True)))):
            want, got = plain(), fused()
            r[name] = {"plain_ms": replayed_ms(plain) if CUDA else timed(plain),
                       "kernel_ms": replayed_ms(fused) if CUDA else timed(fused), **_rows_differ(got, want)}
        copy_ms = replayed_ms(lambda: spent.copy_(a)) if CUDA else timed(lambda: spent.copy_(a))
        r["silu_mul"]["kernel_ms"] = round(r["silu_mul"]["kernel_ms"] - copy_ms, 4)
        r["silu_mul"]["copy_of_a_taken_off_ms"] = copy_ms
        if CUDA:
            for block, warps, again in ((2048, 8, True), (2048, 8, False), (4096, 8, False), (1024, 4, False),
                                        (2048, 4, False), (1024, 8, False)):
                fn = fresh(functools.partial(sg._run_rows, spent, b, block, warps, again))
                key = f"silu_mul_rows_{block}x{warps}" + ("_recomputed" if again else "")
                r[key] = {"ms": round(replayed_ms(fn) - copy_ms, 4),
                          **_rows_differ(fn(), torch_rows(sg.silu_mul(a, b)))}
                r[key]["a_holds_the_bf16_products"] = bool(torch.equal(spent, sg.silu_mul(a, b)))
            from loaders.fp8_matmul import fp8_quantize

            for k, n in ((dim, dim), (dim, hidden), (hidden, dim)):
                xq = fr.quantize(torch.randn(tokens, k, device=DEV, dtype=DT))
                wq, ws = fp8_quantize(torch.randn(n, k, device=DEV, dtype=DT) * 0.02)
                for fast in (False, True):
                    r[f"gemm_{k}x{n}_fast_accum_{fast}_ms"] = timed(lambda fast=fast: torch._scaled_mm(
                        xq.q, wq.t(), scale_a=xq.scale, scale_b=ws[None, :], out_dtype=DT, use_fast_accum=fast))
                one = torch.ones((), device=DEV)  # one scale per tensor: the other kernel family
                r[f"gemm_{k}x{n}_per_tensor_ms"] = timed(lambda: torch._scaled_mm(xq.q, wq.t(), scale_a=one,
                                                                                  scale_b=one, out_dtype=DT))
    R["fp8_rows"] = r
    print("fp8_rows", r, flush=True)


def attention():
    """fp8 attention (loaders/fp8_attention.py, the `cudnn_fp8` backend) against PyTorch's bf16
    SDPA at a step's shape: q/k normalised and rotated, v quantised, the attention; ms for each
    path, relative error of each against float32, and a batch of two with the second item padded
    (a padding mask) against that item alone."""
    import torch.nn.functional as F

    from loaders import fp8_attention as fa
    from loaders.real_rope import norm_rotate

    why = fa.why_unavailable(torch.device(DEV))
    if why:
        R["attention"] = {"unavailable": why}
        print("attention: unavailable:", why, flush=True)
        return
    r: dict = {}
    b, s, h, d = 1, 4128, 30, 128
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device=DEV, dtype=DT) * 2 for _ in range(3))
    nq, nk = seeded_norm(d), seeded_norm(d)
    ang = torch.randn(b, s, d // 2, device=DEV)
    freqs = torch.polar(torch.ones_like(ang), ang)
    heads_first = functools.partial(torch.Tensor.transpose, dim0=1, dim1=2)

    def bf16():
        qr, kr = norm_rotate(q, nq, freqs), norm_rotate(k, nk, freqs)
        return F.scaled_dot_product_attention(heads_first(qr), heads_first(kr), heads_first(v)).transpose(1, 2)

    def fp8(mask=None, q=q, k=k, v=v):
        f = freqs[:, :q.shape[1]].expand(q.shape[0], -1, -1).contiguous()
        return fa.attend(norm_rotate(q, nq, f, fp8=True), norm_rotate(k, nk, f, fp8=True), fa.quantize(v), mask)

    with torch.no_grad():
        qr, kr = norm_rotate(q, nq, freqs).float(), norm_rotate(k, nk, freqs).float()
        exact = F.scaled_dot_product_attention(heads_first(qr), heads_first(kr), heads_first(v.float())).transpose(1, 2)

        def err(o):
            return round(((o.float() - exact).norm() / exact.norm()).item(), 5)

        r["bf16_rel_error"] = err(bf16())
        r["fp8_rel_error"] = err(fa.dequantize(fp8()).reshape(b, s, h, d))
        r["bf16_ms"], r["fp8_ms"] = timed(bf16), timed(fp8)
        # two images, the second's last 512 tokens padding (masked): its rows against float32
        # attention over its own tokens, and (the control) against attention over all of them.
        # Random inputs: 512 more keys should move a row far more than fp8's ~6% (an estimate: ~35%).
        q2, k2, v2 = (torch.cat([t, t], dim=0) for t in (q, k, v))
        mask = torch.ones(2, s, dtype=torch.bool, device=DEV)
        mask[1, -512:] = False
        got = fa.dequantize(fp8(mask, q2, k2, v2)).reshape(2, s, h, d)[1, :-512].float()
        own = F.scaled_dot_product_attention(*(heads_first(t[:, :-512]) for t in (qr, kr, v.float())))
        own = own.transpose(1, 2)[0]
        r["masked_item_rel_error"] = round(((got - own).norm() / own.norm()).item(), 5)
        r["masked_item_vs_unmasked_rel_diff"] = round(((got - exact[0, :-512]).norm() / own.norm()).item(), 5)
        r["fp8_ms_batch2_masked"] = timed(lambda: fp8(mask, q2, k2, v2))
        r["graph_build_cached"] = len(fa._GRAPHS)
        r["attn_tflops_bf16"] = round(4 * s * s * h * d / r["bf16_ms"] / 1e9, 1)
        r["attn_tflops_fp8"] = round(4 * s * s * h * d / r["fp8_ms"] / 1e9, 1)
    R["attention"] = r
    print("attention", r, flush=True)


def _rows_differ(got, want) -> dict:
    """How far fp8 rows `got` are from `want`: whether all bits agree, else how many values and
    scales differ."""
    from loaders.fp8_rows import Fp8Rows

    if not isinstance(got, Fp8Rows):
        return {"same_bits": False, "not_fp8_rows": True}
    q = got.q.reshape(want.q.shape).view(torch.uint8) != want.q.view(torch.uint8)
    s = got.scale != want.scale
    return {"same_bits": not bool(q.any() or s.any()), "values_differing": int(q.sum()),
            "scales_differing": int(s.sum())}


def main():
    wanted = os.environ.get("PARTS", "fp8_rows,attention").split(",")
    for part in (fp8_rows, attention):
        if part.__name__ in wanted:
            part()
    with open(os.path.join(OUT, "fp8_kernels.json"), "w") as f:
        json.dump(R, f, indent=1)


if __name__ == "__main__":
    main()
