"""Reading safetensors files as memory-mapped tensors, with errors a user can act on.

safetensors' own `safe_open(...).get_tensor` copies each tensor into fresh memory; for a
12 GB transformer that is a second full copy in RAM. Here every tensor is a view of one
private (copy-on-write) mapping of the file, so weights stay in the page cache until they
are copied to their device.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass

import torch

from .errors import ZImageError
from .file_reads import register_mapping

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 2**20  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset from the start of the file
    end: int


class SafetensorsFile:
    """One safetensors file: its tensor table, read from the header alone, and lazy mmap views.

    `close()` drops the mapping; tensors already taken keep it alive until they are freed.
    """

    def __init__(self, path: str, role: str = "model file"):
        self.path = os.path.abspath(path)
        self.role = role
        self._mmap: mmap.mmap | None = None
        if not os.path.exists(path):
            raise ZImageError(f"the {role} does not exist", where=path,
                              fix=f"check the path, or put the {role} where the loader looks for it.")
        if os.path.isdir(path):
            raise ZImageError(f"the {role} is a folder, not a .safetensors file", where=path,
                              fix="pick the .safetensors file inside it, or use the folder as a diffusers "
                                  "model folder.")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            _reject_gguf(path, head, role)
            if len(head) < 8:
                raise _corrupt(path, role, f"{size} bytes, too short to hold a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                _reject_pickle(path, head, role)
                raise _corrupt(path, role, f"a header length of {n} bytes in a file of {size} bytes")
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _corrupt(path, role, f"an unreadable header ({e.__class__.__name__})") from None
        if not isinstance(header, dict):
            raise _corrupt(path, role, "a header that is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        base = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        for name, spec in header.items():
            try:
                dtype = DTYPES[spec["dtype"]]
                shape = tuple(int(d) for d in spec["shape"])
                start, end = (base + int(o) for o in spec["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(path, role, f"a malformed entry for tensor {name!r}") from None
            if end > size:
                raise ZImageError(
                    f"the {role} is truncated", where=path,
                    expected=f"{end} bytes (tensor {name!r} ends there)", found=f"{size} bytes",
                    fix="the download or copy did not finish: download the file again.")
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * dtype.itemsize:
                raise _corrupt(path, role, f"tensor {name!r} of shape {list(shape)} stored in {end - start} bytes")
            self.tensors[name] = TensorInfo(dtype, shape, start, end)
        self.size = size

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def get(self, name: str) -> torch.Tensor:
        """A tensor backed by the file mapping: no bytes are read until it is used."""
        info = self.tensors[name]
        if self._mmap is None:
            with open(self.path, "rb") as f:
                # ACCESS_COPY: writable for torch.frombuffer, yet pages stay shared with the
                # page cache until somebody writes to them (nobody does).
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                register_mapping(self._mmap, f.fileno())
        numel = (info.end - info.start) // info.dtype.itemsize
        if numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(self._mmap, dtype=info.dtype, count=numel, offset=info.start)
        return flat.view(info.shape)

    def close(self) -> None:
        # Tensors handed out hold their own reference to the mapping; dropping ours is enough.
        self._mmap = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _corrupt(path: str, role: str, found: str) -> ZImageError:
    return ZImageError(f"the {role} is not a valid safetensors file", where=path, found=found,
                       fix="the file is damaged or not a safetensors file: download it again.")


def _reject_gguf(path: str, head: bytes, role: str) -> None:
    if head[:4] == b"GGUF":
        raise ZImageError(
            f"the {role} is a GGUF file; this loader reads .safetensors only", where=path,
            fix="load GGUF files with a GGUF-capable loader such as city96's ComfyUI-GGUF "
                "(its 'Unet Loader (GGUF)' node), or use z_image_turbo_bf16.safetensors here.")


def _reject_pickle(path: str, head: bytes, role: str) -> None:
    # Only asked once the bytes failed as a safetensors header: a header length may start 0x80 too.
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise ZImageError(
            f"the {role} is a pickled PyTorch checkpoint (.ckpt/.pt/.bin), not safetensors", where=path,
            fix="use the .safetensors release of the model; pickled files can run code and are not loaded.")
