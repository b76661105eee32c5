"""Attention backends: what the user may ask for, whether this machine has it, and applying it
to one model only.

The choice is written on the model's own attention processors (`_attention_backend`), which
diffusers' dispatcher prefers over its process-wide default, and restored afterwards, so two
workflows in one ComfyUI process never see each other's choice.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum

import torch
from torch import nn

from . import fp8_attention
from .errors import ZImageError
from .packages import why_missing


class AttentionBackend(str, Enum):
    AUTO = "auto"
    SDPA = "sdpa"
    SDPA_FLASH = "sdpa_flash"
    SDPA_CUDNN = "sdpa_cudnn"
    SDPA_EFFICIENT = "sdpa_efficient"
    SDPA_MATH = "sdpa_math"
    FLEX = "flex"
    XFORMERS = "xformers"
    FLASH_ATTN = "flash_attn"
    SAGE = "sage"
    CUDNN_FP8 = "cudnn_fp8"  # the pack's own: cuDNN's fp8 attention (fp8_attention), Hopper GPUs

# The name of each backend in diffusers' attention dispatcher.
DIFFUSERS_NAME = {
    AttentionBackend.SDPA: "native",
    AttentionBackend.SDPA_FLASH: "_native_flash",
    AttentionBackend.SDPA_CUDNN: "_native_cudnn",
    AttentionBackend.SDPA_EFFICIENT: "_native_efficient",
    AttentionBackend.SDPA_MATH: "_native_math",
    AttentionBackend.FLEX: "flex",
    AttentionBackend.XFORMERS: "xformers",
    AttentionBackend.FLASH_ATTN: "flash",
    AttentionBackend.SAGE: "sage",
    AttentionBackend.CUDNN_FP8: "native",  # for what stays in bf16 (fp8_attention.fits)
}

# (import name, pip name, lowest version diffusers accepts)
_PACKAGES = {
    AttentionBackend.XFORMERS: ("xformers", "xformers", "0.0.29"),
    AttentionBackend.FLASH_ATTN: ("flash_attn", "flash-attn", "2.6.3"),
    AttentionBackend.SAGE: ("sageattention", "sageattention", "2.1.1"),
}
_NEEDS_CUDA = {AttentionBackend.SDPA_FLASH, AttentionBackend.SDPA_CUDNN, AttentionBackend.SDPA_EFFICIENT,
               AttentionBackend.XFORMERS, AttentionBackend.FLASH_ATTN, AttentionBackend.SAGE}

def why_unavailable(backend: AttentionBackend, device: torch.device) -> str | None:
    """None if `backend` can run on `device` here; otherwise the reason and how to fix it."""
    if backend in (AttentionBackend.AUTO, AttentionBackend.SDPA, AttentionBackend.SDPA_MATH):
        return None
    if backend == AttentionBackend.CUDNN_FP8:
        return fp8_attention.why_unavailable(device)
    if backend in _PACKAGES:
        reason = why_missing(*_PACKAGES[backend], note="(built for your torch and CUDA)")
        if reason:
            return reason
    if backend == AttentionBackend.FLEX and not hasattr(torch.nn.attention, "flex_attention"):
        try:
            importlib.import_module("torch.nn.attention.flex_attention")
        except ImportError:
            return f"flex attention needs torch >= 2.5 (this is {torch.__version__})"
    if backend in _NEEDS_CUDA and device.type != "cuda":
        return f"{backend.value} runs on NVIDIA GPUs only and this run is on {device.type}; pick sdpa"
    return None

def resolve(backend: AttentionBackend | str, device: torch.device) -> AttentionBackend:
    """The backend that will run: `auto` becomes a concrete choice; an unavailable one is an error."""
    backend = AttentionBackend(backend)
    if backend == AttentionBackend.AUTO:
        # Measured on an H100 (shared/FACTS.md): PyTorch's own SDPA choice is the fastest of the
        # SDPA variants for this model (1.52 s/image vs cudnn 1.57, flash 1.61); on CPU it is the
        # only sensible one.
        return AttentionBackend.SDPA
    reason = why_unavailable(backend, device)
    if reason:
        raise ZImageError(f"attention backend '{backend.value}' is not available", where="sampler input 'attention'",
                          found=reason.split(";")[0], fix=reason.split(";", 1)[-1].strip() + ".")
    return backend

def _processors(model: nn.Module) -> Iterator[object]:
    for m in model.modules():
        proc = getattr(m, "processor", None)
        if proc is not None and hasattr(type(proc), "_attention_backend"):
            yield proc

@contextmanager
def attention_backend(model: nn.Module, backend: AttentionBackend) -> Iterator[None]:
    """Run `model` with `backend` inside the block; the model's previous setting comes back after."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    name = AttentionBackendName(DIFFUSERS_NAME[backend])
    procs = list(_processors(model))
    before = [{k: p.__dict__.get(k, _UNSET) for k in _SET} for p in procs]
    for p in procs:
        p._attention_backend = name
        p._fp8_attention = backend == AttentionBackend.CUDNN_FP8  # read by real_rope's processor
    try:
        yield
    finally:
        for p, old in zip(procs, before):
            for k, v in old.items():
                if v is _UNSET:
                    p.__dict__.pop(k, None)
                else:
                    setattr(p, k, v)

_UNSET = object()
_SET = ("_attention_backend", "_fp8_attention")
