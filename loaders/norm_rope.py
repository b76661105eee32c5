"""q or k of the transformer's attention normalised (RMSNorm over each head) and rotated (RoPE) in
one GPU pass.

Eagerly the two take six kernels per tensor (the norm, a float32 copy, the complex product and its
copies back), ~0.15 ms for each of q and k of a layer at a 1024x1024 step on an H100 (an eager
profile: ~10 ms a step); compiled, inductor fuses them into one reduction kernel that ran at 1 TB/s
(57 us). Here one Triton program reads 16 head vectors once, takes their mean squares, scales,
rounds to the weight's dtype (as the eager norm returns it), rotates the (even, odd) pairs by the
token's angle in float32, and writes them once: 24 us for q at a 1024x1024 step on an H100.
`real_rope.norm_rotate` uses it eagerly on GPUs; on a CPU, without Triton, under torch.compile, or
if the kernel fails, the two steps run.
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
    def _norm_rope(x_ptr, w_ptr, f_ptr, out_ptr, descale_ptr, rows, heads, eps, bound, D: tl.constexpr,
                   R: tl.constexpr, FP8: tl.constexpr):
        r = tl.program_id(0) * R + tl.arange(0, R)[:, None]  # head vector (batch x token x head)
        d = tl.arange(0, D)[None, :]
        rm = r < rows
        at = r.to(tl.int64) * D + d
        # each head vector in one contiguous load, split into its (even, odd) pairs in registers:
        # loading the two halves with stride 2 ran at 0.42 TB/s, this at 2.7 (H100, bench/)
        x = tl.load(x_ptr + at, mask=rm, other=0.0).to(tl.float32)
        rstd = tl.math.rsqrt(tl.sum(x * x, axis=1)[:, None] / D + eps)
        dt = x_ptr.dtype.element_ty
        w = tl.load(w_ptr + d).to(tl.float32)
        y = (x * rstd * w).to(dt).to(tl.float32)  # rounded as eager rounds it
        y0, y1 = tl.split(tl.reshape(y, (R, D // 2, 2)))
        f = tl.load(f_ptr + (r // heads).to(tl.int64) * D + d, mask=rm, other=0.0)  # [tokens, D/2, (cos, sin)]
        c, s = tl.split(tl.reshape(f, (R, D // 2, 2)))
        o = tl.reshape(tl.join(y0 * c - y1 * s, y0 * s + y1 * c), (R, D))
        if FP8:  # for fp8 attention: a unit-RMS vector's values are at most sqrt(D), scaled by the weight
            # and rotated in pairs they stay under sqrt(D) x max|weight|: one scale, known before the
            # data (`bound`: sqrt(D) / 448)
            descale = tl.maximum(bound * tl.max(tl.abs(w)), 1e-12)
            o = tl.clamp(tl.math.div_rn(o.to(dt).to(tl.float32), descale), -448.0, 448.0)
            if tl.program_id(0) == 0:
                tl.store(descale_ptr, descale)
        tl.store(out_ptr + at, o.to(out_ptr.dtype.element_ty), mask=rm)


def fits(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor) -> bool:
    """Whether the kernel takes these: x [batch, tokens, heads, head_dim] contiguous on a GPU,
    weight [head_dim], freqs [batch, tokens, head_dim / 2, 2] float32 contiguous."""
    return (triton is not None and not launch.failed and x.is_cuda and x.ndim == 4 and x.is_contiguous()
            and x.shape[-1] % 2 == 0 and (x.shape[-1] & (x.shape[-1] - 1)) == 0
            and weight.shape == (x.shape[-1],) and freqs.dtype == torch.float32 and freqs.is_contiguous()
            and freqs.shape == (x.shape[0], x.shape[1], x.shape[-1] // 2, 2))


def _grid_launch(kernel, x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float, out: torch.Tensor,
                 rows_per_program: int = _ROWS, warps: int = _WARPS, descale: torch.Tensor | None = None) -> None:
    """`kernel` (`_norm_rope`, or it wrapped for an operator) over x's rows; with `descale` (float32
    [1, 1, 1, 1]), `out` is fp8 and the kernel writes its scale there."""
    rows = x.numel() // x.shape[-1]
    kernel[(triton.cdiv(rows, rows_per_program),)](x, weight, freqs, out, out if descale is None else descale, rows,
                                                   x.shape[2], eps, x.shape[-1] ** 0.5 / 448.0, D=x.shape[-1],
                                                   R=rows_per_program,
                                                   FP8=descale is not None, num_warps=warps)


def _launch(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float, out: torch.Tensor,
            rows_per_program: int = _ROWS, warps: int = _WARPS, descale: torch.Tensor | None = None) -> bool:
    """(bench/kernel_options.py times other `rows_per_program` and `warps`.)"""
    with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
        _grid_launch(_norm_rope, x, weight, freqs, eps, out, rows_per_program, warps, descale)
    return True


launch = Guarded(_launch)


def _register_op():
    """The kernel as an operator torch.compile can put in its graph (`torch.library.triton_op`):
    inductor launches it from its generated code, where its own fusion of the norm and rotation
    ran at a third of the kernel's speed (76 against 24 us for q at a 1024x1024 step on an H100).
    None where this torch or Triton has no such operators, or another copy of this module (the
    pack imported under a second name) registered it already."""
    if triton is None or not hasattr(torch.library, "triton_op"):
        return None
    try:
        @torch.library.triton_op("zimage::norm_rope", mutates_args=())
        def norm_rope_op(x: torch.Tensor, weight: torch.Tensor, freqs: torch.Tensor, eps: float) -> torch.Tensor:
            out = torch.empty_like(x)
            _grid_launch(torch.library.wrap_triton(_norm_rope), x, weight, freqs, eps, out)
            return out
    except RuntimeError:  # registered by another import of this file
        return getattr(torch.ops.zimage, "norm_rope", None)
    return norm_rope_op


compiled_op = _register_op()
launched = False  # whether the kernel ran here once (eagerly): under compile it is used only then
