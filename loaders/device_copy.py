"""Copies of a module for the run's device, leaving the memory-mapped original untouched."""
from __future__ import annotations

import copy
from collections.abc import Callable
from enum import Enum

import torch
from torch import nn

from .file_reads import Prefetch, cached, copy_to_device, file_range
from .readahead import ahead


class Copy(str, Enum):
    DEVICE = "device"  # copied to the device
    PLACEHOLDER = "placeholder"  # an empty tensor on the device: a streamer fills it per call
    HOST = "host"  # the original tensor, left in host memory


def device_copy(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None,
                how: Callable[[str], Copy] = lambda name: Copy.DEVICE,
                device_of: Callable[[str], torch.device] | None = None) -> nn.Module:
    """A copy of `module` whose tensors are placed as `how(name)` says, on `device` or, with several
    GPUs, on `device_of(name)`.

    If copying fails half-way (out of memory), what was already copied is freed before the
    error goes on, so nothing is left behind on the GPU.
    """
    memo: dict[int, object] = {}
    try:
        named = list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False))
        todo, seen = [], set()
        for name, t in named:
            if id(t) in seen:
                continue
            seen.add(id(t))
            target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
            where = torch.device(device_of(name) if device_of is not None else device)
            mode = how(name)
            # bytes in the page cache that go to the device as they are in a safetensors file are
            # read from it by several threads through a pinned ring (file_reads); the rest is
            # copied out of the mapping, with a cold file read ahead in order by a Prefetch thread
            fr = file_range(t) if mode == Copy.DEVICE else None
            warm = fr is not None and cached(t)
            src = fr if warm and target == t.dtype else None
            todo.append((t, target, where, mode, src, fr, warm))
        reads: dict[torch.device, list] = {}
        mapped = [(t, fr, warm) for t, _, _, mode, src, fr, warm in todo if mode == Copy.DEVICE and src is None]
        copied = ahead(t for t, fr, _ in mapped if fr is None)
        spans = [(*fr, t.numel() * t.element_size()) for t, fr, _ in mapped if fr is not None]
        prefetch = Prefetch(spans) if any(fr is not None and not warm for _, fr, warm in mapped) else None
        try:
            for t, target, where, mode, src, fr, _ in todo:
                if mode == Copy.HOST:
                    moved = t
                elif mode == Copy.PLACEHOLDER:
                    moved = torch.empty(0, dtype=target, device=where)
                elif src is not None:
                    moved = torch.empty(t.shape, dtype=target, device=where)
                    reads.setdefault(where, []).append((moved, *src))
                else:
                    if fr is None:
                        next(copied, None)  # the disk reads ahead of the copy
                    moved = t.detach().to(device=where, dtype=target, copy=True)
                    if fr is not None and prefetch is not None:
                        prefetch.done(t.numel() * t.element_size())
                memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
        finally:
            if prefetch is not None:
                prefetch.close()
        for jobs in reads.values():
            copy_to_device(jobs)
        return copy.deepcopy(module, memo)
    except BaseException:
        memo.clear()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()  # every GPU's cache: memo held tensors on any of them
        raise
