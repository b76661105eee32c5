"""bf16 weights packed in 12 bits: every bf16 value comes back with its bits, the kernel's chunk
table (replayed in Python as the Triton kernel reads it) gives those bits, the planner counts the
packed size the host copies really have, and a run with packed streamed blocks is bitwise the
resident run."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

GiB = 2**30


def _round_trip(t: torch.Tensor) -> torch.Tensor:
    from zimage_nodes.loaders import exponent_pack as ep

    p = ep.pack(t)
    out = torch.empty(t.numel(), dtype=torch.int16)
    ep.unpack_into(p.low, p.codes, p.base, out)
    ep.patch(out, p.listed_at, p.listed_bits)
    return out


SPECIAL = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 3e38, -1e-30, 1.0, 65504.0, 2.0**-126]


@pytest.mark.parametrize("case", ["gaussian", "special", "log-uniform", "every-bit-pattern"])
def test_every_value_comes_back_with_its_bits(pack, case):
    from zimage_nodes.loaders import exponent_pack as ep

    g = torch.Generator().manual_seed(0)
    if case == "gaussian":
        t = (torch.randn(96, 130, generator=g) * 0.02).bfloat16()
    elif case == "special":
        t = torch.cat([torch.tensor(SPECIAL), torch.randn(52, generator=g)]).bfloat16().reshape(8, 8)
    elif case == "log-uniform":  # exponents spread over 2^-60..2^60: most values listed apart
        t = (torch.rand(40, 40, generator=g) * 120 - 60).exp2().bfloat16()
    else:
        t = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256)
    assert torch.equal(_round_trip(t), t.view(torch.int16).reshape(-1))
    base, listed = ep.exponent_window(t)
    assert ep.pack(t).listed_at.numel() == listed
    if case == "gaussian":  # N(0, s): ~2e-4 of the values fall outside the 15 exponents
        assert listed / t.numel() < 2e-3 and ep.worth_packing(t.numel(), listed)
    if case in ("log-uniform", "every-bit-pattern"):
        assert not ep.worth_packing(t.numel(), listed)


def test_packing_piece_by_piece_gives_the_same_bytes(pack, monkeypatch):
    from zimage_nodes.loaders import exponent_pack as ep

    g = torch.Generator().manual_seed(1)
    t = (torch.randn(50, 64, generator=g) * 0.02).bfloat16()
    t[3, :6] = torch.tensor(SPECIAL[:6])  # listed values in several pieces
    t[40, 10] = 0.0
    whole = ep.pack(t)
    monkeypatch.setattr(ep, "PIECE", 256)  # 13 pieces
    assert ep.exponent_window(t) == (whole.base, whole.listed_at.numel())
    pieces = ep.pack(t.float())  # from float32, as a file may hold it
    for name in ("low", "codes", "listed_at", "listed_bits"):
        assert torch.equal(getattr(pieces, name), getattr(whole, name)), name
    assert whole.listed_at.numel() >= 6 and torch.equal(_round_trip(t), t.view(torch.int16).reshape(-1))


def _block(scale: float = 0.02) -> nn.Module:
    torch.manual_seed(0)
    m = nn.Module()
    m.norm = nn.LayerNorm(64)
    m.q = nn.Linear(64, 48, bias=False)
    m.up = nn.Linear(64, 160)
    m.down = nn.Linear(160, 64)
    m.wide = nn.Linear(8, 8, bias=False)  # exponents all over the place: stays bf16
    for p in m.parameters():
        p.data.normal_(0, scale)
    m.wide.weight.data = (torch.rand(8, 8) * 120 - 60).exp2()
    with torch.no_grad():
        m.q.weight[0, :4] = torch.tensor([0.0, float("inf"), 1e-30, 300.0])  # listed apart
    return m.bfloat16()


def _replay(rows: torch.Tensor, stage: torch.Tensor, compute: torch.Tensor) -> None:
    """What `_unpack_chunks` does, program by program: int16 pairs of low bytes, a code byte per
    pair, an int32 pair of bf16 bits out."""
    low16, out32 = stage.view(torch.int16).to(torch.int64) & 0xFFFF, compute.view(torch.int32)
    for lo, code, dst, pairs, base in rows.tolist():
        lo2 = low16[lo:lo + pairs]
        c = stage[code:code + pairs].to(torch.int64)

        def bits(low, cd):
            return ((low & 0x80) << 8) | ((cd + base) << 7) | (low & 0x7F)

        word = bits(lo2 & 0xFF, c & 15) | (bits(lo2 >> 8, c >> 4) << 16)
        out32[dst:dst + pairs] = (word - ((word >> 31) << 32)).to(torch.int32)


def test_the_kernel_table_and_the_pytorch_path_give_the_weights_bits(pack, monkeypatch):
    from zimage_nodes.loaders import exponent_pack as ep
    from zimage_nodes.loaders.streaming import HostBlock

    monkeypatch.setattr(ep, "CHUNK_ELEMENTS", 1000)  # several chunks per matrix
    block = _block()
    host = HostBlock("b", block, "packed", True, torch.bfloat16)
    packed = {e.name for e in host.entries if e.packed}
    assert packed == {"q.weight", "up.weight", "down.weight"} and host.listed >= 3
    assert host.packs is not None and len(host.packs.rows) > 3
    assert sum(2 * r[3] for r in host.packs.rows.tolist()) == 48 * 64 + 160 * 64 + 64 * 160  # every weight once
    plain = HostBlock("b", block, "bf16", True, torch.bfloat16)
    assert host.stage_bytes < 0.8 * plain.stage_bytes  # 3/4 of the matrices' bytes, plus alignment
    stage = torch.zeros(host.stage_bytes, dtype=torch.uint8)
    host.copy_into(stage, non_blocking=False)
    for path in ("pytorch", "table"):
        compute = torch.zeros(host.compute_bytes, dtype=torch.uint8)
        if path == "pytorch":
            host.dequantize(stage, compute, {})  # no CUDA here: the per-matrix path, then the listed values
        else:
            _replay(host.packs.rows, stage, compute)
            k = host.listed
            ep.patch(compute.view(torch.int16), stage[host.listed_at_off:host.listed_at_off + 8 * k].view(torch.int64),
                     stage[host.listed_bits_off:host.listed_bits_off + 2 * k].view(torch.int16))
        views = host.views(stage, compute)
        for name, t in block.state_dict().items():
            assert torch.equal(views[name].view(torch.int16), t.view(torch.int16)), (path, name)


def test_float32_compute_or_a_mapped_copy_is_not_packed(pack):
    from zimage_nodes.loaders.streaming import HostBlock

    assert not any(e.packed for e in HostBlock("b", _block().float(), "packed", True, torch.float32).entries)
    assert HostBlock("b", _block(), "packed", False, torch.bfloat16).storage == "bf16"


def test_the_planner_counts_the_packed_copies_as_they_are_built(tiny, pack):
    from zimage_nodes.loaders import component_loading
    from zimage_nodes.loaders.model_sizes import ModelSizes, transformer_block_names
    from zimage_nodes.loaders.streaming import HostBlock

    t = component_loading.load_transformer(tiny["diffusers"], torch.bfloat16).module
    te = component_loading.load_text_encoder(tiny["diffusers"], torch.bfloat16).module
    v = component_loading.load_vae(tiny["diffusers"], torch.float32).module
    sizes = ModelSizes.of(t, te, v, torch.bfloat16, torch.float32, packed=True)
    names = transformer_block_names(t)
    built = [HostBlock(n, t.get_submodule(n), "packed", True, torch.bfloat16).stage_bytes for n in names]
    assert list(sizes.transformer_blocks_packed) == built
    assert all(p < b for p, (_, b) in zip(built, sizes.transformer_blocks))


def test_packed_storage_streams_three_quarters_of_the_bytes(pack):
    from zimage_nodes.loaders.model_sizes import ModelSizes
    from zimage_nodes.loaders.placement import plan_memory

    blocks = tuple((f"layers.{i}", 390 * 2**20) for i in range(30))
    sizes = ModelSizes(2**28, blocks, 2**29, 2**20, (200 * 2**20,) * 36, 160 * 2**20)
    packed = dataclasses.replace(sizes, transformer_blocks_packed=tuple(b * 3 // 4 for _, b in blocks))
    kw = dict(host_budget_gb=64, free_bytes=79 * GiB)
    bf16 = plan_memory(sizes, "cuda:0", 6, storage="bf16", **kw)
    unmeasured = plan_memory(sizes, "cuda:0", 6, storage="packed", **kw)
    p = plan_memory(packed, "cuda:0", 6, storage="packed", **kw)
    # bf16's size until measured (and room for the shared unpacking buffer)
    assert unmeasured.streamed_bytes_per_step / len(unmeasured.streamed) == 390 * 2**20
    assert p.peak_bytes <= 6 * GiB and p.n_buffers == 2
    per_block = p.streamed_bytes_per_step / len(p.streamed) / (bf16.streamed_bytes_per_step / len(bf16.streamed))
    assert per_block == pytest.approx(0.75, abs=0.01)
    assert p.pinned_bytes < bf16.pinned_bytes and "packed to 75% of bf16" in p.summary()
    assert unmeasured.packed_fraction is None and "packed)" in unmeasured.summary()


def test_each_gpu_s_share_keeps_its_blocks_packed_sizes(pack):
    from zimage_nodes.loaders.model_sizes import ModelSizes
    from zimage_nodes.loaders.placement import plan_devices

    blocks = tuple((f"layers.{i}", 390 * 2**20) for i in range(30))
    sizes = ModelSizes(2**28, blocks, 2**29, 2**20, (200 * 2**20,) * 36, 160 * 2**20,
                       transformer_blocks_packed=tuple(293 * 2**20 + i for i in range(30)))
    devs = ["cuda:0", "cuda:1"]
    p = plan_devices(sizes, devs, [5, 5], 64, storage="packed", free_bytes={d: 79 * GiB for d in devs})
    assert len(p.device_plans) == 2 and all(d.peak_bytes <= 5 * GiB for d in p.device_plans)
    first = len(p.device_plans[0].blocks)
    second = p.device_plans[1].sizes
    assert second.transformer_blocks_packed == sizes.transformer_blocks_packed[first:]  # its own blocks'
    assert all(d.streamed and d.packed_fraction == pytest.approx(0.751, abs=0.001) for d in p.device_plans)


def test_packed_streamed_blocks_give_the_resident_run_s_bits(tiny, pack):
    from test_streaming import run, use_plan

    from zimage_nodes.loaders.pipeline_loading import load_parts

    parts = load_parts(tiny["diffusers"], device="cpu", dtype=torch.bfloat16, storage="packed")
    reference = run(parts)
    use_plan(parts, ["pinned"] * 4, storage="packed")
    streamed = run(parts)
    host = parts.transformer.last_streamer.blocks[0][1]
    assert host.storage == "packed" and any(e.packed for e in host.entries)
    assert torch.equal(reference, streamed)


def test_packed_text_encoder_layers_encode_to_the_same_bits(tiny, pack):
    from test_streaming import use_plan

    from zimage_nodes.loaders.pipeline_loading import load_parts

    parts = load_parts(tiny["diffusers"], device="cpu", dtype=torch.bfloat16, storage="packed")
    te = parts.text_encoder
    sizes = parts.runtime.sizes
    assert len(sizes.text_encoder_blocks_packed) == len(sizes.text_encoder_blocks)
    assert all(p < b for p, b in zip(sizes.text_encoder_blocks_packed, sizes.text_encoder_blocks))
    outputs = {}
    for storage in ("bf16", "packed"):  # the same streamed path, the layers pinned as bf16 or packed
        use_plan(parts, ["gpu"] * 4, storage=storage, text_encoder="streamed", te_host="pinned")
        te.release()
        te._cache.clear()
        te.encode("a warm-up prompt: the first prompt streams from the file, later ones pinned")
        outputs[storage] = te.encode("a lighthouse at dusk")
    assert torch.equal(outputs["packed"], outputs["bf16"])
    assert te._pinned is not None and all(h.storage == "packed" and h.dequantized for h in te._pinned.values())
    assert parts.runtime.plan.pinned_bytes < dataclasses.replace(parts.runtime.plan, storage="bf16").pinned_bytes
