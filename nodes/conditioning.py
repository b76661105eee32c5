"""CONDITIONING, ComfyUI's list of [features [1, tokens, width], extras], to and from the
caption features the sampler uses."""
from __future__ import annotations

import torch

from ..loaders.errors import ZImageError


def to_conditioning(features: torch.Tensor) -> list:
    return [[features.unsqueeze(0), {"pooled_output": None}]]


def from_conditioning(cond, input_name: str) -> torch.Tensor:
    if not isinstance(cond, list) or not cond or not isinstance(cond[0], (list, tuple)):
        raise ZImageError("this input is not a CONDITIONING", where=f"sampler input '{input_name}'",
                          fix="connect a text-encode node's output.")
    if len(cond) > 1:
        raise ZImageError("combined or area conditioning is not supported", where=f"sampler input '{input_name}'",
                          expected="one prompt's conditioning", found=f"{len(cond)} entries",
                          fix="connect a single text-encode output.")
    feats, extra = cond[0][0], cond[0][1] if len(cond[0]) > 1 else {}
    if feats.ndim != 3 or feats.shape[0] != 1:
        raise ZImageError("the conditioning has an unexpected shape", where=f"sampler input '{input_name}'",
                          expected="[1, tokens, width]", found=str(list(feats.shape)),
                          fix="connect one prompt's conditioning, not a batch.")
    feats = feats[0]
    mask = extra.get("attention_mask") if isinstance(extra, dict) else None
    if mask is not None:  # ComfyUI's native text encoders pad; keep the prompt's own tokens
        feats = feats[mask.reshape(-1)[: feats.shape[0]].bool()]
    return feats
