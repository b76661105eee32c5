"""One fused kernel per RMSNorm in the transformer.

diffusers' RMSNorm upcasts to float32, squares, averages, adds, takes rsqrt, multiplies, casts
back and multiplies by the weight: eight kernels over each [tokens, 3840] activation, six norms
per block (two of them on q and k). Eagerly that is most of the time a Z-Image step spends outside
its matrix products. `torch.nn.functional.rms_norm` does the same math (float32 inside) in one.
"""
from __future__ import annotations

import functools

import torch.nn.functional as F
from torch import nn

from .class_swap import swap_class


@functools.cache
def _rms_norm_class():
    from diffusers.models.normalization import RMSNorm

    class FusedRMSNorm(RMSNorm):
        def forward(self, hidden_states):
            if self.weight is None or self.bias is not None:
                return super().forward(hidden_states)
            x = hidden_states.to(self.weight.dtype) if self.weight.dtype != hidden_states.dtype else hidden_states
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    return RMSNorm, FusedRMSNorm


def use_fused_norms(module: nn.Module) -> int:
    """Switch every diffusers RMSNorm inside `module` to the fused one. Returns how many."""
    return swap_class(module.modules(), *_rms_norm_class())


def use_plain_norms(module: nn.Module) -> None:
    """Undo use_fused_norms (benchmarks run diffusers' own pipeline on the pack's loaded modules)."""
    base, fused = _rms_norm_class()
    swap_class(module.modules(), fused, base)
