"""GroupNorm for the VAE decoder on a GPU: statistics spread over the whole GPU, then one
multiply-add per element.

PyTorch's GroupNorm kernel reduces each (image, group) with one thread block. A 1024x1024 decode
has 32 of them per norm, up to 4M elements each, so most of an H100 idles: its 30 norms took 52
of a 92 ms decode (bench/results/profile_compiled_bf16_h100.txt). Here each group is split over
many programs (partial sums of x and x^2 in float32), a small kernel adds them up into each
channel's float32 scale and shift, and the normalisation is one pass: the same math, rounded once
to the activation dtype.

Channels-last activations (a decode runs in that layout: cuDNN's convolutions then need no
layout conversions around them) have their own two kernels, reading [pixels, channels] tiles:
each group's channels are neighbours in memory there.

Without Triton, on a CPU, or for tensors the kernels do not take (neither layout contiguous, or
channel counts that are not powers of two), the module runs PyTorch's GroupNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .class_swap import ClassSwap
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


    @triton.jit
    def _partial_moments_nhwc(x_ptr, out_ptr, pixels, chunks, C: tl.constexpr, G: tl.constexpr,
                              STEP: tl.constexpr, ROWS: tl.constexpr):
        chunk, image = tl.program_id(0), tl.program_id(1)  # chunks on axis 0: up to 2^31 of them
        base = x_ptr + image.to(tl.int64) * pixels * C
        c = tl.arange(0, C)[None, :]
        acc = tl.zeros([STEP, C], tl.float32)
        acc2 = tl.zeros([STEP, C], tl.float32)
        for k in range(0, ROWS // STEP):
            p = chunk * ROWS + k * STEP + tl.arange(0, STEP)[:, None]
            v = tl.load(base + p.to(tl.int64) * C + c, mask=p < pixels, other=0.0).to(tl.float32)
            acc += v
            acc2 += v * v
        g = tl.arange(0, G)
        out = out_ptr + ((image * G + g) * chunks + chunk) * 2  # [image, group, chunk, (sum, sum of squares)]
        tl.store(out, tl.sum(tl.reshape(tl.sum(acc, axis=0), (G, C // G)), axis=1))
        tl.store(out + 1, tl.sum(tl.reshape(tl.sum(acc2, axis=0), (G, C // G)), axis=1))

    @triton.jit
    def _finalize(p_ptr, w_ptr, b_ptr, scale_ptr, shift_ptr, parts, length, eps, G, CG: tl.constexpr,
                  CGP: tl.constexpr, PB: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
        """One (image, group): its partial sums added up, its mean and 1/std, and each of its
        channels' float32 scale and shift (with the weight and bias): scale_and_shift's math."""
        row = tl.program_id(0)  # image * G + group
        acc = tl.zeros([PB], tl.float32)
        acc2 = tl.zeros([PB], tl.float32)
        for k in range(0, parts, PB):
            i = k + tl.arange(0, PB)
            m = i < parts
            acc += tl.load(p_ptr + (row * parts + i) * 2, mask=m, other=0.0)
            acc2 += tl.load(p_ptr + (row * parts + i) * 2 + 1, mask=m, other=0.0)
        mean = tl.sum(acc) / length
        rstd = tl.math.rsqrt(tl.maximum(tl.sum(acc2) / length - mean * mean, 0.0) + eps)
        j = tl.arange(0, CGP)
        m = j < CG
        ch = (row % G) * CG + j
        scale = tl.zeros([CGP], tl.float32) + rstd
        if HAS_W:
            scale = scale * tl.load(w_ptr + ch, mask=m, other=0.0).to(tl.float32)
        shift = -(mean * scale)
        if HAS_B:
            shift = shift + tl.load(b_ptr + ch, mask=m, other=0.0).to(tl.float32)
        tl.store(scale_ptr + row * CG + j, scale, mask=m)  # [image, channel]: image * C + group * CG + j
        tl.store(shift_ptr + row * CG + j, shift, mask=m)

    @triton.jit
    def _scale_shift_nhwc(x_ptr, y_ptr, scale_ptr, shift_ptr, pixels, C: tl.constexpr, STEP: tl.constexpr):
        blk, image = tl.program_id(0), tl.program_id(1)  # blocks on axis 0 (65535 at most on axis 1)
        p = blk * STEP + tl.arange(0, STEP)[:, None]
        c = tl.arange(0, C)[None, :]
        s = tl.load(scale_ptr + image * C + c)
        t = tl.load(shift_ptr + image * C + c)
        at = image.to(tl.int64) * pixels * C + p.to(tl.int64) * C + c
        m = p < pixels
        v = tl.load(x_ptr + at, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + at, (v * s + t).to(y_ptr.dtype.element_ty), mask=m)


def channels_last(x: torch.Tensor) -> bool:
    """Whether `x` [B, C, ...] is laid out [B, ..., C] in memory (and not plain contiguous too): a
    channels-last image, or the VAE attention's [B, C, pixels] view of one."""
    return x.ndim >= 3 and x.stride(1) == 1 and x.movedim(1, -1).is_contiguous() and not x.is_contiguous()


def _nhwc_rows(c: int) -> tuple[int, int]:
    """(pixels per load, pixels per statistics program) for `c` channels: 2048-element loads,
    32768 elements a program, as the contiguous kernels take them."""
    step = max(1, _BLOCK // c)
    return step, step * max(1, _SPLIT // _BLOCK)


def _partial_sums(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """On a GPU: float32 partial sums of x and x^2 of each (image, group) [B * groups, parts, 2], and
    how many elements each group has."""
    b, c = x.shape[:2]
    if channels_last(x):
        pixels = x[0, 0].numel()
        step, rows = _nhwc_rows(c)
        chunks = triton.cdiv(pixels, rows)
        partial = torch.empty(b * groups, chunks, 2, dtype=torch.float32, device=x.device)
        _partial_moments_nhwc[(chunks, b)](x, partial, pixels, chunks, C=c, G=groups, STEP=step, ROWS=rows,
                                           num_warps=8)
        return partial, pixels * (c // groups)
    rows = x.view(b * groups, -1)
    length = rows.shape[1]
    splits = triton.cdiv(length, _SPLIT)
    partial = torch.empty(b * groups, splits, 2, dtype=torch.float32, device=x.device)
    _partial_moments[(b * groups, splits)](rows, partial, length, splits, SPLIT=_SPLIT, BLOCK=_BLOCK, num_warps=8)
    return partial, length


def moments(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, int]:
    """float32 sum and sum of squares of each (image, group) of `x` [B, C, ...] with PyTorch's
    reductions (the CPU path): [B * groups, 2], and how many elements each group has."""
    rows = x.reshape(x.shape[0] * groups, -1)
    s = rows.sum(1, dtype=torch.float32)
    s2 = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32).square()
    return torch.stack((s, s2), dim=1), rows.shape[1]


def scale_and_shift(sums: torch.Tensor, length: int, channels: int, groups: int, weight: torch.Tensor | None,
                    bias: torch.Tensor | None, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (image, channel)'s float32 scale and shift [B, C] from `moments`. Broadcast over the
    groups' channels rather than repeated: every small operation here is a launch, and a tiled
    decode runs ~120 GroupNorms (its wall time varied 66-190 ms a decode where the GPU needed 65,
    bench/NOTES.md session 8)."""
    cg = channels // groups
    m = sums / length
    mean, ex2 = m[:, 0], m[:, 1]
    rstd = torch.addcmul(ex2, mean, mean, value=-1).clamp_min_(0).add_(eps).rsqrt_().view(-1, groups, 1)
    # float32 throughout: a bf16 weight or bias is promoted
    scale = rstd * weight.view(groups, cg) if weight is not None else rstd.expand(-1, -1, cg)
    shift = torch.mul(mean.view(-1, groups, 1), scale).neg_()
    if bias is not None:
        shift = shift + bias.view(groups, cg)
    return scale.reshape(-1, channels), shift.reshape(-1, channels)


def scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x * scale + shift with one float32 `scale` and `shift` per (image, channel) [B, C], computed
    in float32 and rounded once to x's dtype."""
    b, c = x.shape[:2]
    if x.device.type == "cuda" and triton is not None:
        y = torch.empty_like(x)  # in x's layout
        plane = x[0, 0].numel()
        with torch.cuda.device(x.device):
            if channels_last(x):
                step = _nhwc_rows(c)[0]
                _scale_shift_nhwc[(triton.cdiv(plane, step), b)](x, y, scale.contiguous(), shift.contiguous(), plane,
                                                                 C=c, STEP=step, num_warps=8)
            else:
                _scale_shift[(b * c, triton.cdiv(plane, _BLOCK))](x, y, scale.contiguous(), shift.contiguous(),
                                                                  plane, BLOCK=_BLOCK, num_warps=8)
        return y
    shape = (b, c) + (1,) * (x.ndim - 2)
    return (x.float() * scale.view(shape) + shift.view(shape)).to(x.dtype)


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float) -> torch.Tensor:
    """F.group_norm's result for `x` [B, C, ...], contiguous or channels-last (see `fits`). On a GPU
    three launches: partial sums, their totals with each channel's scale and shift, the
    normalisation. A tiled decode runs ~120 GroupNorms and was bound by launching them: with ~10
    launches each it took 84 ms at 1024x1024, with 3 53 ms (H100, one run of kernel_options)."""
    b, c = x.shape[:2]
    if x.device.type == "cuda" and triton is not None:
        with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
            partial, length = _partial_sums(x, groups)
            scale = torch.empty(b, c, dtype=torch.float32, device=x.device)
            shift = torch.empty_like(scale)
            cg = c // groups
            _finalize[(b * groups,)](partial, weight, bias, scale, shift, partial.shape[1], length, eps, groups,
                                     CG=cg, CGP=triton.next_power_of_2(cg), PB=128, HAS_W=weight is not None,
                                     HAS_B=bias is not None, num_warps=1)
        return scale_shift(x, scale, shift)
    sums, length = moments(x, groups)
    return scale_shift(x, *scale_and_shift(sums, length, c, groups, weight, bias, eps))


_on_gpu = Guarded(group_norm)  # PyTorch's GroupNorm once the kernels failed to build here


def fits(x: torch.Tensor, groups: int) -> bool:
    """Whether the kernels take `x`: on a GPU with Triton, contiguous [B, C, ...], or channels-last
    with power-of-two channel and group counts."""
    if x.device.type != "cuda" or triton is None or x.ndim < 3:
        return False
    if channels_last(x):
        c = x.shape[1]
        return c % groups == 0 and c & (c - 1) == 0 and groups & (groups - 1) == 0 and c <= _BLOCK
    return x.is_contiguous()


class SpreadGroupNorm(nn.GroupNorm):
    """nn.GroupNorm computed by `group_norm` for CUDA tensors the kernels take (`fits`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fits(x, self.num_groups):
            y = _on_gpu(x, self.num_groups, self.weight, self.bias, self.eps)
            if y is not None:
                return y
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


_SWAP = ClassSwap(lambda: (nn.GroupNorm, SpreadGroupNorm))
use_spread_group_norms = _SWAP.apply  # every nn.GroupNorm inside a module to SpreadGroupNorm
use_plain_group_norms = _SWAP.undo
