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
    # The token table may stay in host memory (a streamed encoder): look the rows up where it
    # is and bring only them to the device the layers run on.
    table = text_encoder.embed_tokens.weight
    device = text_encoder.norm.weight.device
    ids = torch.tensor([token_ids(tokenizer, prompt)], device=table.device)
    embeds = text_encoder.embed_tokens(ids).to(device)
    mask = torch.ones(ids.shape, dtype=torch.bool, device=device)
    out = text_encoder(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    return out.hidden_states[-2][0]
