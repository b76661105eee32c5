"""The feed-forward's gate, `silu(w1 x) * w3 x`, in one GPU pass, eagerly.

Eagerly PyTorch runs it as two kernels over [tokens, 10240] activations: the SiLU writes its
result and the product reads it back, 0.43 GB moved at a 1024x1024 step where one pass moves
0.26 (an H100 profile: 4.8 ms a step for the two). Here one Triton program per chunk reads both
inputs once and writes the product, with the eager ops' arithmetic and roundings: SiLU in float32
with CUDA's own `expf` and IEEE division, rounded to the activations' dtype, then the product in
float32, rounded again. On a GPU it gives eager's bits.

Before an fp8 w2 (fp8_matmul), a row at a time: the product rounded as above, then written as an
fp8 row and its scale (fp8_rows), which w2 takes as it is. That kernel keeps the products in
w1's output between its two passes (its values are spent by then), so it computes each once.

`use_fused_gate` gives Z-Image's feed-forward modules a forward that calls it on GPUs, eagerly;
under torch.compile (which fuses the two itself), on a CPU, without Triton, or once a launch
failed, the two PyTorch ops run.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from . import fp8_rows
from .class_swap import ClassSwap
from .fp8_matmul import take_fp8_rows
from .fp8_rows import Fp8Rows
from .gpu_kernels import Guarded

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_BLOCK, _WARPS = 4096, 8
_CUDA_EXP = os.environ.get("TRITON_INTERPRET", "0") in ("", "0")

if triton is not None:
    @triton.jit
    def _gate(a_ptr, b_ptr, i, m, dt, CUDA_EXP: tl.constexpr):
        """silu(a) * b at offsets i, rounded to `dt` as eager rounds it, in float32."""
        a = tl.load(a_ptr + i, mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + i, mask=m, other=0.0).to(tl.float32)
        if CUDA_EXP:  # CUDA's expf, as PyTorch's SiLU calls it (tl.exp is a faster approximation)
            e = libdevice.exp(-a)
        else:  # Triton's interpreter (tests on CPUs) has no libdevice
            e = tl.exp(-a)
        s = tl.math.div_rn(a, 1.0 + e).to(dt).to(tl.float32)  # F.silu's result
        return (s * b).to(dt).to(tl.float32)

    @triton.jit
    def _silu_mul(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr, CUDA_EXP: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        dt = out_ptr.dtype.element_ty
        tl.store(out_ptr + i, _gate(a_ptr, b_ptr, i, m, dt, CUDA_EXP).to(dt), mask=m)

    @triton.jit
    def _silu_mul_rows(a_ptr, b_ptr, q_ptr, s_ptr, D: tl.constexpr, BLOCK: tl.constexpr, CUDA_EXP: tl.constexpr,
                       RECOMPUTE: tl.constexpr):
        """One row in two passes of BLOCK-wide chunks: the products and their absolute maximum, the
        products written over `a` (whose values are then spent); then the products read back (from
        L2) as fp8 values. Its arithmetic (the SiLU's `expf`, two IEEE divisions an element) costs
        as much as its memory: computing the products once instead of in both passes took it from
        0.121 to 0.110 ms at a step's shape (H100, bench/fp8_kernels.py). (The whole 10240-wide
        row at once, padded to 16384 and held in registers, ran at 0.78 TB/s: 0.27 ms.) RECOMPUTE: the
        products computed again in the second pass and `a` left alone, for bench/fp8_kernels.py."""
        row = tl.program_id(0).to(tl.int64)
        dt = a_ptr.dtype.element_ty
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, D, BLOCK):
            d = start + tl.arange(0, BLOCK)
            m = d < D
            g = _gate(a_ptr, b_ptr, row * D + d, m, dt, CUDA_EXP)
            if not RECOMPUTE:
                tl.store(a_ptr + row * D + d, g.to(dt), mask=m)  # exact: _gate rounded it to dt
            amax = tl.maximum(amax, tl.where(m, tl.abs(g), 0.0))
        s = fp8_rows.scale_of(tl.max(amax, axis=0))
        tl.store(s_ptr + row, s)
        for start in range(0, D, BLOCK):
            d = start + tl.arange(0, BLOCK)
            m = d < D
            if RECOMPUTE:
                g = _gate(a_ptr, b_ptr, row * D + d, m, dt, CUDA_EXP)
            else:
                g = tl.load(a_ptr + row * D + d, mask=m, other=0.0).to(tl.float32)
            tl.store(q_ptr + row * D + d, tl.math.div_rn(g, s).to(q_ptr.dtype.element_ty), mask=m)


def fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the kernel takes these: same shape and dtype, contiguous, on one GPU, eagerly."""
    return (triton is not None and not launch.failed and a.is_cuda and not torch.compiler.is_compiling()
            and a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.is_contiguous() and b.is_contiguous())


def _run(a: torch.Tensor, b: torch.Tensor, block: int = _BLOCK, warps: int = _WARPS) -> torch.Tensor:
    """(bench/kernel_options.py times other `block` and `warps`.)"""
    out = torch.empty_like(a)
    n = a.numel()
    with torch.cuda.device(a.device):  # Triton launches on the current device (gpu_kernels)
        _silu_mul[(triton.cdiv(n, block),)](a, b, out, n, BLOCK=block, num_warps=warps, CUDA_EXP=_CUDA_EXP)
    return out


launch = Guarded(_run)


def _run_rows(a: torch.Tensor, b: torch.Tensor, block: int = 2048, warps: int = 8, recompute: bool = False) -> Fp8Rows:
    """Overwrites `a` with the products. (bench/fp8_kernels.py times other `block` and `warps`, and
    `recompute`: the products computed in both passes, `a` left alone.)"""
    out = fp8_rows.empty_rows(a)
    dim = a.shape[-1]
    block = min(block, triton.next_power_of_2(dim))
    with torch.cuda.device(a.device):
        _silu_mul_rows[(a.numel() // dim,)](a, b, out.q, out.scale, D=dim, BLOCK=block, num_warps=warps,
                                            CUDA_EXP=_CUDA_EXP, RECOMPUTE=recompute)
    return out


launch_rows = Guarded(_run_rows)


def silu_mul(a: torch.Tensor, b: torch.Tensor, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """`F.silu(a) * b`; `fp8`: its rows quantised for an fp8 matmul in the same kernel (`Fp8Rows`)
    where the kernel runs, which then leaves the products (bf16) in `a`'s memory: pass an `a`
    that nothing reads afterwards."""
    if fits(a, b):
        if fp8:
            rows = launch_rows(a, b)
            if rows is not None:
                return rows
        out = launch(a, b)
        if out is not None:
            return out
    return F.silu(a) * b


@functools.cache
def _classes():
    from diffusers.models.transformers.transformer_z_image import FeedForward

    class FusedGateFeedForward(FeedForward):
        """diffusers' Z-Image feed-forward (0.36-0.42) with its gate through `silu_mul`."""

        def forward(self, x):
            a, b = self.w1(x), self.w3(x)
            return self.w2(silu_mul(a, b, take_fp8_rows(a, self.w2)))

    return FeedForward, FusedGateFeedForward


_SWAP = ClassSwap(_classes)
use_fused_gate = _SWAP.apply  # every Z-Image feed-forward inside a module to the fused gate
use_plain_gate = _SWAP.undo
