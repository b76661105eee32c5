"""The fp8 kernels (loaders/fp8_rows.py, the fp8 paths of modulation.py, silu_gate.py and
norm_rope.py, fp8_attention's quantiser; and modulation's residual-then-norm kernel) in
Triton's interpreter on a CPU, against PyTorch: their scales, and their values before the cast to
fp8 (the interpreter's own fp8 rounding is not the GPU's; bench/fp8_kernels.py compares the fp8
bits on a GPU).

    PYTHONPATH=<a folder with triton> python3 bench/fp8_rows_interpreter.py
"""
from __future__ import annotations

import contextlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before Triton decorates the kernels

import torch  # noqa: E402

torch.cuda.device = lambda *_: contextlib.nullcontext()  # the launchers enter the tensors' device
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from loaders import fp8_attention, fp8_rows, modulation, norm_rope, silu_gate  # noqa: E402

_empty = fp8_rows.empty_rows


def float32_rows(x):
    """Room for the rows with float32 values: the kernels then store what they would cast."""
    r = _empty(x)
    return fp8_rows.Fp8Rows(torch.empty(r.q.shape, dtype=torch.float32), r.scale, r.dtype)


def check(name, got, bf16):
    x2 = bf16.reshape(-1, bf16.shape[-1])
    scale = fp8_rows.row_scales(x2.abs().amax(dim=1, keepdim=True).float())
    ok = torch.equal(got.scale, scale) and torch.equal(got.q.reshape(x2.shape), x2.float() / scale)
    print(f"{name}: scales and values {'equal' if ok else 'DIFFER'}", flush=True)
    return ok


def main():
    fp8_rows.empty_rows = float32_rows
    torch.manual_seed(0)
    results = []
    for dim in (3840, 100):
        x = (torch.randn(32, dim) * 3).to(torch.bfloat16)
        x[3] = 0  # an all-zero row: the smallest scale
        results.append(check(f"quantize {dim}", fp8_rows._run(x), x))
    x = torch.randn(1, 16, 3840).to(torch.bfloat16)
    w = (1 + 0.1 * torch.randn(3840)).to(torch.bfloat16)
    raw = (0.2 * torch.randn(1, 1, 3840)).to(torch.bfloat16)
    results.append(check("norm_scale", modulation._run("norm_scale", x, (x, w, raw), raw, 1e-5, True, True),
                         modulation._run("norm_scale", x, (x, w, raw), raw, 1e-5, True, False)))
    a = torch.randn(2, 16, 10240).to(torch.bfloat16) * 2
    b = torch.randn(2, 16, 10240).to(torch.bfloat16)
    spent = a.clone()
    results.append(check("silu_mul rows", silu_gate._run_rows(spent, b), silu_gate._run(a, b)))
    left = torch.equal(spent, silu_gate._run(a, b))  # the rows kernel leaves the products in its first input
    print(f"silu_mul rows: products left in a {'equal' if left else 'DIFFER'}", flush=True)
    results.append(left)
    results.append(check_attention_inputs())
    results.append(check_residual_then_norm())
    sys.exit(0 if all(results) else 1)


def check_residual_then_norm():
    """The residual and the next norm in one kernel against the two kernels: the same bits, in bf16
    and (before the cast) in fp8 rows."""
    torch.manual_seed(1)
    x, y = (torch.randn(1, 16, 3840).to(torch.bfloat16) for _ in range(2))
    w, w1 = ((1 + 0.1 * torch.randn(3840)).to(torch.bfloat16) for _ in range(2))
    gate, raw = ((0.3 * torch.randn(1, 1, 3840)).to(torch.bfloat16) for _ in range(2))
    ok = True
    for fp8 in (False, True):
        x2 = modulation._run("gated_residual", x, (x, gate, y, w), gate, 1e-5)
        h = modulation._run("norm_scale", x2, (x2, w1, raw), raw, 1e-6, True, fp8)
        fx, fh = modulation._run("gated_residual_norm_scale", x, ((x, gate, y, w), (w1, raw, 1e-6)), gate, 1e-5,
                                 True, fp8)
        same = torch.equal(fx, x2) and (torch.equal(fh.q, h.q) and torch.equal(fh.scale, h.scale) if fp8
                                        else torch.equal(fh, h))
        ok = ok and same
    print(f"residual then norm: {'equal' if ok else 'DIFFER'}", flush=True)
    return ok


def check_attention_inputs():
    """fp8 attention's q/k (norm_rope's fp8 output: one scale from the weight's bound) and v (one
    scale from its maximum): scales and values before the cast, against the bf16 kernel and PyTorch."""
    b, s, h, d = 1, 24, 3, 128
    x = (torch.randn(b, s, h, d) * 2).to(torch.bfloat16)
    w = (1 + 0.3 * torch.randn(d)).to(torch.bfloat16)
    freqs = torch.view_as_real(torch.polar(torch.ones(b, s, d // 2), torch.randn(b, s, d // 2))).contiguous()
    bf16 = torch.empty_like(x)
    norm_rope._grid_launch(norm_rope._norm_rope, x, w, freqs, 1e-5, bf16)
    pre, descale = torch.empty(x.shape), torch.empty(1, 1, 1, 1)
    norm_rope._grid_launch(norm_rope._norm_rope, x, w, freqs, 1e-5, pre, descale=descale)
    bound = (d ** 0.5 * w.float().abs().max() / 448).reshape(1, 1, 1, 1)
    ok = torch.allclose(descale, bound, rtol=1e-6) and torch.equal(pre, (bf16.float() / descale).clamp(-448, 448))
    ok = ok and bool(bf16.float().abs().max() <= d ** 0.5 * w.float().abs().max() * (1 + 2 ** -7))
    v = (torch.randn(b, s, h, d) * 5).to(torch.bfloat16)
    amax = torch.linalg.vector_norm(v, ord=float("inf"))
    got, rows = torch.empty(v.shape), torch.empty(b * s, 1)
    vscale, inverse = torch.empty(1, 1, 1, 1), torch.empty(1, 1, 1, 1)
    fp8_attention._per_tensor[(triton.cdiv(v.numel(), 4096),)](v, amax, got, vscale, inverse, rows, v.numel(), b * s,
                                                               BLOCK=4096)
    want = (v.float().abs().max() / 448).reshape(1, 1, 1, 1)
    ok = ok and torch.equal(vscale, want) and torch.equal(got, (v.float() / want).clamp(-448, 448))
    ok = ok and torch.equal(inverse, 1.0 / want) and torch.equal(rows, want.reshape(1, 1).expand(b * s, 1))
    print(f"attention q/k/v: scales and values {'equal' if ok else 'DIFFER'}", flush=True)
    return ok


if __name__ == "__main__":
    main()
