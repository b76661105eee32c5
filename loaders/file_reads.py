"""Reading weights straight out of their safetensors file with several threads.

Copying out of a file mapping faults its pages in on one thread; filling fresh memory faults that
memory in on one thread too. `pread` from a pool of threads into the destination does both in
parallel. On the H100 machine (`bench/read_paths.py`, results/read_paths_h100.json), from the
page cache: into pinned memory 2.4 GB/s through the mapping, onto the GPU 6.2 GB/s through the
mapping and 20 GB/s with 16 threads through a pinned ring. Cold from disk, copying out of the
mapping (with `madvise(WILLNEED)` ahead) was 10% faster than the threads (1.86 against 1.68 GB/s),
so bytes that are not in the page cache (`cached`) are still copied that way.

Tensors find their file through the mapping they view: `SafetensorsFile` registers each mapping
it makes with a descriptor of the file it mapped (the same inode even if the path is replaced
meanwhile), and `file_range` maps a tensor's address back to (descriptor, offset) while that
mapping lives. Tensors that view no registered mapping are copied as before.
"""
from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, wait

import torch

from .readahead import cached_fraction

PIECE = 8 * 2**20  # bytes per pread: big enough to be cheap, small enough to spread a block over threads
_MAPPINGS: dict[int, tuple[int, int, weakref.ref]] = {}  # start address -> (end address, fd, mapping)
_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def threads() -> int:
    return max(1, min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def _pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(threads(), thread_name_prefix="zimage-read")
        return _POOL


def register_mapping(m: mmap.mmap, fd: int) -> None:
    """Let tensors viewing `m` (a mapping of the whole file open as `fd`) be read from the file,
    through a descriptor of its own that lives as long as the mapping."""
    if len(m) == 0:
        return
    start = torch.frombuffer(m, dtype=torch.uint8, count=1).data_ptr()
    own = os.dup(fd)
    _MAPPINGS[start] = (start + len(m), own, weakref.ref(m))
    # the address range is the mapping's own until it is unmapped, which is when this runs
    weakref.finalize(m, _forget, start, own)


def _forget(start: int, fd: int) -> None:
    _MAPPINGS.pop(start, None)
    os.close(fd)


_CAN_READ = hasattr(os, "preadv")  # not on Windows: there every byte is copied out of the mapping


def file_range(t: torch.Tensor) -> tuple[str, int] | None:
    """(file descriptor, byte offset) of the bytes of `t`, if it is a contiguous view of a live
    file mapping (and this platform has `preadv`). The descriptor stays open while `t` lives."""
    if not _CAN_READ or t.device.type != "cpu" or not t.is_contiguous() or t.numel() == 0:
        return None
    ptr, n = t.data_ptr(), t.numel() * t.element_size()
    for start, (end, fd, ref) in list(_MAPPINGS.items()):
        if start <= ptr and ptr + n <= end and ref() is not None:
            return fd, ptr - start
    return None


def cached(t: torch.Tensor) -> bool:
    """Whether most of a mapped tensor's bytes are in the page cache."""
    return cached_fraction(t) >= 0.5


def _read(fd: int, view: memoryview, offset: int) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise OSError(f"unexpected end of file reading {len(view)} bytes at {offset}")
        got += n


def read_into(jobs: Sequence[tuple[torch.Tensor, int, int]]) -> None:
    """Fill each uint8 CPU tensor `dst` with the bytes of file descriptor `fd` from `offset` on, in
    pieces spread over the thread pool. Returns when every byte is in."""
    pieces = []
    for dst, fd, offset in jobs:
        view = memoryview(dst.numpy())
        for lo in range(0, len(view), PIECE):
            pieces.append((fd, view[lo:lo + PIECE], offset + lo))
    if len(pieces) == 1:
        _read(*pieces[0])
    elif pieces:
        futures = [_pool().submit(_read, *p) for p in pieces]
        wait(futures)  # every read done before an error goes on
        for f in futures:
            f.result()


CHUNK = 64 * 2**20  # bytes per pinned ring buffer
RING = 4  # ring buffers: threads fill one while the GPU copies out of the others
_WINDOW = 768 * 2**20  # bytes the kernel is asked to read ahead of the threads (cold files)
_RING: list | None = None


def _ring() -> list:
    """RING host buffers (page-locked with CUDA), each with the event of the last copy out of it;
    made once per process."""
    global _RING
    if _RING is None:
        from .pinned_memory import host_buffer, pin

        _RING = []
        for _ in range(RING):
            raw, buf = host_buffer(CHUNK)
            _RING.append([pin(raw, buf, raw), None])  # kept for the process: owner is the allocation
    return _RING


def copy_to_device(jobs: Sequence[tuple[torch.Tensor, int, int]]) -> None:
    """Fill each contiguous tensor `dst` (all on one device) with the bytes of file descriptor `fd` from `offset`
    on, through the pinned ring: the thread pool reads one ring buffer while earlier ones are
    copied to the GPU. Returns once every byte is read; on a GPU the copies are queued on the
    device's current stream, so work queued after them on it sees them. (On a CPU the copies are
    plain ones: the same code, testable anywhere.)"""
    if not jobs:
        return
    device = jobs[0][0].device
    assert all(dst.device == device for dst, _, _ in jobs), "one device per call"
    ring = _ring()
    cuda = device.type == "cuda"
    stream = torch.cuda.current_stream(device) if cuda else None
    spans = [(fd, offset, dst.numel() * dst.element_size()) for dst, fd, offset in jobs]
    starts = [0]
    for _, _, n in spans:
        starts.append(starts[-1] + n)
    adv = [0, 0]  # next span to advise, bytes of it advised

    def advise(upto: int) -> None:
        """Ask the kernel to read the jobs' bytes up to `upto` bytes in, in the background: on a cold
        file the disk then streams one long sequential read while the threads copy from the cache."""
        while adv[0] < len(spans) and starts[adv[0]] + adv[1] < upto:
            fd, offset, n = spans[adv[0]]
            take = min(n - adv[1], upto - starts[adv[0]] - adv[1])
            os.posix_fadvise(fd, offset + adv[1], take, os.POSIX_FADV_WILLNEED)
            adv[1] += take
            if adv[1] == n:
                adv[:] = [adv[0] + 1, 0]

    k, fill, reads, copies, consumed = 0, 0, [], [], 0

    def flush() -> None:
        nonlocal k, fill, reads, copies
        if not reads:
            return
        buf, _ = ring[k]
        read_into(reads)
        if not cuda:
            for dst, lo, n in copies:
                dst.copy_(buf[lo:lo + n])
        else:
            with torch.cuda.device(device), torch.cuda.stream(stream):
                for dst, lo, n in copies:
                    dst.copy_(buf[lo:lo + n], non_blocking=True)
                ring[k][1] = torch.cuda.Event()
                ring[k][1].record(stream)
        k, fill, reads, copies = (k + 1) % len(ring), 0, [], []

    for (dst, fd, offset), (_, _, total) in zip(jobs, spans):
        flat = dst.reshape(-1).view(torch.uint8)
        pos = 0
        while pos < total:
            if fill == 0:
                if hasattr(os, "posix_fadvise"):
                    advise(consumed + _WINDOW)
                if ring[k][1] is not None:
                    ring[k][1].synchronize()  # the last copy out of this buffer is done
            take = min(total - pos, CHUNK - fill)
            reads.append((ring[k][0][fill:fill + take], fd, offset + pos))
            copies.append((flat[pos:pos + take], fill, take))
            fill += take
            pos += take
            consumed += take
            if fill == CHUNK:
                flush()
    flush()


class Prefetch:
    """A background thread reading byte ranges of files in order, 64 MiB per `pread`, at most
    `lead` bytes ahead of what the consumer reports done (`done`): a cold file then streams from
    disk at the rate of one long sequential read while the consumer copies what is already in
    the page cache. (Copying out of the mapping alone, with `madvise` ahead, read at 65-80% of
    that rate in the loader on the H100 machine.) `close()` stops it; use it as a context manager."""

    _STEP = 64 * 2**20

    def __init__(self, ranges: Sequence[tuple[int, int, int]], lead: int = 2 * 2**30):
        """`ranges`: (file descriptor, offset, bytes), in the order the consumer copies them."""
        self.ranges, self.lead = [r for r in ranges if r[2] > 0], lead
        self.consumed = self.read = 0
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="zimage-prefetch", daemon=True)
        self._thread.start()

    def done(self, nbytes: int) -> None:
        with self._cond:
            self.consumed += nbytes
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> "Prefetch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        scratch = memoryview(bytearray(self._STEP))
        try:
            for fd, offset, n in self.ranges:
                pos = 0
                while pos < n:
                    with self._cond:
                        while not self._stop and self.read - self.consumed > self.lead:
                            self._cond.wait()
                        if self._stop:
                            return
                    got = os.preadv(fd, [scratch[:min(self._STEP, n - pos)]], offset + pos)
                    if got <= 0:
                        return  # past the end: the consumer's own read reports it
                    pos += got
                    self.read += got
        except OSError:
            pass  # only a hint: the consumer reads the bytes itself either way
