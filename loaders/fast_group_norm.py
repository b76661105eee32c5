"""The VAE's GroupNorm as two fused kernels on a GPU.

PyTorch's CUDA GroupNorm gives each (image, group) row of its statistics pass one thread block.
The Flux VAE decoder has 32 groups per image, so at 1024x1024 that pass runs 32 blocks over rows
of up to 4 M values while most of the GPU idles: 52 ms of a 0.12 s decode on an H100
(bench/results/profile_compiled_bf16_h100.txt). Here each row's statistics are taken in 64 parts
(2048 rows fill the GPU) and combined, and the normalisation is one pass, compiled. Float32
inside, as PyTorch's kernel does.
"""
from __future__ import annotations

import torch
from torch import nn

from .class_swap import swap_class
from .gpu_kernels import Fused

# Each (image, group) row's statistics are taken in this many equal parts, then combined: 32 rows
# alone would again leave most of the GPU idle.
SPLITS = 64


def group_norm(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """nn.GroupNorm's output for x [N, C, ...] whose C / groups x spatial size divides by SPLITS."""
    shape = x.shape
    parts = x.float().reshape(shape[0], groups, SPLITS, -1)
    var, mean = torch.var_mean(parts, dim=-1, correction=0, keepdim=True)
    # equal parts: the group's mean is the mean of theirs, its variance the mean of their variances
    # plus the variance of their means
    g_mean = mean.mean(dim=2, keepdim=True)
    g_var = var.mean(dim=2, keepdim=True) + (mean - g_mean).square().mean(dim=2, keepdim=True)
    y = ((parts - g_mean) * torch.rsqrt(g_var + eps)).reshape(shape)
    per_channel = (1, shape[1]) + (1,) * (len(shape) - 2)
    return (y * weight.float().reshape(per_channel) + bias.float().reshape(per_channel)).to(x.dtype)


# without a compiler, PyTorch's kernel: the function above, eagerly, would hold float32 copies
_fused_group_norm = Fused(group_norm, eager=torch.nn.functional.group_norm)


class FastGroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or not self.affine or (x[0].numel() // self.num_groups) % SPLITS:
            return super().forward(x)
        # plain tensors, not Parameters: torch.compile fixes a Parameter's shape, and the channel
        # count with it, so every width of the decoder would compile its own graph
        return _fused_group_norm(x, self.num_groups, self.weight.detach(), self.bias.detach(), self.eps)


def use_fast_group_norm(module: nn.Module) -> int:
    """Switch every nn.GroupNorm inside `module` to FastGroupNorm. Returns how many."""
    return swap_class(module.modules(), nn.GroupNorm, FastGroupNorm)
