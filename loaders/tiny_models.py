"""Tiny random-weight Z-Image models written as real files, in both layouts the pack loads.

Used by the tests and by the command-line demo when no real weights are present. Sizes are
FACTS.md's tiny configs: they run through exactly the code path of the full-size files.
"""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

from . import key_names
from .model_detection import SCAFFOLD, scaffold_config

TINY_TRANSFORMER = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
                        axes_dims=[8, 12, 12], axes_lens=[1536, 512, 512])
TINY_TEXT_ENCODER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=16, intermediate_size=64, vocab_size=151936)
TINY_VAE = dict(block_out_channels=[32, 32, 32, 32], layers_per_block=1, norm_num_groups=32)

COMFY_NAMES = {"transformer": "diffusion_models/z_image_tiny_bf16.safetensors",
               "transformer_fp8": "diffusion_models/z_image_tiny_fp8_e4m3fn.safetensors",
               "text_encoder": "text_encoders/qwen_3_tiny.safetensors",
               "vae": "vae/ae_tiny.safetensors"}


def _init_(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Random init that stays finite: matrices N(0, 0.02), norms 1, biases 0, pad tokens 1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "pad_token" in name or (p.ndim == 1 and "norm" in name):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                p.zero_()


def build_modules(seed: int = 0):
    """(transformer, text encoder, VAE) as float32 modules with tiny random weights."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    gen = torch.Generator().manual_seed(seed)
    tcfg = scaffold_config("transformer") | TINY_TRANSFORMER
    transformer = ZImageTransformer2DModel(**tcfg)
    _init_(transformer, gen)
    qcfg = Qwen3Config(**(scaffold_config("text_encoder") | TINY_TEXT_ENCODER))
    text_encoder = Qwen3Model(qcfg)
    _init_(text_encoder, gen)
    levels = len(TINY_VAE["block_out_channels"])
    vcfg = scaffold_config("vae") | TINY_VAE | dict(down_block_types=["DownEncoderBlock2D"] * levels,
                                                     up_block_types=["UpDecoderBlock2D"] * levels)
    torch.manual_seed(seed)  # the VAE keeps PyTorch's default init: its convolutions need it
    vae = AutoencoderKL(**vcfg)
    for m in (transformer, text_encoder, vae):
        m.eval().requires_grad_(False)
    return transformer, text_encoder, vae


def _state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in module.state_dict().items()}


def original_transformer_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers names -> ComfyUI's single-file names, q/k/v fused back into one qkv."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, list] = {}
    for k, v in state.items():
        name, chunk = key_names.transformer_original_name(k)
        if chunk is None:
            out[name] = v
        else:
            qkv.setdefault(name, [None] * 3)[chunk] = v
    for name, parts in qkv.items():
        out[name] = torch.cat(parts, dim=0)
    return out


def original_vae_state(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        name, attn = key_names.vae_original_name(k, levels)
        out[name] = v.reshape(*v.shape, 1, 1) if attn else v
    return out


def write_byte_tokenizer(folder: str) -> None:
    """A byte-level BPE tokenizer with Qwen's special tokens: enough for a random demo model."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    os.makedirs(folder, exist_ok=True)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<|endoftext|>",
                   "model_max_length": 512}, f)


def write_tiny_models(root: str, tokenizer_dir: str | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Write a diffusers folder (`root/diffusers`) and ComfyUI single files (`root/comfy/...`).

    `tokenizer_dir` (vocab.json + merges.txt, or tokenizer.json) is copied into the diffusers
    folder's tokenizer/; without one a byte-level tokenizer is written. Returns the paths.
    """
    transformer, text_encoder, vae = build_modules(seed)
    d = os.path.join(root, "diffusers")
    for sub in ("transformer", "text_encoder", "vae", "scheduler"):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    shutil.copy(os.path.join(SCAFFOLD, "model_index.json"), d)
    shutil.copy(os.path.join(SCAFFOLD, "scheduler", "scheduler_config.json"), os.path.join(d, "scheduler"))
    with open(os.path.join(d, "transformer", "config.json"), "w") as f:
        json.dump({"_class_name": "ZImageTransformer2DModel", **dict(transformer.config)}, f, indent=1)
    with open(os.path.join(d, "vae", "config.json"), "w") as f:
        json.dump({"_class_name": "AutoencoderKL", **dict(vae.config)}, f, indent=1)
    text_encoder.config.to_json_file(os.path.join(d, "text_encoder", "config.json"))
    t_state, te_state, v_state = _state(transformer, dtype), _state(text_encoder, dtype), _state(vae, torch.float32)
    save_file(t_state, os.path.join(d, "transformer", "diffusion_pytorch_model.safetensors"))
    save_file(te_state, os.path.join(d, "text_encoder", "model.safetensors"))
    save_file(v_state, os.path.join(d, "vae", "diffusion_pytorch_model.safetensors"))
    tok = os.path.join(d, "tokenizer")
    if tokenizer_dir:
        shutil.copytree(tokenizer_dir, tok, dirs_exist_ok=True)
    else:
        write_byte_tokenizer(tok)
        # say so in model_index.json too, so diffusers' from_pretrained builds the right class
        with open(os.path.join(d, "model_index.json")) as f:
            index = json.load(f)
        index["tokenizer"] = ["transformers", "PreTrainedTokenizerFast"]
        with open(os.path.join(d, "model_index.json"), "w") as f:
            json.dump(index, f, indent=1)

    c = os.path.join(root, "comfy")
    paths = {k: os.path.join(c, v) for k, v in COMFY_NAMES.items()}
    for p in paths.values():
        os.makedirs(os.path.dirname(p), exist_ok=True)
    orig = original_transformer_state(t_state)
    save_file(orig, paths["transformer"])
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in orig.items()}
    save_file(fp8, paths["transformer_fp8"])
    save_file({key_names.TEXT_ENCODER_PREFIX + k: v for k, v in te_state.items()}, paths["text_encoder"])
    save_file(original_vae_state(v_state, len(TINY_VAE["block_out_channels"])), paths["vae"])
    paths["diffusers"] = d
    return paths
