"""bf16 weights in 12 bits each, exactly: fewer bytes to stream with bf16's bits at the GPU.

A bf16 number is a sign, 8 exponent bits and 7 mantissa bits. A weight matrix uses few exponents:
N(0, s) puts all but ~2e-4 of its values within 15 consecutive ones (a value below s/4096 is that
rare). Each matrix keeps its sign and mantissa as one byte per weight and its exponent as a 4-bit
code: 1..15 for the 15 most used consecutive exponents (from `base` + 1 on), 0 for any other value
(zero, a tiny value, an outlier, inf or NaN), whose whole bits are listed apart with where they go.
That is 1.5 bytes a weight instead of 2, so a streamed block copies 3/4 of its bytes over PCIe, and
unpacks back to the same bits: the output is bitwise the bf16 run's.

Unpacking is one Triton launch per block (a table of chunks, as block_dequant's), two weights per
lane: a 16-bit load of their bytes, an 8-bit load of their codes, a 32-bit store. The listed values
are then written over their places by one indexing launch. On a CPU, without Triton, or where a
layout does not meet the kernel's alignment, the same arithmetic runs as PyTorch operations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .gpu_kernels import Guarded

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

WINDOW = 15  # exponents a 4-bit code names; code 0 marks a value listed apart
CHUNK_ELEMENTS = 65536  # weights per kernel program
# Weight pairs per program tile and warps: the fastest of 8 shapes on an H100 (0.299 ms a layer block,
# 2.1 TB/s; 1024 pairs with 4 warps 0.344; bench/kernel_options.py exponent_unpack).
_PAIRS, _WARPS = 512, 8
LISTED_BYTES = 10  # a listed value: int64 place + its int16 bits
PIECE = 2**23  # weights packed or counted at once: bounds the work memory (~100 MB on a GPU)


def _pieces(t: torch.Tensor, device: torch.device | None):
    """`t`'s weights in bf16 on `device` (None: where `t` is), PIECE at a time: (first index, piece)."""
    flat = t.detach().reshape(-1)
    for s in range(0, flat.numel(), PIECE):
        yield s, flat[s:s + PIECE].to(device or flat.device, torch.bfloat16)


def exponent_window(t: torch.Tensor, device: torch.device | None = None) -> tuple[int, int]:
    """(base, how many values fall outside exponents base+1..base+15) for `t` in bf16, the window
    chosen to leave the fewest outside; counted on `device` (None: where `t` is)."""
    hist = None
    for _, piece in _pieces(t, device):
        # of uint8: 0.19 s for a 39 M matrix against 0.31 of int64 on a CPU
        h = torch.bincount(((piece.view(torch.int16) >> 7) & 0xFF).to(torch.uint8), minlength=256)
        hist = h if hist is None else hist + h
    run = torch.cat([hist.new_zeros(1), hist.cumsum(0)]).cpu()
    inside = run[WINDOW + 1:] - run[1:-WINDOW]  # inside[b]: exponents b+1 .. b+15, b = 0..240
    base = int(inside.argmax())
    return base, t.numel() - int(inside[base])


def packs(t: torch.Tensor) -> bool:
    """Whether `t` is a matrix this format takes once in bf16: 2-D, an even number of weights."""
    return t.is_floating_point() and t.ndim == 2 and t.numel() > 0 and t.numel() % 2 == 0


_WINDOWS = WeakIdKeyDictionary()


def window_of(t: torch.Tensor, device: torch.device | None = None) -> tuple[int, int]:
    """`exponent_window` of `t`, remembered with the tensor: the planner sizes every block from it,
    and the host copies are built from it later (one pass over the weights for both)."""
    hit = _WINDOWS.get(t)
    if hit is None:
        hit = _WINDOWS[t] = exponent_window(t, device)
    return hit


def packed_bytes(numel: int, listed: int) -> int:
    """Bytes of one packed matrix before alignment: sign-and-mantissa bytes, codes, listed values."""
    return numel + numel // 2 + listed * LISTED_BYTES


def worth_packing(numel: int, listed: int) -> bool:
    """Packed only when smaller than bf16 (a matrix with > 1/20 of its values listed is not)."""
    return packed_bytes(numel, listed) < 2 * numel


@dataclass
class Packed:
    low: torch.Tensor  # uint8 [n]: sign << 7 | mantissa
    codes: torch.Tensor  # uint8 [n / 2]: exponent code of weight 2i in the low nibble, of 2i+1 in the high
    base: int
    listed_at: torch.Tensor  # int64: places (in the matrix) of the values listed apart
    listed_bits: torch.Tensor  # int16: their bits


def pack_into(t: torch.Tensor, base: int, low: torch.Tensor, codes: torch.Tensor,
              device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack `t` (see `packs`) with window `base` into `low` (uint8, one per weight) and `codes`
    (uint8, one per pair), working on `device` (None: where `t` is); returns the listed values'
    places and bits, on the CPU."""
    ats, listed = [], []
    for s, piece in _pieces(t, device):
        bits = piece.view(torch.int16)  # int16 throughout: half the memory traffic of int32
        code = ((bits >> 7) & 0xFF) - base
        code.masked_fill_((code < 1) | (code > WINDOW), 0)
        low[s:s + len(bits)].copy_((((bits >> 8) & 0x80) | (bits & 0x7F)).to(torch.uint8))
        codes[s // 2:(s + len(bits)) // 2].copy_((code[0::2] | (code[1::2] << 4)).to(torch.uint8))
        at = (code == 0).nonzero().reshape(-1)
        listed.append(bits[at].cpu())
        ats.append(at.cpu() + s)
    return torch.cat(ats), torch.cat(listed)


def pack(t: torch.Tensor, base: int | None = None) -> Packed:
    """`t` (see `packs`) packed, on the CPU; `base` as `exponent_window` chose it (computed if None)."""
    if base is None:
        base = exponent_window(t)[0]
    low = torch.empty(t.numel(), dtype=torch.uint8)
    codes = torch.empty(t.numel() // 2, dtype=torch.uint8)
    at, bits = pack_into(t, base, low, codes)
    return Packed(low, codes, base, at, bits)


def unpack_into(low: torch.Tensor, codes: torch.Tensor, base: int, out: torch.Tensor) -> None:
    """The bits of a packed matrix into `out` (int16, as many weights as `low`), listed values aside
    (`patch` writes them): PyTorch operations, for CPUs and as the kernel's fallback."""
    c = codes.to(torch.int32)
    code = torch.stack([c & 15, c >> 4], dim=-1).reshape(-1)
    lo = low.to(torch.int32)
    bits = ((lo & 0x80) << 8) | ((code + base) << 7) | (lo & 0x7F)
    out.copy_(bits - ((bits >> 15) << 16))


def patch(out16: torch.Tensor, at: torch.Tensor, bits: torch.Tensor) -> None:
    """Write the listed values (`bits`, int16) at their places `at` (int64) of `out16`."""
    if at.numel():
        out16.index_put_((at,), bits)


if triton is not None:
    @triton.jit
    def _unpack_chunks(low_ptr, code_ptr, out_ptr, table_ptr, P: tl.constexpr):
        row = table_ptr + tl.program_id(0) * 5
        # offsets in the units of each pointer: int16 pairs of low bytes, code bytes, int32 pairs out
        lo_at = tl.multiple_of(tl.load(row).to(tl.int64), 8)
        code_at = tl.multiple_of(tl.load(row + 1).to(tl.int64), 16)
        out_at = tl.multiple_of(tl.load(row + 2).to(tl.int64), 4)
        pairs = tl.load(row + 3)
        base = tl.load(row + 4).to(tl.uint32)
        j = tl.arange(0, P)
        for t in range(0, tl.cdiv(pairs, P)):
            k = t * P + j
            m = k < pairs
            lo = tl.load(low_ptr + lo_at + k, mask=m, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
            c = tl.load(code_ptr + code_at + k, mask=m, other=0).to(tl.uint32)
            le = lo & 0xFF
            lodd = lo >> 8
            even = ((le & 0x80) << 8) | (((c & 15) + base) << 7) | (le & 0x7F)
            odd = ((lodd & 0x80) << 8) | (((c >> 4) + base) << 7) | (lodd & 0x7F)
            tl.store(out_ptr + out_at + k, (even | (odd << 16)).to(tl.int32, bitcast=True), mask=m)


class PackTable:
    """Where a block's packed matrices are: one row per chunk, (low byte offset / 2, code byte
    offset, output element offset / 2, weight pairs, base). `key` is shared by blocks of one layout
    and window choice, so a streamer keeps one device copy per key."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.key = rows, rows.numpy().tobytes()

    @classmethod
    def of(cls, matrices: list[tuple[int, int, int, int, int]]) -> "PackTable | None":
        """For matrices given as (low byte offset, code byte offset, output byte offset, weights,
        base); None where the kernel cannot take the layout (offsets not 16-byte aligned, an odd
        count, past int32) or nothing is packed."""
        out = []
        for lo, code, dst, n, base in matrices:
            if lo % 16 or code % 16 or dst % 16 or n % 2 or max(lo, dst) + 2 * n >= 2**31:
                return None
            for s in range(0, n, CHUNK_ELEMENTS):
                k = min(CHUNK_ELEMENTS, n - s)
                out.append(((lo + s) // 2, code + s // 2, (dst + 2 * s) // 4, k // 2, base))
        return cls(torch.tensor(out, dtype=torch.int32)) if out else None


def _launch(stage: torch.Tensor, compute: torch.Tensor, table: torch.Tensor) -> bool:
    with torch.cuda.device(stage.device):  # Triton launches on the current device (gpu_kernels)
        _unpack_chunks[(table.shape[0],)](stage.view(torch.int16), stage, compute.view(torch.int32), table,
                                          P=_PAIRS, num_warps=_WARPS)
    return True


launch = Guarded(_launch)


def unpack_block(stage: torch.Tensor, compute: torch.Tensor, table: torch.Tensor) -> bool:
    """Every chunk of `table` (a PackTable's rows, on the device) from `stage` into `compute` (both
    uint8, lengths multiples of 4), on the current CUDA stream, listed values aside. False, with
    nothing written, where the kernel cannot run (no Triton, not CUDA, it failed once)."""
    return triton is not None and stage.device.type == "cuda" and bool(launch(stage, compute, table))
