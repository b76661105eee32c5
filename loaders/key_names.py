"""Where each diffusers tensor lives in ComfyUI's single files (original key names).

One direction only, diffusers name -> original name: loading looks up each tensor the model
expects, and the test fixture writes original files by renaming, so both use this table.
"""
from __future__ import annotations

import re

# Original Z-Image names (ComfyUI's NextDiT) for the parts diffusers renamed.
_TRANSFORMER_RENAMES = (
    ("all_final_layer.2-1.", "final_layer."),
    ("all_x_embedder.2-1.", "x_embedder."),
    (".attention.to_out.0.", ".attention.out."),
    (".attention.norm_q.", ".attention.q_norm."),
    (".attention.norm_k.", ".attention.k_norm."),
)
_QKV = {".attention.to_q.weight": 0, ".attention.to_k.weight": 1, ".attention.to_v.weight": 2}
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")


def transformer_original_name(key: str) -> tuple[str, int | None]:
    """(original key, chunk) for a diffusers transformer key; chunk i of 3 for the fused qkv."""
    for suffix, chunk in _QKV.items():
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".attention.qkv.weight", chunk
    for new, old in _TRANSFORMER_RENAMES:
        key = key.replace(new, old)
    return key, None


def vae_original_name(key: str, levels: int) -> tuple[str, bool]:
    """(original key, is_attention_matrix) for a diffusers AutoencoderKL key (Flux/LDM layout).

    The original VAE stores mid-block attention projections as 1x1 convolutions
    ([C, C, 1, 1]); diffusers uses linear layers ([C, C]).
    """
    k = key
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", k)
    k = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.",
               lambda m: f"decoder.up_blocks.{levels - 1 - int(m.group(1))}.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.\1.block.", k)
    k = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.\1.upsample.", k)
    k = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m.group(1)) + 1}.", k)
    attention = ".mid_block.attentions.0." in k
    if attention:
        k = k.replace(".mid_block.attentions.0.", ".mid.attn_1.")
        for new, old in (("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."),
                         ("to_out.0.", "proj_out.")):
            k = k.replace("attn_1." + new, "attn_1." + old)
    k = k.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
    return k, attention and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight"))


TEXT_ENCODER_PREFIX = "model."  # qwen_3_4b.safetensors: Qwen3ForCausalLM names, no lm_head
