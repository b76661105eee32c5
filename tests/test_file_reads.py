"""Reading weights straight from their safetensors file (several threads, `pread`) instead of
copying out of the file mapping: the bytes found, and the blocks built from them, are the same."""
from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch
from safetensors.torch import save_file
from torch import nn


@pytest.fixture
def weights(tmp_path):
    torch.manual_seed(0)
    tensors = {"a.weight": torch.randn(64, 48), "a.bias": torch.randn(64), "b.weight": torch.randn(32, 64),
               "steps": torch.arange(10, dtype=torch.int64)}
    path = str(tmp_path / "w.safetensors")
    save_file(tensors, path)
    return path, tensors


def test_tensors_of_a_mapped_file_map_back_to_their_bytes(weights, pack):
    from zimage_nodes.loaders.file_reads import _MAPPINGS, file_range
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    path, tensors = weights
    f = SafetensorsFile(path)
    raw = open(path, "rb").read()
    for name, t in tensors.items():
        mapped = f.get(name)
        where = file_range(mapped)
        assert where is not None and os.path.samestat(os.fstat(where[0]), os.stat(path))
        nbytes = t.numel() * t.element_size()
        assert raw[where[1]:where[1] + nbytes] == t.numpy().tobytes()
    w = f.get("a.weight")
    rows = w[8:16]  # a contiguous slice (like a split fused qkv) maps too
    assert file_range(rows) == (file_range(w)[0], file_range(w)[1] + 8 * 48 * 4)
    assert file_range(w.t()) is None  # not contiguous: copied, not read
    assert file_range(torch.randn(4)) is None  # not from a file
    n, fd = len(_MAPPINGS), file_range(w)[0]
    f.close()
    del f, w, rows, mapped
    gc.collect()
    assert len(_MAPPINGS) == n - 1  # the mapping went with its last tensor, and its entry with it
    with pytest.raises(OSError):
        os.fstat(fd)  # and its file descriptor


def test_a_file_replaced_on_disk_is_still_read_from_the_one_mapped(weights, pack, tmp_path):
    from zimage_nodes.loaders.file_reads import file_range, read_into
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    path, tensors = weights
    f = SafetensorsFile(path)
    w = f.get("a.weight")
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(2**16))
    os.replace(other, path)  # a new download under the same name, while the old one is mapped
    out = torch.zeros(w.numel() * 4, dtype=torch.uint8)
    read_into([(out, *file_range(w))])
    assert torch.equal(out.view(torch.float32).view(w.shape), tensors["a.weight"])


def test_read_into_fills_every_destination_in_pieces_over_threads(weights, pack, monkeypatch):
    from zimage_nodes.loaders import file_reads
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    monkeypatch.setattr(file_reads, "PIECE", 1000)  # a 12 kB tensor in 13 pieces
    path, tensors = weights
    f = SafetensorsFile(path)
    jobs, outs = [], []
    for name in ("a.weight", "b.weight", "a.bias"):
        t = f.get(name)
        out = torch.zeros(t.numel() * t.element_size(), dtype=torch.uint8)
        jobs.append((out, *file_reads.file_range(t)))
        outs.append((out, tensors[name]))
    file_reads.read_into(jobs)
    for out, t in outs:
        assert torch.equal(out.view(t.dtype).view(t.shape), t)


def test_read_past_the_end_of_the_file_is_an_error(weights, pack):
    from zimage_nodes.loaders.file_reads import read_into

    path, _ = weights
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match="end of file"):
            read_into([(torch.zeros(100, dtype=torch.uint8), fd, 10**6)])
    finally:
        os.close(fd)


def test_a_host_block_read_from_the_file_equals_one_copied_from_memory(weights, pack, monkeypatch):
    from zimage_nodes.loaders import streaming
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile
    from zimage_nodes.loaders.streaming import HostBlock

    read = []
    real = streaming.read_into
    monkeypatch.setattr(streaming, "read_into", lambda jobs: (read.append(len(jobs)), real(jobs)))

    path, tensors = weights
    f = SafetensorsFile(path)

    def block(get):
        m = nn.Module()
        m.a, m.b = nn.Linear(48, 64), nn.Linear(64, 32, bias=False)
        for name in ("a.weight", "a.bias", "b.weight"):
            owner, leaf = name.split(".")
            getattr(m, owner)._parameters[leaf] = nn.Parameter(get(name), requires_grad=False)
        m.register_buffer("steps", get("steps"))
        return m

    from_file = HostBlock("blk", block(f.get), "bf16", pinned=True, compute_dtype=torch.float32)
    from_memory = HostBlock("blk", block(lambda n: tensors[n].clone()), "bf16", pinned=True,
                            compute_dtype=torch.float32)
    assert read == [4, 0]  # every tensor of the first block came from the file, none of the second's
    assert from_file.host_bytes == from_memory.host_bytes > 0
    same(from_file, from_memory)
    # a dtype change can't be read as is: converted from the mapping instead, same result
    half = HostBlock("blk", block(f.get), "bf16", pinned=True, compute_dtype=torch.bfloat16)
    ref = HostBlock("blk", block(lambda n: tensors[n].clone()), "bf16", pinned=True, compute_dtype=torch.bfloat16)
    same(half, ref)


def same(a, b):
    """The two host copies hold the same tensors (the alignment padding between them is not set)."""
    va, vb = a.views(a.host, None), b.views(b.host, None)
    assert va.keys() == vb.keys() == {"a.weight", "a.bias", "b.weight", "steps"}
    for k in va:
        assert torch.equal(va[k], vb[k]), k


def test_copies_through_a_small_ring_split_and_join_tensors_across_its_buffers(weights, pack, monkeypatch):
    from zimage_nodes.loaders import file_reads
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    # 1000-byte buffers, two of them: the 12 kB weight spans many, small tensors share one
    monkeypatch.setattr(file_reads, "CHUNK", 1000)
    monkeypatch.setattr(file_reads, "RING", 2)
    monkeypatch.setattr(file_reads, "_RING", None)
    path, tensors = weights
    f = SafetensorsFile(path)
    names = ["a.bias", "a.weight", "steps", "b.weight"]
    outs = [torch.full_like(tensors[n], 7) for n in names]
    file_reads.copy_to_device([(o, *file_reads.file_range(f.get(n))) for o, n in zip(outs, names)])
    for o, n in zip(outs, names):
        assert torch.equal(o, tensors[n]), n


def test_a_device_copy_reads_what_the_file_holds_as_is_and_converts_the_rest(weights, pack, monkeypatch):
    from zimage_nodes.loaders import device_copy as dc
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    jobs = []
    real = dc.copy_to_device
    monkeypatch.setattr(dc, "copy_to_device", lambda j: (jobs.extend(j), real(j)))
    path, tensors = weights
    f = SafetensorsFile(path)
    m = nn.Module()
    m.a = nn.Linear(48, 64)
    m.a.weight = nn.Parameter(f.get("a.weight"), requires_grad=False)
    m.a.bias = nn.Parameter(f.get("a.bias"), requires_grad=False)
    m.register_buffer("steps", f.get("steps"))
    out = dc.device_copy(m, torch.device("cpu"))
    assert len(jobs) == 3 and torch.equal(out.a.weight, tensors["a.weight"])
    assert torch.equal(out.steps, tensors["steps"])
    assert out.a.weight.data_ptr() != m.a.weight.data_ptr()
    jobs.clear()
    half = dc.device_copy(m, torch.device("cpu"), dtype=torch.bfloat16)
    assert len(jobs) == 1  # the int64 buffer; the float32 weights were converted from the mapping
    assert torch.equal(half.a.weight, tensors["a.weight"].bfloat16()) and half.steps.dtype == torch.int64


def _evict(path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


@pytest.fixture
def cold_file(tmp_path):
    path = str(tmp_path / "cold.bin")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * 2**20))
    _evict(path)
    return path


def test_prefetch_reads_ahead_in_order_no_further_than_its_lead(cold_file, pack, monkeypatch):
    import mmap

    from zimage_nodes.loaders import file_reads
    from zimage_nodes.loaders.readahead import cached_fraction

    with open(cold_file, "rb") as f:
        view = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    if cached_fraction(view) > 0.1:
        pytest.skip("this filesystem keeps the file cached after posix_fadvise(DONTNEED)")
    monkeypatch.setattr(file_reads.Prefetch, "_STEP", 2**20)
    mib = 2**20
    fd = os.open(cold_file, os.O_RDONLY)
    p = file_reads.Prefetch([(fd, 2 * mib, 2 * mib), (fd, 0, mib)], lead=0)
    deadline = time.time() + 10
    while p.read < mib and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    assert p.read == mib  # one step, then it waits for the consumer
    p.done(3 * mib)  # the consumer caught up: it reads the rest
    while p.read < 3 * mib and time.time() < deadline:
        time.sleep(0.01)
    p.close()
    assert p.read == 3 * mib
    os.close(fd)
    assert cached_fraction(view[2 * mib:4 * mib]) == 1.0 and cached_fraction(view[:mib]) == 1.0


def test_a_cold_file_is_prefetched_while_its_tensors_are_copied(weights, pack, monkeypatch):
    from zimage_nodes.loaders import device_copy as dc
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile

    made = []
    real = dc.Prefetch
    monkeypatch.setattr(dc, "Prefetch", lambda spans: made.append(real(spans)) or made[-1])
    path, tensors = weights
    _evict(path)
    f = SafetensorsFile(path)
    m = nn.Module()
    m.register_buffer("w", f.get("a.weight"))
    m.register_buffer("b", f.get("b.weight"))
    cold = not dc.cached(m.w)
    out = dc.device_copy(m, torch.device("cpu"))
    assert torch.equal(out.w, tensors["a.weight"]) and torch.equal(out.b, tensors["b.weight"])
    if cold:  # a cold file is copied out of the mapping, a Prefetch thread reading ahead
        assert len(made) == 1 and made[0].consumed == sum(t.numel() * 4 for t in (m.w, m.b))
    assert not [t for t in threading.enumerate() if t.name == "zimage-prefetch"]


def test_without_preadv_every_byte_is_copied_out_of_the_mapping(weights, pack, monkeypatch):
    from zimage_nodes.loaders import file_reads
    from zimage_nodes.loaders.device_copy import device_copy
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile
    from zimage_nodes.loaders.streaming import HostBlock

    monkeypatch.setattr(file_reads, "_CAN_READ", False)  # as on Windows
    path, tensors = weights
    f = SafetensorsFile(path)
    assert file_reads.file_range(f.get("a.weight")) is None
    m = nn.Module()
    m.register_buffer("w", f.get("a.weight"))
    assert torch.equal(device_copy(m, torch.device("cpu")).w, tensors["a.weight"])
    h = HostBlock("blk", m, "bf16", pinned=True, compute_dtype=torch.float32)
    assert torch.equal(h.views(h.host, None)["w"], tensors["a.weight"])


def test_fp8_weights_in_the_file_are_requantised_with_their_scales_not_read_as_they_are(tmp_path, pack):
    from zimage_nodes.loaders.fp8_matmul import FP8, fp8_quantize
    from zimage_nodes.loaders.safetensors_file import SafetensorsFile
    from zimage_nodes.loaders.streaming import HostBlock

    torch.manual_seed(1)
    w8 = (torch.randn(32, 64) * 3).to(FP8)  # an fp8 checkpoint's weight (ComfyUI's fp8 files)
    path = str(tmp_path / "fp8.safetensors")
    save_file({"w.weight": w8}, path)
    f = SafetensorsFile(path)
    m = nn.Module()
    m.w = nn.Linear(64, 32, bias=False)
    m.w._parameters["weight"] = nn.Parameter(f.get("w.weight"), requires_grad=False)
    h = HostBlock("blk", m, "fp8", pinned=True, compute_dtype=torch.bfloat16, fp8_matmul=True)
    got = h.views(h.host, None)
    q, s = fp8_quantize(w8)
    assert torch.equal(got["w.weight"].view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(got["w.weight_scale"], s)
