"""One fused kernel per RMSNorm in the transformer.

diffusers' RMSNorm upcasts to float32, squares, averages, adds, takes rsqrt, multiplies, casts
back and multiplies by the weight: eight kernels over each [tokens, 3840] activation, six norms
per block (two of them on q and k). Eagerly that is most of the time a Z-Image step spends outside
its matrix products. `torch.nn.functional.rms_norm` does the same math (float32 inside) in one.
"""
from __future__ import annotations

import functools

import torch.nn.functional as F

from .class_swap import ClassSwap


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


_SWAP = ClassSwap(_rms_norm_class)
use_fused_norms = _SWAP.apply  # every diffusers RMSNorm inside a module to the fused one
use_plain_norms = _SWAP.undo
