"""Page-locked host buffers of exactly the size asked for.

PyTorch's pinned allocator (`pin_memory=True`) rounds every allocation up to a power of two and
keeps freed blocks for reuse: a 345 MiB transformer block takes 512 MiB, and a copy the host
cache drops stays allocated. Registering an ordinary buffer with CUDA (`cudaHostRegister`) pins
exactly its pages, and unregistering it when its owner goes gives the RAM back to the system.

Each buffer has whole pages of its own: registration works on pages, so two buffers sharing one
(small ones from the same heap) would make the second registration fail. A failed CUDA runtime
call also stays behind as the thread's "last error", which PyTorch would report at its next kernel
launch as an unrelated failure; it is cleared here.
"""
from __future__ import annotations

import ctypes
import weakref

import torch

_PAGE = 4096
_PORTABLE = 1  # cudaHostRegisterPortable: pinned for every CUDA context of the process


def pinned_buffer(nbytes: int, owner: object) -> torch.Tensor:
    """A uint8 host buffer of `nbytes`, page-locked while `owner` lives (plain memory without CUDA,
    or PyTorch's pinned allocator if registering fails)."""
    return pin(*host_buffer(nbytes), owner)


def host_buffer(nbytes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(allocation, page-aligned uint8 buffer of `nbytes` inside it), not page-locked yet: filling
    it first and pinning after (`pin`) lets several threads fault its pages in, where registering
    fresh memory faults them in on one (2.6 s against 0.65 s for 8 GB on the H100 machine)."""
    raw = torch.empty(_pages(nbytes) + _PAGE, dtype=torch.uint8)
    start = (-raw.data_ptr()) % _PAGE
    return raw, raw[start:start + nbytes]


def _pages(nbytes: int) -> int:
    return max(1, (nbytes + _PAGE - 1) // _PAGE) * _PAGE


def pin(raw: torch.Tensor, buf: torch.Tensor, owner: object) -> torch.Tensor:
    """`buf` (from `host_buffer`) page-locked while `owner` lives; its contents are kept."""
    if not torch.cuda.is_available():
        return buf
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(buf.data_ptr(), _pages(buf.numel()), _PORTABLE)) != 0:
        _clear_cuda_error()
        return buf.pin_memory()
    # `raw` rides along with the finalizer, so the pages are unregistered before they are freed.
    weakref.finalize(owner, _unregister, buf.data_ptr(), raw)
    return buf


def _unregister(ptr: int, raw: torch.Tensor) -> None:
    try:
        if int(torch.cuda.cudart().cudaHostUnregister(ptr)) != 0:
            _clear_cuda_error()
    except Exception:  # interpreter shutdown: the process is going away with its memory
        pass


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error (PyTorch's cudart binding has no cudaGetLastError):
    through the libcudart this process has loaded, so it is the same runtime instance."""
    global _GET_LAST_ERROR
    if _GET_LAST_ERROR is None:
        _GET_LAST_ERROR = lambda: None  # noqa: E731  (no libcudart found: nothing to clear)
        try:
            with open("/proc/self/maps") as f:
                path = next((line.split()[-1] for line in f if "libcudart.so" in line), None)
            if path:
                _GET_LAST_ERROR = ctypes.CDLL(path).cudaGetLastError
        except OSError:
            pass
    _GET_LAST_ERROR()


_GET_LAST_ERROR = None


class _Owner:
    """What a staging buffer's page lock lives as long as (object() takes no weak references)."""


class HostStage:
    """Device-to-host copies through one page-locked buffer, kept and grown as needed.

    `.cpu()` into fresh pageable memory goes through the driver's staging, which faults the
    destination's pages in chunk by chunk while the copy waits: 41 ms for a 2048² float32 image on
    the H100 machine, 1.05 ms at 1024². Into page-locked memory the copy runs at PCIe speed and the
    CPU then copies it out: 3.6 and 0.64 ms (bench/host_copy.py). The VAE's handle keeps one."""

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._owner: _Owner | None = None

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """`t` as a new contiguous tensor in ordinary host memory."""
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._buf is None or self._buf.numel() < nbytes:
            self._owner = _Owner()  # the old buffer's lock goes with the old owner
            self._buf = pinned_buffer(nbytes, self._owner)
        stage = self._buf[:nbytes].view(t.dtype).view(t.shape)
        stage.copy_(t, non_blocking=True)
        if t.device.type == "cuda":
            torch.cuda.current_stream(t.device).synchronize()
        return stage.clone()
