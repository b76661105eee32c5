"""GroupNorm for the VAE decoder on a GPU: statistics spread over the whole GPU, then one
multiply-add per element.

PyTorch's GroupNorm kernel reduces each (image, group) with one thread block. A 1024x1024 decode
has 32 of them per norm, up to 4M elements each, so most of an H100 idles: its 30 norms took 52
of a 92 ms decode (bench/results/profile_compiled_bf16_h100.txt). Here each group is split over
many programs (partial sums of x and x^2 in float32, added up by PyTorch), and the normalisation
is one pass with a float32 scale and shift per channel: the same math, rounded once to the
activation dtype.

Without Triton, on a CPU, or for tensors the kernels do not take (not contiguous), the module
runs PyTorch's GroupNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .class_swap import swap_class
from .gpu_kernels import Guarded

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

_SPLIT = 32768  # elements each statistics program reduces
_BLOCK = 2048  # elements per loop step, and per program of the multiply-add

if triton is not None:
    @triton.jit
    def _partial_moments(x_ptr, out_ptr, length, splits, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
        row, part = tl.program_id(0), tl.program_id(1)
        base = x_ptr + row.to(tl.int64) * length
        acc = tl.zeros([BLOCK], tl.float32)
        acc2 = tl.zeros([BLOCK], tl.float32)
        for k in range(0, SPLIT // BLOCK):
            idx = part * SPLIT + k * BLOCK + tl.arange(0, BLOCK)
            v = tl.load(base + idx, mask=idx < length, other=0.0).to(tl.float32)
            acc += v
            acc2 += v * v
        out = out_ptr + (row * splits + part) * 2
        tl.store(out, tl.sum(acc))
        tl.store(out + 1, tl.sum(acc2))

    @triton.jit
    def _scale_shift(x_ptr, y_ptr, scale_ptr, shift_ptr, plane, BLOCK: tl.constexpr):
        channel, blk = tl.program_id(0), tl.program_id(1)
        s = tl.load(scale_ptr + channel)
        t = tl.load(shift_ptr + channel)
        idx = blk * BLOCK + tl.arange(0, BLOCK)
        m = idx < plane
        base = channel.to(tl.int64) * plane
        v = tl.load(x_ptr + base + idx, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + base + idx, (v * s + t).to(y_ptr.dtype.element_ty), mask=m)


def moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 mean and biased variance of each (image, group) of contiguous `x` [B, C, ...]: [B, groups]."""
    b = x.shape[0]
    rows = x.view(b * groups, -1)
    length = rows.shape[1]
    if x.device.type == "cuda" and triton is not None:
        splits = triton.cdiv(length, _SPLIT)
        partial = torch.empty(b * groups, splits, 2, dtype=torch.float32, device=x.device)
        with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
            _partial_moments[(b * groups, splits)](rows, partial, length, splits, SPLIT=_SPLIT, BLOCK=_BLOCK,
                                                   num_warps=8)
        s, s2 = partial.sum(1).unbind(-1)
    else:
        s = rows.sum(1, dtype=torch.float32)
        s2 = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()
    mean = s / length
    var = (s2 / length - mean.square()).clamp_min(0)
    return mean.view(b, groups), var.view(b, groups)


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift with one float32 `scale` and `shift` per (image, channel) [B, C], computed
    in float32 and rounded once to x's dtype."""
    b, c = x.shape[:2]
    if x.device.type == "cuda" and triton is not None:
        y = torch.empty_like(x)
        plane = x[0, 0].numel()
        with torch.cuda.device(x.device):
            _scale_shift[(b * c, triton.cdiv(plane, _BLOCK))](x, y, scale.contiguous(), shift.contiguous(), plane,
                                                              BLOCK=_BLOCK, num_warps=8)
        return y
    shape = (b, c) + (1,) * (x.ndim - 2)
    return (x.float() * scale.view(shape) + shift.view(shape)).to(x.dtype)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """F.group_norm's result for contiguous `x` [B, C, ...]."""
    b, c = x.shape[:2]
    mean, var = moments(x, groups)
    rstd = torch.rsqrt(var + eps).repeat_interleave(c // groups, dim=1)  # [B, C]
    scale = rstd * weight.float() if weight is not None else rstd
    shift = -mean.repeat_interleave(c // groups, dim=1) * scale
    if bias is not None:
        shift = shift + bias.float()
    return scale_shift(x, scale, shift)


_on_gpu = Guarded(group_norm)  # PyTorch's GroupNorm once the kernels failed to build here


class SpreadGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by `group_norm` for contiguous CUDA tensors when Triton is there."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda" and triton is not None and x.is_contiguous() and x.ndim >= 3:
            y = _on_gpu(x, self.num_groups, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


def use_spread_group_norms(module: nn.Module) -> int:
    """Switch every nn.GroupNorm inside `module` to SpreadGroupNorm. Returns how many."""
    return swap_class(module.modules(), nn.GroupNorm, SpreadGroupNorm)


def use_plain_group_norms(module: nn.Module) -> None:
    """Undo use_spread_group_norms (benchmarks run diffusers' own pipeline on the pack's modules)."""
    swap_class(module.modules(), SpreadGroupNorm, nn.GroupNorm)
