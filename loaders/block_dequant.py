"""fp8 -> bf16 dequantisation of a whole streamed block in one GPU kernel launch.

A streamed block stored in fp8 holds each matrix as float8_e4m3fn rows, each with one float32
scale, at fixed offsets of its staging buffer; its bf16 copy goes to fixed offsets of the compute
buffer. A table of chunks (a run of rows of one matrix: where its fp8 rows, scales and bf16 rows
start, how many rows, how long) describes the whole block, so one Triton launch converts every
matrix. Same arithmetic as `fp8_matmul._dequantize` (fp8 -> float32, times the row's scale,
rounded once to bf16): the same bits.

Why not the compiled `_dequantize`: it launches a kernel per matrix and reached ~1.5 TB/s in a
streaming run (H100); this kernel is for the memory traffic alone (bench/kernel_options.py).
Where Triton is missing, on a CPU, or where a layout does not meet the kernel's alignment (every
row length and offset a multiple of 16 bytes, for 16-byte loads), the caller falls back.
"""
from __future__ import annotations

import torch

from .gpu_kernels import Guarded

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

# Elements per program, tile and warps: the fastest of 18 shapes on an H100 (0.229 ms a layer,
# 2.37 TB/s; 32768 elements with 4 warps 0.248; bench/kernel_options.py).
CHUNK_ELEMENTS = 65536
_TILE_ROWS, _TILE_COLS, _WARPS = 8, 256, 8

if triton is not None:
    @triton.jit
    def _dequant_chunks(stage_ptr, scale_ptr, out_ptr, table_ptr, R: tl.constexpr, C: tl.constexpr):
        base = table_ptr + tl.program_id(0) * 5
        # the table builder checked these alignments: they let the loads and stores be 16 bytes wide
        src = tl.multiple_of(tl.load(base).to(tl.int64), 16)
        scl = tl.load(base + 1).to(tl.int64)
        dst = tl.multiple_of(tl.load(base + 2).to(tl.int64), 8)
        rows = tl.load(base + 3)
        cols = tl.multiple_of(tl.load(base + 4), 16)
        ri = tl.arange(0, R)[:, None]
        ci = tl.arange(0, C)[None, :]
        for rt in range(0, tl.cdiv(rows, R)):
            r = rt * R + ri
            rm = r < rows
            s = tl.load(scale_ptr + scl + r, mask=rm, other=0.0)
            row = r.to(tl.int64) * cols
            for ct in range(0, tl.cdiv(cols, C)):
                c = ct * C + ci
                m = rm & (c < cols)
                w = tl.load(stage_ptr + src + row + c, mask=m, other=0).to(tl.float8e4nv, bitcast=True)
                tl.store(out_ptr + dst + row + c, (w.to(tl.float32) * s).to(tl.bfloat16), mask=m)


class ChunkTable:
    """Where a block's fp8 matrices are: one row per chunk (a run of rows of one matrix), built once
    per block. `key` is the same for blocks of one layout (every layer), so a streamer keeps one
    device copy per layout (a layer's is 0.1 MB)."""

    def __init__(self, rows: torch.Tensor):
        self.rows, self.key = rows, rows.numpy().tobytes()

    @classmethod
    def of(cls, matrices: list[tuple[int, int, int, int, int]]) -> "ChunkTable | None":
        """The table for matrices given as (fp8 byte offset in the staging buffer, byte offset of
        its float32 scales there, bf16 element offset in the compute buffer, rows, row length); None
        when the kernel cannot take the layout (offsets or row lengths not multiples of 16 bytes,
        offsets past int32) or there is nothing to convert."""
        out = []
        for src, scale, dst, rows, cols in matrices:
            if src % 16 or dst % 8 or cols % 16 or scale % 4 or max(src, dst) + rows * cols >= 2**31:
                return None
            step = max(1, CHUNK_ELEMENTS // cols)
            for r in range(0, rows, step):
                out.append((src + r * cols, scale // 4 + r, dst + r * cols, min(step, rows - r), cols))
        return cls(torch.tensor(out, dtype=torch.int32)) if out else None


def _launch(stage: torch.Tensor, compute: torch.Tensor, table: torch.Tensor) -> bool:
    with torch.cuda.device(stage.device):  # Triton launches on the current device (gpu_kernels)
        _dequant_chunks[(table.shape[0],)](stage, stage.view(torch.float32), compute.view(torch.bfloat16), table,
                                           R=_TILE_ROWS, C=_TILE_COLS, num_warps=_WARPS)
    return True


launch = Guarded(_launch)


def dequantize_block(stage: torch.Tensor, compute: torch.Tensor, table: torch.Tensor) -> bool:
    """Every chunk of `table` (a ChunkTable's rows, on the device) from `stage` (uint8: fp8 rows,
    float32 scales) into `compute` (uint8: bf16 rows), on the current CUDA stream. False, with
    nothing written, where the kernel cannot run: no Triton, not a CUDA device, or it failed once
    (GPUs before Ada have no fp8 conversion in Triton); the caller converts another way."""
    return triton is not None and stage.device.type == "cuda" and bool(launch(stage, compute, table))
