"""The chunk table of the one-launch fp8 dequantisation: on a CPU the table is replayed in Python
exactly as the Triton kernel reads it, and must give the same bits as the per-matrix path."""
from __future__ import annotations

import torch
from torch import nn


def _block(cols: int) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.norm = nn.LayerNorm(cols)
    m.q = nn.Linear(cols, 48, bias=False)
    m.up = nn.Linear(cols, 80)
    m.down = nn.Linear(80, cols)
    for p in m.parameters():
        p.data.normal_(0, 0.5)
    return m


def _replay(rows: torch.Tensor, stage: torch.Tensor, compute: torch.Tensor) -> None:
    """What `_dequant_chunks` does, program by program."""
    scales = stage.view(torch.float32)
    out = compute.view(torch.bfloat16)
    for src, scl, dst, n, cols in rows.tolist():
        w = stage[src:src + n * cols].view(torch.float8_e4m3fn).view(n, cols).float()
        out[dst:dst + n * cols] = (w * scales[scl:scl + n, None]).to(torch.bfloat16).reshape(-1)


def test_chunk_table_replays_to_the_same_bits_as_the_per_matrix_path(pack, monkeypatch):
    from zimage_nodes.loaders import block_dequant
    from zimage_nodes.loaders.streaming import HostBlock

    monkeypatch.setattr(block_dequant, "CHUNK_ELEMENTS", 100)  # several chunks per matrix
    host = HostBlock("b", _block(32), "fp8", False, torch.bfloat16)
    assert host.chunks is not None
    rows = host.chunks.rows
    assert len(rows) > 3  # q, up and down, each split
    assert sum(n * c for *_, n, c in rows.tolist()) == 48 * 32 + 80 * 32 + 32 * 80  # every element once
    stage = host.host.clone()
    reference = torch.zeros(host.compute_bytes, dtype=torch.uint8)
    host.dequantize(stage, reference, {})  # no CUDA here: the per-matrix path
    replayed = torch.zeros(host.compute_bytes, dtype=torch.uint8)
    _replay(rows, stage, replayed)
    fp8_bytes = [(e.compute_off, e.numel * 2) for e in host.entries if e.stage_dtype == torch.float8_e4m3fn]
    for off, n in fp8_bytes:
        assert torch.equal(replayed[off:off + n], reference[off:off + n])
        assert reference[off:off + n].any()


def test_layouts_the_kernel_cannot_load_16_bytes_at_a_time_have_no_table(pack):
    from zimage_nodes.loaders.streaming import HostBlock

    assert HostBlock("b", _block(24), "fp8", False, torch.bfloat16).chunks is None  # rows of 24 bytes
    assert HostBlock("b", _block(32), "fp8", False, torch.float32).chunks is None  # float32 compute
    assert HostBlock("b", _block(32), "bf16", False, torch.bfloat16).chunks is None  # nothing to convert
