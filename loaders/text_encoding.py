"""Prompt -> caption features: Qwen3's second-to-last hidden state over the prompt's tokens."""
from __future__ import annotations

import torch
from torch import nn

from .tokenizer import token_ids


@torch.no_grad()
def encode_prompt(text_encoder: nn.Module, tokenizer, prompt: str) -> torch.Tensor:
    """[tokens, hidden] features on the encoder's device and in its dtype.

    The encoder is causal, so running the prompt unpadded gives the same features as the
    diffusers pipeline's padded batch with the padding masked off, minus the wasted work.
    """
    device = next(text_encoder.parameters()).device
    ids = torch.tensor([token_ids(tokenizer, prompt)], device=device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    out = text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-2][0]
