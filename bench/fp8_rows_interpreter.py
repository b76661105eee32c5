"""The fp8-row kernels (loaders/fp8_rows.py, the fp8 paths of modulation.py and silu_gate.py) in
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

from loaders import fp8_rows, modulation, silu_gate  # noqa: E402

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
    results.append(check("silu_mul rows", silu_gate._run_rows(a, b), silu_gate._run(a, b)))
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
