"""q or k of the transformer's attention normalised (RMSNorm over each head) and rotated (RoPE) in
one GPU pass.

Eagerly the two take six kernels per tensor (the norm, a float32 copy, the complex product and its
copies back), ~0.15 ms for each of q and k of a layer at a 1024x1024 step on an H100 (an eager
profile: ~10 ms a step); compiled, inductor fuses them into one reduction kernel that ran at 1 TB/s
(63 us). Here one Triton program reads 16 head vectors once, takes their mean squares, scales,
rounds to the weight's dtype (as the eager norm returns it), rotates the (even, odd) pairs by the
token's angle in float32, and writes them once. `real_rope.norm_rotate` uses it eagerly on GPUs;
on a CPU, without Triton, under torch.compile, or if the kernel fails, the two steps run.
"""
from __future__ import annotations

import torch

from .gpu_kernels import Guarded

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_ROWS, _WARPS = 16, 4  # head vectors per program

if triton is not None:
    @triton.jit
    def _norm_rope(x_ptr, w_ptr, f_ptr, out_ptr, rows, heads, eps, HALF: tl.constexpr, R: tl.constexpr):
        r = tl.program_id(0) * R + tl.arange(0, R)[:, None]  # head vector (batch x token x head)
        j = tl.arange(0, HALF)[None, :]  # pair
        rm = r < rows
        at = r.to(tl.int64) * (2 * HALF) + 2 * j
        x0 = tl.load(x_ptr + at, mask=rm, other=0.0).to(tl.float32)
        x1 = tl.load(x_ptr + at + 1, mask=rm, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x0 * x0 + x1 * x1, axis=1)[:, None] / (2 * HALF) + eps)
        w0 = tl.load(w_ptr + 2 * j).to(tl.float32)
        w1 = tl.load(w_ptr + 2 * j + 1).to(tl.float32)
        dt = out_ptr.dtype.element_ty
        y0 = (x0 * rstd * w0).to(dt).to(tl.float32)  # the norm's output, as the eager path rounds it
        y1 = (x1 * rstd * w1).to(dt).to(tl.float32)
        ft = (r // heads).to(tl.int64) * (2 * HALF) + 2 * j  # freqs: [tokens, HALF, (cos, sin)]
        c = tl.load(f_ptr + ft, mask=rm, other=0.0)
        s = tl.load(f_ptr + ft + 1, mask=rm, other=0.0)
        tl.store(out_ptr + at, (y0 * c - y1 * s).to(dt), mask=rm)
        tl.store(out_ptr + at + 1, (y0 * s + y1 * c).to(dt), mask=rm)


def fits(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel takes these: x [batch, tokens, heads, head_dim] contiguous on a GPU,
    weight [head_dim], freqs [batch, tokens, head_dim / 2, 2] float32 contiguous."""
    return (triton is not None and not launch.failed and x.is_cuda and x.ndim == 4 and x.is_contiguous()
            and x.shape[-1] % 2 == 0 and (x.shape[-1] & (x.shape[-1] - 1)) == 0
            and weight.shape == (x.shape[-1],) and freqs.dtype == torch.float32 and freqs.is_contiguous()
            and freqs.shape == (x.shape[0], x.shape[1], x.shape[-1] // 2, 2))


def _launch(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float, out: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
        _norm_rope[(triton.cdiv(rows, _ROWS),)](x, weight, freqs, out, rows, x.shape[2], eps,
                                                HALF=x.shape[-1] // 2, R=_ROWS, num_warps=_WARPS)
    return True


launch = Guarded(_launch)
