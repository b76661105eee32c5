"""Host memory and the page cache for load_path.py: what a process holds while it loads (sampled),
whether the weight files are in the page cache, how to drop them from it, and how fast they read."""
from __future__ import annotations

import ctypes
import mmap
import os

from load_path_settings import BUFFER, GB, RAM_FACTOR, now
from poller import Poller


def proc_bytes(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    """The fields of a /proc file in "Key: n kB" lines, in bytes."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024
    return out


def rss_anon() -> int:
    return proc_bytes("/proc/self/status", ("RssAnon",)).get("RssAnon", 0)


# ---------------------------------------------------------------------------------------------
# page cache: residency, eviction, read rate


def resident_fraction(paths: list[str]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore on a fresh shared mapping, which
    faults nothing in); None where mincore cannot be called."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    except (OSError, AttributeError):
        return None
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident += pages - vec.raw.count(0)
        finally:
            libc.munmap(addr, size)
        total += pages
    return resident / total if total else 0.0


def evict(paths: list[str]) -> dict:
    """Drop the files from the page cache. DONTNEED skips dirty pages (a file just written), hence
    the fsync first; drop_caches (root only) is the fallback, since it also drops the libraries'
    pages that a cold case would then read again."""
    t, how = now(), "posix_fadvise"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            how = f"posix_fadvise failed ({e.strerror})"
        finally:
            os.close(fd)
    left = resident_fraction(paths)
    if left is not None and left > 0.05:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            how = "posix_fadvise, then drop_caches"
        except OSError as e:
            how = f"posix_fadvise (drop_caches: {e.strerror})"
        left = resident_fraction(paths)
    return {"how": how, "resident_after": None if left is None else round(left, 4), "seconds": round(now() - t, 2)}


def read_files(paths: list[str], max_bytes: int | None = None, limit_s: float | None = None) -> tuple[int, float]:
    """Bytes read and seconds: sequential reads into one reused buffer (no allocation per read)."""
    view = memoryview(bytearray(BUFFER))
    n, t = 0, now()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while max_bytes is None or n < max_bytes:
                k = f.readinto(view)
                if not k:
                    break
                n += k
                if limit_s is not None and now() - t > limit_s:
                    return n, now() - t
    return n, now() - t


# ---------------------------------------------------------------------------------------------
# host memory while a block runs


class HostMemory(Poller):
    """Peaks of this process's host memory while the block runs, sampled every 20 ms.

    `copies` is RssAnon, plus PyTorch's pinned host memory where this kernel does not count it in
    RssAnon (driver mappings of cudaHostAlloc may not be); `available` is the machine's MemAvailable,
    whose drop is a cross-check that counts no page cache."""

    STATUS = ("RssAnon", "RssFile", "RssShmem", "VmRSS")

    def __init__(self, pinned=None, pinned_in_anon: bool = True, period: float = 0.02):
        self.pinned, self.pinned_in_anon, self.period = pinned, pinned_in_anon, period

    def _read(self) -> dict[str, int]:
        s = proc_bytes("/proc/self/status", self.STATUS)
        s["available"] = proc_bytes("/proc/meminfo", ("MemAvailable",)).get("MemAvailable", 0)
        s["pinned"] = self.pinned() if self.pinned else 0
        s["copies"] = s.get("RssAnon", 0) + (0 if self.pinned_in_anon else s["pinned"])
        return s

    def _sample(self) -> None:
        s = self._read()
        for k, v in s.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        self.min_available = min(self.min_available, s["available"])

    def __enter__(self) -> "HostMemory":
        self.base = self._read()
        self.peak, self.min_available = dict(self.base), self.base["available"]
        return super().__enter__()

    def report(self, weights: int) -> dict:
        peak, base = self.peak["copies"], self.base["copies"]
        return {"peak_copies_GB": round(peak / GB, 2), "before_GB": round(base / GB, 2),
                "added_GB": round((peak - base) / GB, 2),
                "ratio_to_weights": round(peak / weights, 3),
                "added_ratio_to_weights": round((peak - base) / weights, 3),
                "pass": peak <= RAM_FACTOR * weights,
                "peak_RssAnon_GB": round(self.peak.get("RssAnon", 0) / GB, 2),
                "peak_pinned_GB": round(self.peak["pinned"] / GB, 2),
                "peak_RssFile_GB": round(self.peak.get("RssFile", 0) / GB, 2),
                "peak_VmRSS_GB": round(self.peak.get("VmRSS", 0) / GB, 2),
                "machine_MemAvailable_drop_GB": round((self.base["available"] - self.min_available) / GB, 2)}
