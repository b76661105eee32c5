"""What a weights file is, and the sizes of the model in it, read from tensor names and shapes.

As in ComfyUI's model detection, sizes come from the tensors; what tensors cannot tell (RoPE
axes and theta, time scale, shift, VAE scaling) comes from the pack's config scaffold.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .errors import ZImageError

SCAFFOLD = os.path.join(os.path.dirname(__file__), "scaffold")


def scaffold_config(component: str) -> dict:
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    with open(os.path.join(SCAFFOLD, component, name)) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


# Families a user might put in the wrong slot: (name, which folder it belongs in, test on keys).
_FAMILIES: tuple[tuple[str, str, Callable[[set[str]], bool]], ...] = (
    ("a Z-Image transformer", "models/diffusion_models",
     lambda k: _has(k, "cap_embedder.") and (_has(k, "noise_refiner.") or _has(k, "context_refiner."))),
    ("a Flux transformer", "models/diffusion_models",
     lambda k: _has(k, "double_blocks.") or _has(k, "single_transformer_blocks.")),
    ("an SDXL/SD UNet", "models/diffusion_models or models/checkpoints",
     lambda k: _has(k, "input_blocks.") or (_has(k, "down_blocks.") and _has(k, "conv_in.weight")
                                            and not _has(k, "decoder."))),
    ("a CLIP text encoder (CLIP-L/G)", "models/text_encoders (for SD/SDXL/Flux, not Z-Image)",
     lambda k: _has(k, "text_model.encoder.layers.") or _has(k, "text_projection")),
    ("a T5 text encoder", "models/text_encoders (for Flux/SD3, not Z-Image)",
     lambda k: _has(k, "encoder.block.") and _has(k, "shared.weight")),
    ("a Qwen3/LLaMA-style text encoder", "models/text_encoders",
     lambda k: _has(k, "layers.0.self_attn.q_proj.weight")),
    ("a VAE", "models/vae",
     lambda k: _has(k, "decoder.conv_in.weight") and _has(k, "encoder.conv_in.weight")),
)


def _has(keys: set[str], fragment: str) -> bool:
    return any(fragment in k for k in keys)


def identify(keys: Iterable[str]) -> str:
    """A human name for the model family of a key set ('an unknown model' if none fits)."""
    ks = set(keys)
    for name, _, test in _FAMILIES:
        if test(ks):
            return name
    return "an unknown model"


def _folder_of(name: str) -> str:
    return next(folder for fam, folder, _ in _FAMILIES if fam == name)


def wrong_family(path: str, slot: str, wanted: str, keys: Iterable[str], fix: str) -> ZImageError:
    found = identify(keys)
    known = found != "an unknown model"
    hint = f" It belongs in {_folder_of(found)}." if known else ""
    return ZImageError(f"this file is not {wanted}", where=path, expected=f"{wanted} for the {slot}",
                       found=found if known else f"{found} ({len(set(keys))} tensors)", fix=f"{fix}{hint}")


def _count(keys: Iterable[str], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


@dataclass(frozen=True)
class TransformerSize:
    dim: int
    n_layers: int
    n_refiner_layers: int
    n_heads: int
    cap_feat_dim: int
    in_channels: int
    patch_size: int

    def diffusers_config(self) -> dict:
        """The scaffold config with this file's sizes; RoPE axes follow the full model's split."""
        head_dim = self.dim // self.n_heads
        if head_dim % 8:
            raise ValueError(f"head size {head_dim} is not a multiple of 8; RoPE axes cannot be split")
        cfg = scaffold_config("transformer")
        cfg.update(dim=self.dim, n_layers=self.n_layers, n_refiner_layers=self.n_refiner_layers,
                   n_heads=self.n_heads, n_kv_heads=self.n_heads, cap_feat_dim=self.cap_feat_dim,
                   in_channels=self.in_channels, all_patch_size=[self.patch_size], all_f_patch_size=[1],
                   # head_dim x [1/4, 3/8, 3/8], the full model's [32, 48, 48] at head_dim 128
                   axes_dims=[head_dim // 4, head_dim * 3 // 8, head_dim * 3 // 8])
        return cfg


def transformer_size(path: str, shapes: dict[str, tuple[int, ...]], name: Callable[[str], str]) -> TransformerSize:
    """Sizes from a transformer's tensors. `name` maps a diffusers key to the file's key."""
    def shape(diffusers_key: str) -> tuple[int, ...]:
        k = name(diffusers_key)
        if k not in shapes:
            raise ZImageError("a Z-Image transformer tensor is missing", where=path, expected=f"tensor {k!r}",
                              found="no such tensor", fix="the file is incomplete or of another model: "
                              "use z_image_turbo_bf16.safetensors (or its fp8 variant).")
        return shapes[k]

    dim, patch_in = shape("all_x_embedder.2-1.weight")
    head_dim = shape("layers.0.attention.norm_q.weight")[0]
    qkv_rows = shape("layers.0.attention.to_q.weight")[0]
    cap_feat_dim = shape("cap_embedder.1.weight")[1]
    keys = list(shapes)
    prefix = name("layers.0.attention.norm_q.weight")[: -len("layers.0.attention.norm_q.weight")]
    n_layers = _count(keys, re.escape(prefix) + r"layers\.(\d+)\.")
    n_refiner = _count(keys, re.escape(prefix) + r"noise_refiner\.(\d+)\.")
    in_channels = patch_in // 4  # patch 2x2, frame patch 1: Z-Image's only configuration
    n_heads = dim // head_dim
    # The fused qkv of the original layout has 3x the rows; a diffusers to_q has dim rows.
    if qkv_rows not in (dim, 3 * dim):
        raise ZImageError("the attention shape is not Z-Image's", where=path,
                          expected=f"query/key/value projections of {dim} rows each (n_kv_heads = n_heads)",
                          found=f"{qkv_rows} rows", fix="use z_image_turbo_bf16.safetensors.")
    return TransformerSize(dim=dim, n_layers=n_layers, n_refiner_layers=n_refiner, n_heads=n_heads,
                           cap_feat_dim=cap_feat_dim, in_channels=in_channels, patch_size=2)


def text_encoder_config(path: str, shapes: dict[str, tuple[int, ...]], prefix: str) -> dict:
    """A Qwen3 config from the tensors; rope theta, eps and lengths from the scaffold."""
    def shape(k: str) -> tuple[int, ...]:
        if prefix + k not in shapes:
            raise ZImageError("a Qwen3 text-encoder tensor is missing", where=path,
                              expected=f"tensor {prefix + k!r}", found="no such tensor",
                              fix="use qwen_3_4b.safetensors in models/text_encoders.")
        return shapes[prefix + k]

    vocab, hidden = shape("embed_tokens.weight")
    head_dim = shape("layers.0.self_attn.q_norm.weight")[0]
    cfg = scaffold_config("text_encoder")
    cfg.update(vocab_size=vocab, hidden_size=hidden, head_dim=head_dim,
               num_hidden_layers=_count(shapes, re.escape(prefix) + r"layers\.(\d+)\."),
               num_attention_heads=shape("layers.0.self_attn.q_proj.weight")[0] // head_dim,
               num_key_value_heads=shape("layers.0.self_attn.k_proj.weight")[0] // head_dim,
               intermediate_size=shape("layers.0.mlp.gate_proj.weight")[0])
    return cfg


def vae_config(path: str, shapes: dict[str, tuple[int, ...]], original: bool) -> dict:
    """An AutoencoderKL config from the tensors (either key layout); scaling from the scaffold."""
    down = r"encoder\.down\.(\d+)\." if original else r"encoder\.down_blocks\.(\d+)\."
    levels = _count(shapes, down)
    block = "encoder.down.{}.block.0.conv1.weight" if original else "encoder.down_blocks.{}.resnets.0.conv1.weight"
    per_block = _count(shapes, r"encoder\.down\.0\.block\.(\d+)\." if original
                       else r"encoder\.down_blocks\.0\.resnets\.(\d+)\.")
    try:
        channels = [shapes[block.format(i)][0] for i in range(levels)]
        latent = shapes["decoder.conv_in.weight"][1]
    except KeyError as e:
        raise ZImageError("a VAE tensor is missing", where=path, expected=f"tensor {e.args[0]!r}",
                          found="no such tensor", fix="use the Flux VAE ae.safetensors in models/vae.") from None
    cfg = scaffold_config("vae")
    if latent != cfg["latent_channels"]:
        raise ZImageError("this VAE is not the Flux VAE Z-Image uses", where=path,
                          expected=f"{cfg['latent_channels']} latent channels", found=f"{latent} latent channels "
                          "(an SD/SDXL-style VAE)", fix="put the Flux VAE ae.safetensors in models/vae and pick it.")
    cfg.update(block_out_channels=channels, layers_per_block=per_block,
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    return cfg
