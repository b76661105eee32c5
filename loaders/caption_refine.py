"""Z-Image's context refiner once per caption instead of once per step.

Its blocks see the caption's tokens only: no timestep modulation, no image tokens (diffusers'
ZImageTransformer2DModel.forward runs them between the caption's embedding and the joint layers).
So their output is the same at every step of a run, and in every run with the same conditioning.
The first call computes it, through diffusers' own forward; every later call replays it, bit for
bit what the blocks would have returned. The denoise loop then neither holds nor streams their
weights per step: two of 34 blocks, 0.71 GB of bf16.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .placement import ONCE_PER_CAPTION


def refiner_blocks(transformer: nn.Module) -> list[nn.Module]:
    return [transformer.get_submodule(f"{ONCE_PER_CAPTION}{i}")
            for i in range(len(transformer.get_submodule(ONCE_PER_CAPTION.rstrip("."))))]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)


class RefinedCaptions:
    """The refiner's output for the last caption batch (a few MB on the GPU), with a copy of the
    caption features it came from: an unchanged conditioning finds it, whatever tensor object
    carries it; one changed in place does not. (A copy, not version counters: ComfyUI runs nodes in
    inference mode, whose tensors have none.)"""

    def __init__(self):
        self._key: tuple | None = None
        self.value: torch.Tensor | None = None

    def find(self, captions: Sequence[torch.Tensor], layout) -> torch.Tensor | None:
        if self._key is None:
            return None
        kept_layout, kept = self._key
        if kept_layout != layout or len(kept) != len(captions):
            return None
        if any(not _same(a, b) for a, b in zip(kept, captions)):
            return None
        return self.value

    def keep(self, captions: Sequence[torch.Tensor], layout, value: torch.Tensor) -> None:
        copies = {id(c): c.detach().clone() for c in captions}  # a batch repeats its captions
        self._key, self.value = (layout, tuple(copies[id(c)] for c in captions)), value

    def clear(self) -> None:
        self._key, self.value = None, None


@contextmanager
def once_per_caption(transformer: nn.Module, captions: Sequence[torch.Tensor] | None, cache: RefinedCaptions,
                     layout=None) -> Iterator[bool]:
    """For the `with` block: the context refiner's blocks replay `cache`'s output for `captions` (the
    caption features of the batch the transformer is called with, in order), computing it at the
    first call when the cache has none. Yields whether this run computes it. Without `captions`
    (a caller that does not say) the blocks run at every call."""
    if captions is None:
        yield True
        return
    blocks = refiner_blocks(transformer)
    found = cache.find(captions, layout)

    def replay(feats: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if feats.shape != cache.value.shape:  # a caller passing other captions than it declared
            raise RuntimeError(f"context refiner replay: captions of shape {list(feats.shape)}, "
                               f"refined ones {list(cache.value.shape)}")
        return cache.value

    handle = None
    if found is None and blocks:
        def capture(module, args, output):
            cache.keep(captions, layout, output)
            for b in blocks:
                b.forward = replay
            handle.remove()
        handle = blocks[-1].register_forward_hook(capture)
    else:
        for b in blocks:
            b.forward = replay
    try:
        yield found is None
    finally:
        if handle is not None:
            handle.remove()
        for b in blocks:
            b.__dict__.pop("forward", None)
