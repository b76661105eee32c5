"""Building the three Z-Image components on the meta device and filling them from files.

Every tensor the model expects must be in the file with the expected shape: diffusers'
`from_single_file` would silently leave a missing one randomly initialised. Tensors are
assigned straight from the file mapping (`load_state_dict(assign=True)`), so a bf16 file
loaded as bf16 costs no copy in RAM; other dtypes (fp8 files) are converted tensor by tensor.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from . import key_names, model_detection
from .errors import ZImageError
from .fused_norms import use_fused_norms, use_plain_norms
from .group_norm import use_spread_group_norms
from .modulation import use_fused_modulation, use_plain_modulation
from .real_rope import use_complex_rope, use_real_rope
from .silu_gate import use_fused_gate, use_plain_gate
from .tile_blend import use_one_pass_blends
from .weight_source import WeightSource

Resolver = Callable[[str], tuple[str, Callable[[torch.Tensor], torch.Tensor]]]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class LoadedComponent:
    module: nn.Module
    config: dict
    path: str
    layout: str  # "diffusers" or "original"
    source_dtype: str


def _diffusers_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def _component_folder(path: str, sub: str) -> str | None:
    """The component folder of a diffusers layout (`model/sub` or `sub` itself), else None."""
    if os.path.isdir(os.path.join(path, sub)):
        return os.path.join(path, sub)
    if os.path.isdir(path):
        return path
    return None


def _fill(module: nn.Module, src: WeightSource, resolve: Resolver, dtype: torch.dtype, fix: str) -> None:
    # Shapes are checked from the file header before any tensor is taken, so a bad file fails
    # with nothing read and nothing held.
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    names, missing, misshaped = {}, [], []
    for key, shape in expected.items():
        name, transform = resolve(key)
        if name not in src:
            missing.append(name)
            continue
        got = tuple(transform(torch.empty(src.shapes_of(name), device="meta")).shape)
        if got != shape:
            misshaped.append(f"{name} is {list(got)}, expected {list(shape)}")
            continue
        names[key] = (name, transform)
    if missing:
        raise ZImageError(f"{len(missing)} tensor(s) the model needs are missing from the {src.role}",
                          where=src.where, expected=f"{len(expected)} tensors",
                          found=f"none named {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}",
                          fix=fix)
    if misshaped:
        raise ZImageError(f"{len(misshaped)} tensor(s) of the {src.role} have the wrong shape", where=src.where,
                          found="; ".join(misshaped[:3]) + (" ..." if len(misshaped) > 3 else ""), fix=fix)
    state = {}
    for key, (name, transform) in names.items():
        t = transform(src.get(name))
        scale = _scale_of(src, name)
        state[key] = t.to(dtype) if scale is None else (t.to(torch.float32) * scale).to(dtype)
    module.load_state_dict(state, strict=True, assign=True)


def _scale_of(src: WeightSource, name: str) -> torch.Tensor | None:
    # ComfyUI's scaled-fp8 files store a per-tensor scale beside each fp8 weight.
    if name.endswith(".weight") and name[:-len("weight")] + "scale_weight" in src:
        return src.get(name[:-len("weight")] + "scale_weight").to(torch.float32)
    return None


def _finish(module: nn.Module, what: str) -> nn.Module:
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:  # a bug in the pack, not in the user's file
        raise RuntimeError(f"{what}: {left[:3]} were not filled")
    return module.eval().requires_grad_(False)


def _source_dtype(src: WeightSource) -> str:
    dtypes = {str(src.dtype(k)).replace("torch.", "") for k in src.keys()}
    return "/".join(sorted(dtypes))


def load_transformer(path: str, dtype: torch.dtype = torch.bfloat16) -> LoadedComponent:
    from diffusers import ZImageTransformer2DModel

    folder = _component_folder(path, "transformer")
    src = WeightSource.open(folder or path, "Z-Image transformer")
    try:
        keys = src.keys()
        fix = ("put the Z-Image-Turbo transformer (z_image_turbo_bf16.safetensors or its fp8_e4m3fn "
               "variant) in models/diffusion_models and pick it.")
        if model_detection.identify(keys) != "a Z-Image transformer":
            raise model_detection.wrong_family(src.where, "transformer", "a Z-Image transformer", keys, fix)
        original = "all_x_embedder.2-1.weight" not in src
        prefix = next((p for p in key_names.TRANSFORMER_PREFIXES if p + "cap_embedder.1.weight" in src), "")

        def resolve(key: str):
            if not original:
                return key, _same
            name, chunk = key_names.transformer_original_name(key)
            if chunk is None:
                return prefix + name, _same
            return prefix + name, lambda t, c=chunk: t.chunk(3, dim=0)[c]

        size = model_detection.transformer_size(src.where, src.shapes, lambda k: resolve(k)[0])
        config = size.diffusers_config()
        if folder:
            config.update({k: v for k, v in _diffusers_config(folder).items()
                           if k in ("rope_theta", "t_scale", "axes_lens", "norm_eps", "qk_norm")})
        with torch.device("meta"):
            module = ZImageTransformer2DModel(**config)
        _fill(module, src, resolve, dtype, fix)
        use_pack_forwards(module)
        return LoadedComponent(_finish(module, "transformer"), config, src.where,
                               "original" if original else "diffusers", _source_dtype(src))
    finally:
        src.close()


def use_pack_forwards(transformer: nn.Module) -> None:
    """The transformer's norms, modulation, feed-forward gate and RoPE through the pack's kernels."""
    use_fused_norms(transformer)
    use_fused_modulation(transformer)
    use_fused_gate(transformer)
    use_real_rope(transformer)


def use_diffusers_forwards(transformer: nn.Module) -> None:
    """Undo use_pack_forwards: diffusers' code as it ships (the benchmarks' diffusers rows)."""
    use_plain_norms(transformer)
    use_plain_modulation(transformer)
    use_plain_gate(transformer)
    use_complex_rope(transformer)


def load_text_encoder(path: str, dtype: torch.dtype = torch.bfloat16) -> LoadedComponent:
    from transformers import Qwen3Config, Qwen3Model

    folder = _component_folder(path, "text_encoder")
    src = WeightSource.open(folder or path, "text encoder")
    try:
        keys = src.keys()
        fix = "put Qwen3-4B (qwen_3_4b.safetensors) in models/text_encoders and pick it."
        if model_detection.identify(keys) != "a Qwen3/LLaMA-style text encoder":
            raise model_detection.wrong_family(src.where, "text encoder", "the Qwen3-4B text encoder", keys, fix)
        prefix = key_names.TEXT_ENCODER_PREFIX if key_names.TEXT_ENCODER_PREFIX + "embed_tokens.weight" in src else ""
        config = model_detection.text_encoder_config(src.where, src.shapes, prefix)
        if "layers.0.self_attn.q_norm.weight" not in {k[len(prefix):] for k in keys}:
            raise ZImageError("this text encoder is not Qwen3", where=src.where,
                              expected="Qwen3 attention with q/k norms", found="no q_norm tensors (Qwen2/LLaMA?)",
                              fix=fix)
        qcfg = Qwen3Config(**config)
        with torch.device("meta"):
            module = Qwen3Model(qcfg)
        _fill(module, src, lambda k: (prefix + k, _same), dtype, fix)
        # Rotary frequencies are a non-persistent buffer: not in any file, so rebuilt here.
        module.rotary_emb = type(module.rotary_emb)(config=qcfg)
        return LoadedComponent(_finish(module, "text encoder"), config, src.where,
                               "original" if prefix else "diffusers", _source_dtype(src))
    finally:
        src.close()


def load_vae(path: str, dtype: torch.dtype = torch.float32) -> LoadedComponent:
    from diffusers import AutoencoderKL

    folder = _component_folder(path, "vae")
    src = WeightSource.open(folder or path, "VAE")
    try:
        keys = src.keys()
        fix = "put the Flux VAE (ae.safetensors) in models/vae and pick it."
        if model_detection.identify(keys) != "a VAE":
            raise model_detection.wrong_family(src.where, "VAE", "a VAE", keys, fix)
        original = "encoder.down.0.block.0.conv1.weight" in src
        config = model_detection.vae_config(src.where, src.shapes, original)
        levels = len(config["block_out_channels"])

        def resolve(key: str):
            if not original:
                return key, _same
            name, attn = key_names.vae_original_name(key, levels)
            return name, (lambda t: t.reshape(t.shape[0], -1)) if attn else _same

        with torch.device("meta"):
            module = AutoencoderKL(**config)
        _fill(module, src, resolve, dtype, fix)
        use_spread_group_norms(module)
        use_one_pass_blends(module)
        return LoadedComponent(_finish(module, "VAE"), config, src.where,
                               "original" if original else "diffusers", _source_dtype(src))
    finally:
        src.close()
