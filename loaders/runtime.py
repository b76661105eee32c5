"""The loaded model as the nodes pass it around: three handles sharing one device and plan.

Each handle keeps its component memory-mapped on the CPU and hands out a module on the run's
device for the duration of a `with handle.on_device()` block, according to the plan.
"""
from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .component_loading import LoadedComponent
from .placement import ComponentPlan, Placement, device_copy


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype  # compute dtype of transformer and text encoder
    vae_dtype: torch.dtype
    plan: ComponentPlan


class ComponentHandle:
    def __init__(self, name: str, component: LoadedComponent, runtime: Runtime, dtype: torch.dtype):
        self.name, self.component, self.runtime, self.dtype = name, component, runtime, dtype
        self._resident: nn.Module | None = None

    @property
    def placement(self) -> Placement:
        return getattr(self.runtime.plan, self.name)

    @contextmanager
    def on_device(self) -> Iterator[nn.Module]:
        device = self.runtime.device
        if self.placement == Placement.CPU:
            yield self.component.module
            return
        if self.placement == Placement.RESIDENT:
            if self._resident is None:
                self._resident = device_copy(self.component.module, device, self.dtype)
            yield self._resident
            return
        module = device_copy(self.component.module, device, self.dtype)
        try:
            yield module
        finally:
            del module
            free_device_cache(device)

    def release(self) -> None:
        """Free this component's GPU copy (ComfyUI's 'free model memory' and failures call this)."""
        self._resident = None
        free_device_cache(self.runtime.device)

    @property
    def gpu_bytes(self) -> int:
        if self._resident is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._resident.state_dict().values())


def free_device_cache(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class TextEncoderHandle(ComponentHandle):
    """The text encoder plus its tokenizer and a small cache: an unchanged prompt is not encoded again."""

    CACHE_SIZE = 16

    def __init__(self, component: LoadedComponent, runtime: Runtime, tokenizer):
        super().__init__("text_encoder", component, runtime, runtime.dtype)
        self.tokenizer = tokenizer
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encodes = 0  # how many prompts really ran through the encoder

    def encode(self, prompt: str) -> torch.Tensor:
        """[tokens, hidden] caption features on the CPU, in the compute dtype."""
        from .text_encoding import encode_prompt

        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        with self.on_device() as te:
            feats = encode_prompt(te, self.tokenizer, prompt).to("cpu")
        self.encodes += 1
        self._cache[prompt] = feats
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return feats


@dataclass
class ZImagePipelineParts:
    transformer: ComponentHandle
    text_encoder: TextEncoderHandle
    vae: ComponentHandle
    runtime: Runtime

    def release(self) -> None:
        for h in (self.transformer, self.text_encoder, self.vae):
            h.release()
