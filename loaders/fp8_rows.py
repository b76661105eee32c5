"""Activations quantised to fp8 rows in the same GPU pass that makes them.

fp8 matmuls (fp8_matmul.Fp8Linear) multiply float8_e4m3fn activations that carry one float32 scale
per row (token). Quantising a bf16 activation in eager PyTorch takes five kernels and three reads of
it, and q, k and v (w1 and w3) each quantise the same input again: an eager fp8 step on an H100 took
0.119 s against 0.073 compiled (bench/NOTES.md, session 8). Here a Triton program per row writes the
fp8 row and its scale once, right where the row is made: after the modulated RMSNorm before the
attention and the feed-forward (`modulation.norm_scale(..., fp8=True)`), after the SiLU gate before
w2 (`silu_gate.silu_mul(..., fp8=True)`), or from any bf16 activation up to 4096 wide (`quantize`,
for the attention's output). The result, an `Fp8Rows`, goes to every linear that takes that input
as it is: an eager fp8 step then took 0.067 s (session 10).

The scale is `max(|row|) * (1/448)`, at least 1e-12, and each value is divided by it and rounded to
the nearest fp8 value: the arithmetic of Fp8Linear's own PyTorch path, so the two agree.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .gpu_kernels import Guarded

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest normal float8_e4m3fn
MIN_SCALE = 1e-12
_WARPS = 8


class Fp8Rows(NamedTuple):
    """An activation [..., dim] as float8_e4m3fn values `q` and float32 `scale` [rows, 1]; `dtype`:
    the activation's own dtype, which the products come out in. (A named tuple: torch.compile
    traces it.)"""
    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.q.shape


def row_scales(amax: torch.Tensor) -> torch.Tensor:
    """Per-row scales from per-row float32 absolute maxima (PyTorch's path)."""
    return (amax * (1.0 / FP8_MAX)).clamp(min=MIN_SCALE)


def quantize_torch(x2: torch.Tensor) -> Fp8Rows:
    """`x2` [rows, dim] to fp8 rows with PyTorch's operations (CPU, under torch.compile, no Triton)."""
    scale = row_scales(x2.abs().amax(dim=1, keepdim=True).float())
    return Fp8Rows((x2.float() / scale).to(FP8), scale, x2.dtype)


if triton is not None:
    @triton.jit
    def scale_of(amax):
        """A row's scale from its absolute maximum (float32): `row_scales` in a kernel (a jit
        function cannot read FP8_MAX and MIN_SCALE, so they are written out)."""
        return tl.maximum(amax * (1.0 / 448.0), 1e-12)

    @triton.jit
    def store_row(y, m, q_ptr, s_ptr, row, at):
        """Row `y` (float32, `m`: the columns that exist) as fp8 values at q_ptr + at, its scale at
        s_ptr + row."""
        s = scale_of(tl.max(tl.where(m, tl.abs(y), 0.0), axis=0))
        tl.store(s_ptr + row, s)
        tl.store(q_ptr + at, tl.math.div_rn(y, s).to(q_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _rows(x_ptr, q_ptr, s_ptr, D: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        d = tl.arange(0, BLOCK)
        m = d < D
        y = tl.load(x_ptr + row * D + d, mask=m, other=0.0).to(tl.float32)
        store_row(y, m, q_ptr, s_ptr, row, row * D + d)


def _fits(x: torch.Tensor) -> bool:
    """Whether `_rows` takes x: contiguous on a GPU, eagerly, rows of at most 4096 values (held in
    registers whole: a 10240-wide row so held ran at 0.78 TB/s, see silu_gate)."""
    return (triton is not None and x.is_cuda and x.is_contiguous() and 0 < x.shape[-1] <= 4096
            and not torch.compiler.is_compiling())


def empty_rows(x: torch.Tensor) -> Fp8Rows:
    """Room for `x`'s rows as fp8, on its device."""
    return Fp8Rows(torch.empty(x.shape, dtype=FP8, device=x.device),
                   torch.empty(x.numel() // x.shape[-1], 1, dtype=torch.float32, device=x.device), x.dtype)


def _run(x: torch.Tensor) -> Fp8Rows:
    out = empty_rows(x)
    dim = x.shape[-1]
    with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
        _rows[(x.numel() // dim,)](x, out.q, out.scale, D=dim, BLOCK=triton.next_power_of_2(dim), num_warps=_WARPS)
    return out


launch = Guarded(_run)


def quantize(x2: torch.Tensor) -> Fp8Rows:
    """`x2` [rows, dim] to fp8 rows: one kernel on a GPU, else PyTorch's operations."""
    if _fits(x2):
        out = launch(x2)
        if out is not None:
            return out
    return quantize_torch(x2)
