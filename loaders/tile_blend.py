"""The seams of a tiled VAE decode blended in one pass per edge.

diffusers' AutoencoderKL blends two overlapping tiles one pixel row (`blend_v`) or column
(`blend_h`) at a time in a Python loop: with 128-pixel overlaps that is 128 iterations of a few
tiny kernels per edge, ~2,500 launches for the 2x2 tiles of a 1024x1024 decode and ~15,000 for the
4x4 tiles of a 2048x2048 one, each doing almost nothing on the GPU. Here an edge is one weighted
sum over the whole overlap, with the same weights (y / extent in float64, used as float32) and the
same roundings (each product rounded to the tile's dtype, then their sum): the same bits.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from .class_swap import swap_class


def blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """`b` with its first `extent` rows along `dim` faded in from `a`'s last ones (in place)."""
    e = min(a.shape[dim], b.shape[dim], extent)
    if e <= 0:
        return b
    shape = [1] * b.ndim
    shape[dim] = e
    ramp = torch.arange(e, dtype=torch.float64) / e  # diffusers' y / blend_extent, a Python float
    up = ramp.to(torch.float32).view(shape).to(b.device)
    down = (1 - ramp).to(torch.float32).view(shape).to(b.device)
    head = b.narrow(dim, 0, e)
    tail = a.narrow(dim, a.shape[dim] - e, e)
    head.copy_((tail.float() * down).to(b.dtype) + (head.float() * up).to(b.dtype))
    return b


@functools.cache
def _classes():
    from diffusers import AutoencoderKL

    class BlendedAutoencoderKL(AutoencoderKL):
        """diffusers' VAE with its tile seams blended by `blend`."""

        def blend_v(self, a, b, blend_extent):
            return blend(a, b, blend_extent, 2)

        def blend_h(self, a, b, blend_extent):
            return blend(a, b, blend_extent, 3)

    return AutoencoderKL, BlendedAutoencoderKL


def use_one_pass_blends(vae: nn.Module) -> int:
    """Give a loaded diffusers AutoencoderKL the one-pass seam blends. Returns 1, or 0 if it is not one."""
    return swap_class([vae], *_classes())
