"""Host copies of streamed blocks kept across runs and loads, least recently used dropped past
the RAM bound."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from torch import nn


def _block(width: int):
    from zimage_nodes.loaders.streaming import HostBlock

    return HostBlock("b", nn.Linear(width, width, bias=False), "bf16", True, torch.float32)


def test_least_recently_used_copies_go_first_and_the_bound_holds(pack):
    from zimage_nodes.loaders.host_cache import HostBlockCache

    one = _block(16).host_bytes
    cache = HostBlockCache(limit_bytes=3 * one)
    a = cache.get("a", lambda: _block(16))
    cache.get("b", lambda: _block(16))
    cache.get("c", lambda: _block(16))
    assert cache.get("a", lambda: pytest.fail("a was kept")) is a  # a is now the most recent
    cache.get("d", lambda: _block(16))  # over the bound: b, the least recently used, goes
    assert cache.nbytes <= 3 * one and cache.built == 4
    cache.get("b", lambda: _block(16))
    assert cache.built == 5  # b had to be made again; c went this time
    cache.get("a", lambda: pytest.fail("a was kept"))
    cache.set_limit(one)
    assert cache.nbytes <= one


def _pinned_plan(parts, host_gb=1.0):
    from zimage_nodes.loaders.placement import Where

    rt = parts.runtime
    rt.plan = dataclasses.replace(rt.plan, blocks=tuple((n, Where.PINNED) for n, _ in rt.plan.blocks),
                                  host_budget_bytes=int(host_gb * 2**30))
    rt.fixed_plan = True


def _sample(parts):
    from zimage_nodes.loaders.generation import denoise

    return denoise(parts, parts.text_encoder.encode("a fox"), None, torch.zeros(1, 16, 4, 4), seed=0, steps=1)[0]


def test_loading_the_same_file_again_reuses_its_host_copies(tiny, pack):
    from zimage_nodes.loaders.host_cache import HOST_CACHE
    from zimage_nodes.loaders.pipeline_loading import load_parts

    HOST_CACHE.clear()
    start = HOST_CACHE.built
    first = load_parts(tiny["transformer"], tiny["text_encoder"], tiny["vae"], device="cpu", dtype=torch.float32,
                       comfy_tokenizer=os.path.join(tiny["diffusers"], "tokenizer"))
    _pinned_plan(first)
    a = _sample(first)
    built = HOST_CACHE.built
    assert built - start == 4  # the tiny transformer's four blocks
    second = load_parts(tiny["transformer"], tiny["text_encoder"], tiny["vae"], device="cpu", dtype=torch.float32,
                        comfy_tokenizer=os.path.join(tiny["diffusers"], "tokenizer"))
    _pinned_plan(second)
    b = _sample(second)
    assert HOST_CACHE.built == built  # no block read from the file again
    assert torch.equal(a, b)


def test_a_changed_file_is_not_served_from_the_cache(tiny, pack, tmp_path):
    import shutil

    from zimage_nodes.loaders.host_cache import HOST_CACHE
    from zimage_nodes.loaders.pipeline_loading import load_parts

    HOST_CACHE.clear()
    start = HOST_CACHE.built
    path = tmp_path / "z.safetensors"
    shutil.copy(tiny["transformer"], path)
    kw = dict(device="cpu", dtype=torch.float32, comfy_tokenizer=os.path.join(tiny["diffusers"], "tokenizer"))
    parts = load_parts(str(path), tiny["text_encoder"], tiny["vae"], **kw)
    _pinned_plan(parts)
    _sample(parts)
    os.utime(path, ns=(1, 1))  # a new download of the "same" name
    parts = load_parts(str(path), tiny["text_encoder"], tiny["vae"], **kw)
    _pinned_plan(parts)
    _sample(parts)
    assert HOST_CACHE.built - start == 8  # four blocks, made once for each version of the file


def test_reading_ahead_keeps_order_and_works_on_file_mappings(tiny, pack):
    from zimage_nodes.loaders.readahead import ahead, will_need
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    with SafetensorsFile(tiny["transformer"]) as f:
        tensors = [f.get(k) for k in f.keys()]
        for t in tensors:
            will_need(t)  # madvise on the mapping: no error, no change
        assert [id(t) for t in ahead(iter(tensors))] == [id(t) for t in tensors]
    will_need(torch.empty(0))


def test_pinned_buffers_are_exactly_the_size_asked_for(pack):
    from zimage_nodes.loaders.pinned_memory import pinned_buffer

    owner = type("Owner", (), {})()
    buf = pinned_buffer(345 * 2**20 + 7, owner)
    assert buf.numel() == 345 * 2**20 + 7 and buf.dtype == torch.uint8


def test_device_to_host_copies_through_one_kept_buffer_give_independent_tensors(pack):
    """HostStage (the decoded image's way to the CPU): grown for a larger tensor, reused for a
    smaller one, and what it returns owns its memory (the next copy does not change it)."""
    from zimage_nodes.loaders.pinned_memory import HostStage

    stage = HostStage()
    a = torch.randn(2, 64, 48, 3).permute(0, 3, 1, 2)  # not contiguous, like the image before it
    first = stage.copy(a)
    buf = stage._buf
    assert first.is_contiguous() and torch.equal(first, a)
    small = stage.copy(torch.arange(10, dtype=torch.float64))
    assert stage._buf is buf and torch.equal(small, torch.arange(10, dtype=torch.float64))
    assert torch.equal(first, a)  # not overwritten by the second copy
    big = torch.randn(3, 64, 64, 3)
    assert torch.equal(stage.copy(big), big) and stage._buf is not buf and stage._buf.numel() >= big.numel() * 4
