"""Activations hopping between GPUs when the transformer's blocks are split over several.

Each block (and the final layer) gets a forward pre-hook that brings its tensor inputs to the
device its weights are on. The inputs the forward passes to every layer unchanged (attention
mask, rotary table, timestep embedding) are copied to each device once per forward, not once per
layer; the hidden states, which change at every block, hop only where the device changes.
"""
from __future__ import annotations

import torch
from torch import nn


class DeviceHops:
    def __init__(self, transformer: nn.Module, module_device: dict[str, torch.device]):
        """`module_device`: submodule name -> the device its weights are on."""
        # (id of the original, device) -> (the original, its copy): holding the original keeps its
        # id from being reused by another tensor within the forward
        self._cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [transformer.register_forward_pre_hook(lambda m, a: self._cache.clear())]
        for name, dev in module_device.items():
            self._handles.append(transformer.get_submodule(name).register_forward_pre_hook(
                self._hook(torch.device(dev)), with_kwargs=True))
        self.hops = 0  # tensors moved to another device since attach (for tests and reports)

    def _hook(self, device: torch.device):
        def move(t):
            if not isinstance(t, torch.Tensor) or t.device == device:
                return t
            key = (id(t), device)
            if key not in self._cache:
                self._cache[key] = (t, t.to(device, non_blocking=True))
                self.hops += 1
            return self._cache[key][1]

        def pre_hook(module, args, kwargs):
            return tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}
        return pre_hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()
