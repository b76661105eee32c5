"""Rotary position embedding on real numbers in the transformer's attention.

diffusers' Z-Image attention processor rotates q and k by viewing them as complex64 and
multiplying by complex frequencies. torch.compile cannot generate code for complex numbers (it
falls back to eager kernels with a copy on each side). Written on the real and imaginary parts,
the same products fuse into one kernel when compiled (an H100 profile had ~6 ms a step in the
fallback); eagerly the complex product stays, as it launches fewer kernels. Float32 either way,
and bit for bit the same on a CPU.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from . import fp8_attention, norm_rope
from .class_swap import ClassSwap
from .fp8_matmul import take_fp8_rows


def rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """x [batch, tokens, heads, head_dim] rotated by freqs_cis [batch, tokens, head_dim / 2]
    (complex): each pair (x0, x1) -> (x0 c - x1 s, x0 s + x1 c). Eagerly as one complex product
    (fewer kernels: on an H100 the real form cost 15 ms a step eagerly), on reals when compiled."""
    if not torch.compiler.is_compiling():
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs_cis.unsqueeze(2)
        return torch.view_as_real(z).flatten(3).type_as(x)
    f = torch.view_as_real(freqs_cis).unsqueeze(2)  # [batch, tokens, 1, head_dim / 2, 2]
    cos, sin = f[..., 0], f[..., 1]
    pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).type_as(x)


def norm_rotate(x: torch.Tensor, norm: nn.Module, freqs_cis: torch.Tensor, fp8: bool = False):
    """`rotate(norm(x), freqs_cis)`: on a GPU in one kernel (norm_rope) where it fits, else as the
    two steps. Under torch.compile the kernel is an operator in the graph (`norm_rope.compiled_op`),
    used once it has launched eagerly here (the context refiner's first call runs eagerly).
    `fp8`: the result in fp8 with one scale, for fp8 attention (an `fp8_attention.Fp8Tensor`)."""
    weight = getattr(norm, "weight", None)
    if x.is_cuda and weight is not None and getattr(norm, "bias", None) is None:
        freqs = torch.view_as_real(freqs_cis)
        if norm_rope.fits(x, weight, freqs):
            if torch.compiler.is_compiling():
                if norm_rope.compiled_op is not None and norm_rope.launched and not fp8:
                    return norm_rope.compiled_op(x, weight, freqs, float(norm.eps))
            else:
                out = torch.empty_like(x, dtype=fp8_attention.FP8 if fp8 else x.dtype)
                descale = torch.empty(1, 1, 1, 1, dtype=torch.float32, device=x.device) if fp8 else None
                if norm_rope.launch(x, weight, freqs, float(norm.eps), out, norm_rope._ROWS, norm_rope._WARPS, descale):
                    norm_rope.launched = True
                    return fp8_attention.Fp8Tensor(out, descale, x.dtype) if fp8 else out
    out = rotate(norm(x), freqs_cis)
    return fp8_attention.quantize(out) if fp8 else out


@functools.cache
def _classes():
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor, dispatch_attention_fn

    class RealRopeAttnProcessor(ZSingleStreamAttnProcessor):
        """diffusers' processor (0.36-0.42) with `rotate` in place of its complex product."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None):
            query = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1))
            key = attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1))
            value = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
            if getattr(self, "_fp8_attention", False):  # set by attention.attention_backend
                out = self._fp8(attn, query, key, value, attention_mask, freqs_cis)
                if out is not None:
                    return out
            if attn.norm_q is not None and attn.norm_k is not None and freqs_cis is not None:
                query, key = norm_rotate(query, attn.norm_q, freqs_cis), norm_rotate(key, attn.norm_k, freqs_cis)
            else:
                if attn.norm_q is not None:
                    query = attn.norm_q(query)
                if attn.norm_k is not None:
                    key = attn.norm_k(key)
                if freqs_cis is not None:
                    query, key = rotate(query, freqs_cis), rotate(key, freqs_cis)
            if attention_mask is not None and attention_mask.ndim == 2:
                attention_mask = attention_mask[:, None, None, :]
            out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=self._parallel_config)
            out = attn.to_out[0](out.flatten(2, 3).to(query.dtype))
            return attn.to_out[1](out) if len(attn.to_out) > 1 else out

        @staticmethod
        def _fp8(attn, query, key, value, mask, freqs_cis):
            """The attention in fp8 (fp8_attention), or None where it does not apply (short or
            compiled sequences, no q/k norms, a mask other than Z-Image's [batch, tokens] one)."""
            if (not fp8_attention.fits(query) or attn.norm_q is None or attn.norm_k is None or freqs_cis is None
                    or not (mask is None or (mask.ndim == 2 and mask.dtype == torch.bool))):
                return None
            o = fp8_attention.attend(norm_rotate(query, attn.norm_q, freqs_cis, fp8=True),
                                     norm_rotate(key, attn.norm_k, freqs_cis, fp8=True),
                                     fp8_attention.quantize(value), mask)
            proj = attn.to_out[0]
            out = proj(o if take_fp8_rows(o.q, proj) else fp8_attention.dequantize(o))
            return attn.to_out[1](out) if len(attn.to_out) > 1 else out

    return ZSingleStreamAttnProcessor, RealRopeAttnProcessor


def _processors(module: nn.Module):
    return (getattr(m, "processor", None) for m in module.modules())


# the attention processors inside a module to RealRopeAttnProcessor (the sampler's backend
# choice, set on each processor, is kept), and back
_SWAP = ClassSwap(_classes, _processors)
use_real_rope = _SWAP.apply
use_complex_rope = _SWAP.undo
