"""The modulated block's norms, scales, gates and residual adds in three GPU kernels, eagerly.

A Z-Image block with timestep modulation (30 layers, 2 noise refiners) computes, for its attention
and again for its feed-forward, `norm1(x) * scale` into the sub-layer and `x + gate * norm2(out)`
after it: eagerly ten kernels a block, each a full pass over a [tokens, 3840] activation, the
broadcast products on PyTorch's slow non-vectorised path (an H100 profile of an eager 1024x1024
step: 14 ms of them). Here `norm_scale` and `gated_residual` are one Triton program per row each,
reading their inputs once and writing once, rounding where the eager ops round (to the
activations' dtype after the norm, the product and the sum), so they agree with them to a unit in
the last place. After the attention, the residual and the feed-forward's norm are one kernel
(`gated_residual_norm_scale`): the new residual is written once and not read back.

`use_fused_modulation` gives the blocks a forward that calls them on GPUs, eagerly; under
torch.compile (which fuses these itself), on a CPU, without Triton, or once a launch failed, the
blocks run diffusers' own forward.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import fp8_rows
from .class_swap import ClassSwap
from .fp8_matmul import take_fp8_rows
from .fp8_rows import Fp8Rows
from .gpu_kernels import Guarded

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_WARPS = 8

if triton is not None:
    @triton.jit
    def _this_row(D: tl.constexpr, BLOCK: tl.constexpr):
        """(row, its columns, which of them exist) of this program."""
        d = tl.arange(0, BLOCK)
        return tl.program_id(0).to(tl.int64), d, d < D

    @triton.jit
    def _normed_row(y_ptr, w_ptr, at, d, m, eps, D: tl.constexpr, dt: tl.constexpr):
        """One row RMS-normalised and scaled by the weight, rounded to `dt` as the eager norm
        returns it, in float32."""
        return _normed(tl.load(y_ptr + at, mask=m, other=0.0).to(tl.float32), w_ptr, d, m, eps, D, dt)

    @triton.jit
    def _normed(y, w_ptr, d, m, eps, D: tl.constexpr, dt: tl.constexpr):
        """_normed_row of a row already loaded (float32, zeros where `m` is off)."""
        rstd = tl.math.rsqrt(tl.sum(y * y, axis=0) / D + eps)
        return (y * rstd * tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)).to(dt).to(tl.float32)

    @triton.jit
    def _scaled_out(y, s_ptr, out_ptr, out_scale_ptr, row, tokens, s_stride, d, m, D: tl.constexpr,
                    dt: tl.constexpr, RAW: tl.constexpr, FP8: tl.constexpr):
        """Normalised row `y` times the row's image's scale, stored (as fp8 rows with `FP8`)."""
        s = tl.load(s_ptr + (row // tokens) * s_stride + d, mask=m, other=0.0).to(tl.float32)
        if RAW:  # the modulation's raw output: 1 + s, rounded as the eager add rounds it
            s = (1.0 + s).to(dt).to(tl.float32)
        if FP8:  # the product rounded as above, then written as an fp8 row and its scale (fp8_rows)
            fp8_rows.store_row((y * s).to(dt).to(tl.float32), m, out_ptr, out_scale_ptr, row, row * D + d)
        else:
            tl.store(out_ptr + row * D + d, (y * s).to(dt), mask=m)

    @triton.jit
    def _norm_scale(x_ptr, w_ptr, s_ptr, out_ptr, out_scale_ptr, tokens, s_stride, eps, D: tl.constexpr,
                    BLOCK: tl.constexpr, RAW: tl.constexpr, FP8: tl.constexpr):
        row, d, m = _this_row(D, BLOCK)
        dt = x_ptr.dtype.element_ty
        y = _normed_row(x_ptr, w_ptr, row * D + d, d, m, eps, D, dt)
        _scaled_out(y, s_ptr, out_ptr, out_scale_ptr, row, tokens, s_stride, d, m, D, dt, RAW, FP8)

    @triton.jit
    def _gated_residual(x_ptr, g_ptr, y_ptr, w_ptr, out_ptr, tokens, g_stride, eps, D: tl.constexpr,
                        BLOCK: tl.constexpr):
        row, d, m = _this_row(D, BLOCK)
        _residual(x_ptr, g_ptr, y_ptr, w_ptr, out_ptr, row, tokens, g_stride, d, m, eps, D)

    @triton.jit
    def _residual(x_ptr, g_ptr, y_ptr, w_ptr, out_ptr, row, tokens, g_stride, d, m, eps, D: tl.constexpr):
        """x + gate * norm(y) for one row, rounded as eager rounds it, stored; returned too."""
        dt = out_ptr.dtype.element_ty
        n = _normed_row(y_ptr, w_ptr, row * D + d, d, m, eps, D, dt)
        g = tl.load(g_ptr + (row // tokens) * g_stride + d, mask=m, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * D + d, mask=m, other=0.0).to(tl.float32)
        x = (x + (g * n).to(dt).to(tl.float32)).to(dt)
        tl.store(out_ptr + row * D + d, x, mask=m)
        return x

    @triton.jit
    def _gated_residual_norm_scale(x_ptr, g_ptr, y_ptr, w_ptr, out_ptr, w1_ptr, s_ptr, h_ptr, h_scale_ptr, tokens,
                                   g_stride, s_stride, eps, eps1, D: tl.constexpr, BLOCK: tl.constexpr,
                                   FP8: tl.constexpr):
        """_gated_residual, then _norm_scale (RAW) of its result while the row is in registers:
        the block's residual after its attention and the feed-forward's input in one pass."""
        row, d, m = _this_row(D, BLOCK)
        dt = out_ptr.dtype.element_ty
        x = _residual(x_ptr, g_ptr, y_ptr, w_ptr, out_ptr, row, tokens, g_stride, d, m, eps, D)
        y = _normed(tl.where(m, x.to(tl.float32), 0.0), w1_ptr, d, m, eps1, D, dt)
        _scaled_out(y, s_ptr, h_ptr, h_scale_ptr, row, tokens, s_stride, d, m, D, dt, True, FP8)


def _row_vector_ok(v: torch.Tensor, x: torch.Tensor) -> bool:
    """[batch, 1, dim] with unit stride along dim, same dtype and device as x [batch, tokens, dim]."""
    return v.shape == (x.shape[0], 1, x.shape[2]) and v.stride(-1) == 1 and v.dtype == x.dtype and v.device == x.device


def fits(x: torch.Tensor, *row_vectors: torch.Tensor) -> bool:
    """Whether the kernels take x [batch, tokens, dim] (contiguous, on a GPU) with these per-image
    [batch, 1, dim] scales or gates."""
    return (triton is not None and not launch.failed and x.is_cuda and x.ndim == 3 and x.is_contiguous()
            and not torch.compiler.is_compiling() and all(_row_vector_ok(v, x) for v in row_vectors))


def _norm_weight(norm: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    w = getattr(norm, "weight", None)
    if w is None or getattr(norm, "bias", None) is not None or w.shape != (x.shape[-1],) or w.dtype != x.dtype:
        return None
    return w


def _normed_room(x: torch.Tensor, fp8: bool) -> tuple[torch.Tensor | Fp8Rows, tuple]:
    """Room for a norm_scale result (fp8 rows or x's dtype) and the kernel's two output pointers."""
    out = fp8_rows.empty_rows(x) if fp8 else torch.empty_like(x)
    return out, ((out.q, out.scale) if fp8 else (out, out))


def _run(kernel_name: str, x: torch.Tensor, args: tuple, vec: torch.Tensor, eps: float,
         raw: bool = False, fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """(`raw` and `fp8` for the kernels that end in norm_scale: the kernel adds the 1; it writes fp8
    rows.)"""
    tokens, dim = x.shape[1], x.shape[2]
    with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
        if kernel_name == "norm_scale":
            out, dest = _normed_room(x, fp8)
            _norm_scale[(x.shape[0] * tokens,)](*args, *dest, tokens, vec.stride(0), eps, D=dim,
                                                BLOCK=triton.next_power_of_2(dim), num_warps=_WARPS, RAW=raw, FP8=fp8)
        elif kernel_name == "gated_residual":
            out = torch.empty_like(x)
            _gated_residual[(x.shape[0] * tokens,)](*args, out, tokens, vec.stride(0), eps, D=dim,
                                                    BLOCK=triton.next_power_of_2(dim), num_warps=_WARPS)
        else:  # gated_residual_norm_scale: args (x, gate, y, w), (w1, scale, eps1)
            (x_, g, y, w), (w1, scale, eps1) = args
            out = torch.empty_like(x)
            h, dest = _normed_room(x, fp8)
            _gated_residual_norm_scale[(x.shape[0] * tokens,)](
                x_, g, y, w, out, w1, scale, *dest, tokens, vec.stride(0), scale.stride(0), eps, eps1, D=dim,
                BLOCK=triton.next_power_of_2(dim), num_warps=_WARPS, FP8=fp8)
            return out, h
    return out


launch = Guarded(_run)


def norm_scale(x: torch.Tensor, norm: nn.Module, scale: torch.Tensor, raw: bool = False,
               fp8: bool = False) -> torch.Tensor | Fp8Rows:
    """`norm(x) * scale` (an RMSNorm with a weight; scale [batch, 1, dim]); with `raw`, `scale` is
    the modulation's output and the factor `1 + scale` (added in the kernel: one launch less).
    `fp8`: for fp8 matmuls, its rows quantised in the same pass (`Fp8Rows`) where the kernel runs."""
    w = _norm_weight(norm, x)
    if w is not None and fits(x, scale):
        out = launch("norm_scale", x, (x, w, scale), scale, float(norm.eps), raw, fp8)
        if out is not None:
            return out
    return norm(x) * ((1.0 + scale) if raw else scale)


def gated_residual_norm_scale(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, norm: nn.Module,
                              next_norm: nn.Module, scale: torch.Tensor, fp8: bool = False):
    """(`gated_residual(x, gate, y, norm)`, `norm_scale(<it>, next_norm, scale, raw=True, fp8)`):
    one pass where the kernel runs (the residual is not read back), the two calls elsewhere."""
    w, w1 = _norm_weight(norm, y), _norm_weight(next_norm, x)
    if w is not None and w1 is not None and y.shape == x.shape and y.is_contiguous() and y.dtype == x.dtype \
            and fits(x, gate, scale):
        out = launch("gated_residual_norm_scale", x, ((x, gate, y, w), (w1, scale, float(next_norm.eps))), gate,
                     float(norm.eps), True, fp8)
        if out is not None:
            return out
    x = gated_residual(x, gate, y, norm)
    return x, norm_scale(x, next_norm, scale, raw=True, fp8=fp8)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """`x + gate * norm(y)` (gate [batch, 1, dim])."""
    w = _norm_weight(norm, y)
    if w is not None and y.shape == x.shape and y.is_contiguous() and y.dtype == x.dtype and fits(x, gate):
        out = launch("gated_residual", x, (x, gate, y, w), gate, float(norm.eps))
        if out is not None:
            return out
    return x + gate * norm(y)


@functools.cache
def _classes():
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    class FusedModulationBlock(ZImageTransformerBlock):
        """diffusers' block (0.36-0.42) with its global-modulation path through the fused kernels."""

        def forward(self, x, attn_mask, freqs_cis, adaln_input=None, *per_token, **kwargs):
            # `per_token`: later diffusers' (noise_mask, adaln_noisy, adaln_clean), for its omni
            # mode's per-token modulation, left to diffusers; 0.36 has none of them
            if not self.modulation or any(a is not None for a in (*per_token, *kwargs.values())) or not fits(x):
                return super().forward(x, attn_mask, freqs_cis, adaln_input, *per_token, **kwargs)
            # the scales go in raw (the kernel adds the 1) and both gates' tanh is one launch: three
            # small launches less a block. (A tanh in the gated-residual kernel, per row, cost more
            # than the launch: 0.040 against 0.034 ms, H100.)
            mod = self.adaLN_modulation(adaln_input).unsqueeze(1)
            scale_msa, _, scale_mlp, _ = mod.chunk(4, dim=2)
            _, gate_msa, _, gate_mlp = mod.tanh().chunk(4, dim=2)
            # with fp8 matmuls, q, k and v (w1 and w3) take one quantised copy of their input
            att, ff = self.attention, self.feed_forward
            fp8 = take_fp8_rows(x, att.to_q, att.to_k, att.to_v)
            h = norm_scale(x, self.attention_norm1, scale_msa, raw=True, fp8=fp8)
            attn_out = att(h, attention_mask=attn_mask, freqs_cis=freqs_cis)
            x, h = gated_residual_norm_scale(x, gate_msa, attn_out, self.attention_norm2, self.ffn_norm1, scale_mlp,
                                             fp8=take_fp8_rows(x, ff.w1, ff.w3))
            return gated_residual(x, gate_mlp, ff(h), self.ffn_norm2)

    return ZImageTransformerBlock, FusedModulationBlock


_SWAP = ClassSwap(_classes)
use_fused_modulation = _SWAP.apply  # every Z-Image block inside a module to the fused forward
use_plain_modulation = _SWAP.undo
