"""Host copies of streamed blocks, kept across runs and across models, within a RAM bound.

Building a block's pinned copy reads it from the file (or the page cache) and pins it; after
that, a run costs only host->GPU copies. The cache keys each copy by the file it came from (path,
size, modification time), the block and its storage, so loading the same file again, or
switching back to a model, finds its blocks still there, with no disk reads and no RAM disk.
Least recently used copies are dropped when the cache would pass its bound; a copy a loaded
model still uses stays alive through that model until it lets go.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from threading import Lock

from .streaming import HostBlock

Key = tuple


def source_key(path: str) -> tuple:
    """Identifies the weights' file (or folder): a changed file gets a new key."""
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


class HostBlockCache:
    def __init__(self, limit_bytes: int = 0):
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[Key, HostBlock] = OrderedDict()
        self._lock = Lock()  # ComfyUI may run prompts from another thread than the UI's calls
        self.built = 0  # how many copies were made (for tests and benchmarks)

    @property
    def nbytes(self) -> int:
        return sum(h.host_bytes for h in self._entries.values())

    def get(self, key: Key, make: Callable[[], HostBlock]) -> HostBlock:
        with self._lock:
            block = self._entries.get(key)
            if block is not None:
                self._entries.move_to_end(key)
                return block
        block = make()
        with self._lock:
            self.built += 1
            self._entries[key] = block
            self._evict()
        return block

    def find(self, key: Key) -> HostBlock | None:
        with self._lock:
            block = self._entries.get(key)
            if block is not None:
                self._entries.move_to_end(key)
            return block

    def raise_limit(self, limit_bytes: int) -> None:
        """A loader asks for room: the bound becomes the largest RAM budget asked for."""
        with self._lock:
            self.limit_bytes = max(self.limit_bytes, limit_bytes)
            self._evict()

    def set_limit(self, limit_bytes: int) -> None:
        with self._lock:
            self.limit_bytes = limit_bytes
            self._evict()

    def _evict(self) -> None:
        while self._entries and self.nbytes > self.limit_bytes:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


# The one cache of the process: explicit, bounded, and shared by every loaded model.
HOST_CACHE = HostBlockCache()
