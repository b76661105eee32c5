"""Asking the kernel to read memory-mapped weights ahead of their first use.

A copy out of a file mapping faults its pages in a few at a time, so a cold read from disk runs
far below the disk's sequential speed. `madvise(MADV_WILLNEED)` on the next few hundred MB starts
the disk reading them in the background while the current tensors are copied. Linux only; a
no-op elsewhere and for memory that is not a file mapping.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterable, Iterator

import torch

_MADV_WILLNEED = 3
_PAGE = 4096
_WINDOW = 768 * 2**20  # bytes advised ahead of the copy


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
        return libc
    except OSError:
        return None


_LIBC = _libc()


def will_need(t: torch.Tensor) -> None:
    if _LIBC is None or t.device.type != "cpu" or t.numel() == 0:
        return
    start = t.data_ptr() // _PAGE * _PAGE
    end = t.data_ptr() + t.numel() * t.element_size()
    _LIBC.madvise(start, end - start, _MADV_WILLNEED)


def cached_fraction(t: torch.Tensor) -> float:
    """How much of a memory-mapped tensor's bytes are in the page cache (1.0 where that can't be
    asked: not Linux, not a CPU tensor)."""
    if _LIBC is None or t.device.type != "cpu" or t.numel() == 0:
        return 1.0
    start = t.data_ptr() // _PAGE * _PAGE
    end = t.data_ptr() + t.numel() * t.element_size()
    pages = (end - start + _PAGE - 1) // _PAGE
    vec = (ctypes.c_ubyte * pages)()
    if _LIBC.mincore(start, end - start, vec) != 0:
        return 1.0
    return sum(b & 1 for b in bytes(vec)) / pages


def ahead(tensors: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
    """`tensors` in order, each yielded once the ones up to a window beyond it were advised."""
    items = list(tensors)
    advised, budget = 0, 0
    for i, t in enumerate(items):
        while advised < len(items) and (advised <= i or budget < _WINDOW):
            will_need(items[advised])
            budget += items[advised].numel() * items[advised].element_size()
            advised += 1
        budget -= t.numel() * t.element_size()
        yield t
