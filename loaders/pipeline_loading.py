"""Loading all three components for a device and VRAM budget: the one entry point the loader
node and the command line share."""
from __future__ import annotations

import os

import torch

from . import component_loading
from .errors import ZImageError
from .fp8_matmul import check_supported
from .host_cache import HOST_CACHE, source_key
from .model_sizes import ModelSizes
from .placement import GiB, Matmul, Storage, available_host_bytes, packs_weights, plan_devices
from .runtime import Runtime, TextEncoderHandle, TransformerHandle, VAEHandle, ZImagePipelineParts, free_device_cache
from .tokenizer import load_tokenizer, tokenizer_folder


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def load_parts(model: str, text_encoder: str | None = None, vae: str | None = None, vram_budget_gb: float = 0.0,
               device: torch.device | str | None = None, dtype: torch.dtype | None = None,
               comfy_tokenizer: str | None = None, ram_budget_gb: float = 0.0,
               storage: Storage | str = Storage.BF16, matmul: Matmul | str = Matmul.BF16,
               devices: list[str] | None = None, vram_budgets_gb: list[float] | None = None) -> ZImagePipelineParts:
    """Open the transformer `model` (a single file or a diffusers folder), the text encoder and the
    VAE (None = from the diffusers folder `model`), and plan them for `device` and the budget, or
    for several GPUs (`devices`, each with its budget in `vram_budgets_gb`; 0 = automatic).

    Weights stay memory-mapped on the CPU here; GPU copies are made when a step first needs them.
    """
    if devices and len(devices) > 1:
        device = devices[0]
        vram_budgets_gb = list(vram_budgets_gb or [vram_budget_gb] * len(devices))
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or torch.bfloat16
    matmul = Matmul(matmul)
    if matmul == Matmul.FP8:
        for d in devices or [device]:
            check_supported(torch.device(d))
    # fp16 VAE decodes overflow to NaN (black images); bf16 is as fast on GPUs, fp32 on CPUs.
    vae_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for role, path in (("text encoder", text_encoder), ("VAE", vae)):
        if path is None and not os.path.isdir(model):
            raise ZImageError(f"no {role} was given", where=model,
                              expected=f"a {role} file, or a diffusers model folder that contains one",
                              found="a single transformer file",
                              fix=f"pick the {role} file ({'qwen_3_4b' if role == 'text encoder' else 'ae'}"
                                  ".safetensors) in the loader.")
    t = te = v = tok = None
    try:
        t = _recent("transformer", model, dtype) or component_loading.load_transformer(model, dtype)
        te = _recent("text_encoder", text_encoder or model, dtype) or component_loading.load_text_encoder(
            text_encoder or model, dtype)
        v = _recent("vae", vae or model, vae_dtype) or component_loading.load_vae(vae or model, vae_dtype)
        if te.config["hidden_size"] != t.config["cap_feat_dim"]:
            raise ZImageError("the text encoder does not fit the transformer", where=te.path,
                              expected=f"hidden size {t.config['cap_feat_dim']} (the transformer's caption width)",
                              found=f"hidden size {te.config['hidden_size']}",
                              fix="use the text encoder that belongs to this transformer (qwen_3_4b.safetensors).")
        tok = load_tokenizer(comfy_tokenizer or tokenizer_folder(model if os.path.isdir(model) else text_encoder))
        packed = packs_weights(storage, matmul)
        sizes = ModelSizes.of(t.module, te.module, v.module, dtype, vae_dtype, packed=packed, work_device=device)
        if packed:
            free_device_cache(device)  # the counting's work memory: nothing of this load stays on the GPU
        # RAM the process's host cache already holds is RAM an automatic budget may count on: a
        # reload of these files finds its pinned copies there.
        free_host = available_host_bytes() + HOST_CACHE.nbytes
        # Shown by the loader; the sampler re-plans for its own resolution and batch.
        several = bool(devices) and len(devices) > 1
        plan = plan_devices(sizes, list(devices) if several else [str(device)],
                            list(vram_budgets_gb) if several else [vram_budget_gb], ram_budget_gb, storage=storage,
                            matmul=matmul, free_host_bytes=free_host)
    except BaseException:
        # The traceback keeps this frame alive (ComfyUI shows it); drop what was loaded so the
        # failed load holds no weights or file mappings.
        t = te = v = tok = None
        raise
    _remember({"transformer": (model, dtype, t), "text_encoder": (text_encoder or model, dtype, te),
               "vae": (vae or model, vae_dtype, v)})
    # "Automatic" is resolved once, here: asked again later, free VRAM would exclude what the
    # pack itself then holds, and each re-plan would shrink.
    rt = Runtime(device, dtype, vae_dtype, sizes, plan.budget_bytes / GiB if device.type == "cuda" else vram_budget_gb,
                 plan.host_budget_bytes / GiB if device.type == "cuda" else ram_budget_gb, Storage(storage), plan,
                 matmul=matmul, devices=tuple(plan.devices) if plan.device_plans else (),
                 vram_budgets_gb=tuple(p.budget_bytes / GiB for p in plan.device_plans))
    return ZImagePipelineParts(TransformerHandle(t, rt), TextEncoderHandle(te, rt, tok), VAEHandle(v, rt), rt)


# The components of the last successful load, for a load of the same files (ComfyUI runs the loader
# again when one of its inputs changes; a model switched away from and back): opening them again
# costs ~0.25 s of module building on a fast CPU. Only memory-mapped ones are kept (an fp8 file's
# upcast copy would hold its RAM), and only one load's worth, so files are not held open for long.
_RECENT: dict[str, tuple[tuple, component_loading.LoadedComponent]] = {}


def _key(path: str, dtype: torch.dtype) -> tuple | None:
    try:
        return source_key(path), str(dtype)
    except OSError:  # a missing file: the loader itself says what to do about it
        return None


def _recent(kind: str, path: str, dtype: torch.dtype) -> component_loading.LoadedComponent | None:
    hit, key = _RECENT.get(kind), _key(path, dtype)
    return hit[1] if hit is not None and key is not None and hit[0] == key else None


def _remember(loaded: dict[str, tuple]) -> None:
    _RECENT.clear()
    for kind, (path, dtype, component) in loaded.items():
        if "float8" not in component.source_dtype:
            _RECENT[kind] = (_key(path, dtype), component)
