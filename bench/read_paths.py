"""Ways to get a weights file's bytes into pinned RAM and onto the GPU, timed cold (evicted from
the page cache) and from the page cache, so the loader uses the fastest one this machine has.

    python bench/read_paths.py        # env: OUT (results folder), WORK (scratch folder), GB (file size, 8)

Paths:
  mmap_to_gpu      what the loader did: tensors of the mapped file copied to the GPU (pageable copy),
                   madvise(WILLNEED) 768 MB ahead
  mmap_to_pinned   the mapped file copied into a cudaHostRegister'ed buffer (torch copy_)
  pread_pinned_T   T threads pread 16 MiB pieces straight into a registered buffer
  pread_ring_gpu_T T threads pread into a ring of pinned 64 MiB buffers, each copied to the GPU
                   asynchronously as soon as it is full
  register_only    cudaHostRegister of an already-touched buffer, and of a fresh one
  pack_to_gpu      the loader's reader (loaders/file_reads.copy_to_device): threads through a pinned
                   ring, the kernel asked to read 768 MB ahead
  pack_to_pinned   the loader's host copies: threads pread into fresh memory, page-locked after
"""
from __future__ import annotations

import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaders.pinned_memory import pinned_buffer  # noqa: E402
from loaders.readahead import ahead  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")
WORK = os.environ.get("WORK", "/tmp/zimage_full")
SIZE = int(float(os.environ.get("GB", 8)) * 1e9) // 2**24 * 2**24
PIECE = 16 * 2**20
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
R: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "bytes": SIZE, "runs": {}}


def sync():
    if CUDA:
        torch.cuda.synchronize()


def evict(path):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def warm(path):
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(64 * 2**20)
        while f.readinto(buf):
            pass


def mmap_tensor(path):
    f = open(path, "rb")
    m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return torch.frombuffer(m, dtype=torch.uint8), (f, m)


def mmap_to_gpu(path):
    t, keep = mmap_tensor(path)
    chunks = list(t.split(360 * 2**20))  # about one transformer block each
    out = torch.empty(SIZE, dtype=torch.uint8, device=DEV)
    pos = 0
    for c in ahead(chunks):
        out[pos:pos + c.numel()].copy_(c)
        pos += c.numel()
    sync()
    del t, chunks


def mmap_to_pinned(path):
    t, keep = mmap_tensor(path)
    owner = type("Owner", (), {})()
    buf = pinned_buffer(SIZE, owner)
    for c, d in zip(ahead(list(t.split(360 * 2**20))), buf.split(360 * 2**20)):
        d.copy_(c)
    del t


def pread_into(fd, buf: torch.Tensor, offset: int, threads: int, pool: ThreadPoolExecutor):
    view = memoryview(buf.numpy())

    def piece(k):
        lo = k * PIECE
        hi = min(lo + PIECE, buf.numel())
        got = 0
        while lo + got < hi:
            n = os.preadv(fd, [view[lo + got:hi]], offset + lo + got)
            if n <= 0:
                raise OSError("short read")
            got += n

    list(pool.map(piece, range((buf.numel() + PIECE - 1) // PIECE)))


def pread_pinned(threads):
    def run(path):
        owner = type("Owner", (), {})()
        buf = pinned_buffer(SIZE, owner)
        fd = os.open(path, os.O_RDONLY)
        with ThreadPoolExecutor(threads) as pool:
            for k in range(0, SIZE, 360 * 2**20):  # block by block, as the loader would
                pread_into(fd, buf[k:k + 360 * 2**20], k, threads, pool)
        os.close(fd)
    return run


def pread_ring_gpu(threads, ring=4, chunk=64 * 2**20):
    def run(path):
        owner = type("Owner", (), {})()
        bufs = [pinned_buffer(chunk, owner) for _ in range(ring)]
        done = [torch.cuda.Event() for _ in range(ring)] if CUDA else [None] * ring
        stream = torch.cuda.Stream() if CUDA else None
        out = torch.empty(SIZE, dtype=torch.uint8, device=DEV)
        fd = os.open(path, os.O_RDONLY)
        with ThreadPoolExecutor(threads) as pool:
            # read chunk i+1 while chunk i copies; each chunk is read by all threads in pieces
            for i, k in enumerate(range(0, SIZE, chunk)):
                s = i % ring
                if CUDA and i >= ring:
                    done[s].synchronize()
                n = min(chunk, SIZE - k)
                pread_into(fd, bufs[s][:n], k, threads, pool)
                if CUDA:
                    with torch.cuda.stream(stream):
                        out[k:k + n].copy_(bufs[s][:n], non_blocking=True)
                        done[s].record(stream)
                else:
                    out[k:k + n].copy_(bufs[s][:n])
        sync()
        os.close(fd)
    return run


def pack_to_gpu(path):
    from loaders.file_reads import copy_to_device

    out = torch.empty(SIZE, dtype=torch.uint8, device=DEV)
    step = 360 * 2**20
    fd = os.open(path, os.O_RDONLY)
    copy_to_device([(out[k:k + step], fd, k) for k in range(0, SIZE, step)])
    sync()
    os.close(fd)
    LAST[:] = [out]


def pack_to_pinned(path):
    from loaders.file_reads import read_into
    from loaders.pinned_memory import host_buffer, pin

    owners = []
    fd = os.open(path, os.O_RDONLY)
    for k in range(0, SIZE, 360 * 2**20):  # block by block, as the loader does
        raw, buf = host_buffer(min(360 * 2**20, SIZE - k))
        read_into([(buf, fd, k)])
        owners.append(type("Owner", (), {})())
        owners[-1].buf = pin(raw, buf, owners[-1])
    os.close(fd)
    LAST[:] = [torch.cat([o.buf for o in owners])] if SIZE <= 2**31 else [owners]


def register_only(_path):
    owner = type("Owner", (), {})()
    t = time.perf_counter()
    buf = pinned_buffer(SIZE, owner)  # fresh pages: faulted in by registration
    R["runs"]["register_fresh_s"] = round(time.perf_counter() - t, 3)
    del owner, buf
    raw = torch.ones(SIZE, dtype=torch.uint8)  # touched first
    t = time.perf_counter()
    if CUDA:
        torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), SIZE, 1)
        R["runs"]["register_touched_s"] = round(time.perf_counter() - t, 3)
        torch.cuda.cudart().cudaHostUnregister(raw.data_ptr())


LAST: list = []


def verify(path) -> bool:
    """The last pack_* result holds the file's bytes (checked outside the timing)."""
    t, keep = mmap_tensor(path)
    got = LAST[0]
    step = 360 * 2**20
    if isinstance(got, list):  # pinned blocks
        return all(torch.equal(o.buf, t[k * step:k * step + o.buf.numel()]) for k, o in enumerate(got))
    return all(torch.equal(got[k:k + step].cpu(), t[k:k + step]) for k in range(0, SIZE, step))


def timed(name, fn, path, cold):
    if cold:
        evict(path)
    else:
        warm(path)
    sync()
    t = time.perf_counter()
    fn(path)
    dt = time.perf_counter() - t
    key = f"{name}_{'cold' if cold else 'page_cache'}"
    R["runs"][key] = {"s": round(dt, 3), "GBps": round(SIZE / dt / 1e9, 3)}
    if name.startswith("pack_"):
        R["runs"][key]["bytes_equal_to_file"] = verify(path)
        LAST.clear()
    print(key, R["runs"][key], flush=True)


def main():
    os.makedirs(WORK, exist_ok=True)
    path = os.path.join(WORK, "read_paths.bin")
    if not os.path.exists(path) or os.path.getsize(path) != SIZE:
        t = time.perf_counter()
        with open(path, "wb") as f:
            block = os.urandom(64 * 2**20)
            for _ in range(SIZE // len(block)):
                f.write(block)
            f.write(block[:SIZE % len(block)])
            f.flush()
            os.fsync(f.fileno())
        R["write_s"] = round(time.perf_counter() - t, 1)
    threads = [int(x) for x in os.environ.get("THREADS", "1,4,8,16").split(",")]
    paths = [("mmap_to_gpu", mmap_to_gpu), ("mmap_to_pinned", mmap_to_pinned), ("pack_to_gpu", pack_to_gpu),
             ("pack_to_pinned", pack_to_pinned)]
    if os.environ.get("PACK_ONLY") == "1":
        paths = paths[:4]
        threads = []
    paths += [(f"pread_pinned_{n}", pread_pinned(n)) for n in threads]
    paths += [(f"pread_ring_gpu_{n}", pread_ring_gpu(n)) for n in threads]
    for cold in (True, False):
        for name, fn in paths:
            timed(name, fn, path, cold)
            torch.cuda.empty_cache() if CUDA else None
    register_only(path)
    print(json.dumps(R, indent=1))
    with open(os.path.join(OUT, "read_paths.json"), "w") as f:
        json.dump(R, f, indent=1)
    if os.environ.get("KEEP") != "1":
        os.remove(path)


if __name__ == "__main__":
    main()
