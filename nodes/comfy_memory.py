"""Telling ComfyUI's model management what the pack holds on the GPU, through its public objects.

A `ZImageMemory` object has the methods ComfyUI's `LoadedModel` calls on a ModelPatcher. Before
each sampler run it is passed to `comfy.model_management.load_models_gpu`, which first frees
room for the run's planned peak (unloading ComfyUI's own models if needed) and then lists it
among the loaded models. From then on ComfyUI's own decisions reach the pack: when another
model needs the room, or the user presses "free model memory" (`/free` with unload_models),
ComfyUI calls `detach`/`partially_unload`, and the pack releases its GPU copies. No ComfyUI
function is patched.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from ..loaders.runtime import ZImagePipelineParts


class ZImageTurbo(nn.Module):
    """What ComfyUI sees as the 'real model' ("Requested to load ZImageTurbo" in its log): it
    watches it with a weakref finalizer, so it lives exactly as long as the loaded parts do."""


class ZImageMemory:
    def __init__(self, parts: ZImagePipelineParts):
        self._parts = weakref.ref(parts)
        self.load_device = parts.runtime.device
        self.offload_device = torch.device("cpu")
        self.parent = None
        self.model = ZImageTurbo()

    # sizes, as ComfyUI's LoadedModel asks for them
    def model_size(self) -> int:
        parts = self._parts()
        return 0 if parts is None else parts.runtime.plan.peak_bytes

    def loaded_size(self) -> int:
        parts = self._parts()
        return 0 if parts is None else parts.transformer.gpu_bytes

    def current_loaded_device(self) -> torch.device:
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    def model_dtype(self) -> torch.dtype:
        parts = self._parts()
        return torch.bfloat16 if parts is None else parts.runtime.dtype

    # loading is the pack's own business (planner and streamer): nothing to do here
    def model_patches_to(self, device) -> None:
        pass

    def model_patches_models(self) -> list:
        return []

    def is_clone(self, other) -> bool:
        return other is self

    def lowvram_patch_counter(self) -> int:
        return 0

    def partially_load(self, device, extra_memory, force_patch_weights: bool = False) -> int:
        return 0

    # unloading: ComfyUI wants the memory back
    def partially_unload(self, device, memory_to_free: int = 0) -> int:
        freed = self.loaded_size()
        self.detach()
        return freed

    def detach(self, unpatch_all: bool = True) -> None:
        parts = self._parts()
        if parts is not None:
            parts.release()


_registered: "weakref.WeakKeyDictionary[ZImagePipelineParts, ZImageMemory]" = weakref.WeakKeyDictionary()


def make_room(parts: ZImagePipelineParts) -> None:
    """Before a sampler run: ask ComfyUI for the run's planned peak and list the pack's memory
    with its loaded models. Outside ComfyUI it does nothing."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    proxy = _registered.get(parts)
    if proxy is None:
        proxy = _registered[parts] = ZImageMemory(parts)
    mm.load_models_gpu([proxy])
