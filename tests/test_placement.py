"""The memory planner, for the full-size model's sizes (pure: GPU and RAM sizes are given)."""
from __future__ import annotations

import pytest

GiB = 2**30


@pytest.fixture(scope="module")
def sizes(pack):
    """The real model's part sizes, measured from diffusers' and transformers' classes on the
    meta device (no memory), the same way the loader measures loaded files."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_nodes.loaders.model_detection import scaffold_config
    from zimage_nodes.loaders.model_sizes import ModelSizes

    with torch.device("meta"):
        t = ZImageTransformer2DModel(**scaffold_config("transformer"))
        te = Qwen3Model(Qwen3Config(**scaffold_config("text_encoder")))
        v = AutoencoderKL(**scaffold_config("vae"))
    return ModelSizes.of(t, te, v, torch.bfloat16, torch.bfloat16)


def plan(sizes, budget_gb, host_gb=64, **kw):
    from zimage_nodes.loaders.placement import plan_memory

    return plan_memory(sizes, "cuda:0", budget_gb, host_gb, free_bytes=79 * GiB, **kw)


def test_sizes_of_the_real_model(sizes):
    assert len(sizes.transformer_blocks) == 34  # 2 noise refiners, 2 context refiners, 30 layers
    assert sizes.transformer_blocks[0][0] == "noise_refiner.0" and sizes.transformer_blocks[-1][0] == "layers.29"
    assert 12.2e9 < sizes.transformer < 12.4e9 and 8.0e9 < sizes.text_encoder < 8.1e9
    assert len(sizes.text_encoder_blocks) == 36 and 0.77e9 < sizes.text_encoder_embedding < 0.79e9


def test_everything_resident_when_the_budget_holds_it(sizes):
    p = plan(sizes, 0)
    assert all(w.value == "gpu" for _, w in p.blocks) and p.text_encoder == "streamed" and not p.vae_tiled
    assert p.streamed_bytes_per_step == 0
    assert p.pinned_bytes == sum(sizes.text_encoder_blocks) + sizes.vae + p.resident_bytes - sizes.transformer_stem


@pytest.mark.parametrize("budget", [4, 6, 8, 12, 16])
def test_every_phase_stays_in_the_budget(sizes, budget):
    p = plan(sizes, budget, storage="fp8" if budget == 4 else "bf16")
    assert p.peak_bytes <= budget * GiB
    assert set(p.phases) == {"encode", "denoise", "decode"}


def test_plan_streams_late_and_early_blocks_alike_when_budget_is_8gb(sizes):
    p = plan(sizes, 8)
    per_step = [(n, w) for n, w in p.blocks if not n.startswith("context_refiner.")]
    streamed = [w.value != "gpu" for _, w in per_step]
    assert 8 <= sum(streamed) <= 26
    # spread evenly over the blocks every step calls: never more than two streamed blocks in a row,
    # so copies hide behind compute
    runs = "".join("s" if s else "r" for s in streamed).split("r")
    assert max(len(r) for r in runs) <= 2
    # the context refiners run once per caption: streamed (once per new prompt), not counted per step
    refiners = [(i, w) for i, (n, w) in enumerate(p.blocks) if n.startswith("context_refiner.")]
    assert len(refiners) == 2 and all(w.value == "pinned" for _, w in refiners)
    assert p.streamed_bytes_per_step == sum(p._block_bytes(i, w) for i, (_, w) in enumerate(p.blocks)
                                            if w.value == "pinned") - sum(p._block_bytes(i, w) for i, w in refiners)
    assert "2 more once per new prompt" in p.summary()
    assert p.text_encoder == "streamed"


def test_the_context_refiners_are_the_last_blocks_made_resident(sizes):
    from zimage_nodes.loaders.placement import _resident_set

    names = [n for n, _ in sizes.transformer_blocks]
    per_step = [i for i, n in enumerate(names) if not n.startswith("context_refiner.")]
    assert sum(_resident_set(names, len(per_step))) == len(per_step)
    assert not any(r for n, r in zip(names, _resident_set(names, len(per_step))) if n.startswith("context_refiner."))
    assert sum(r for n, r in zip(names, _resident_set(names, len(per_step) + 1))
               if n.startswith("context_refiner.")) == 1


def test_a_decode_moves_resident_blocks_out_rather_than_tile_when_that_is_cheap(sizes):
    """At 8 GiB a 1024x1024 decode does not fit beside the resident blocks: the fewest of them
    that make room (those with a pinned copy, to come back at PCIe speed) leave the GPU for it;
    without pinned copies, or when too much would have to leave, the decode is tiled."""
    from zimage_nodes.loaders.placement import DECODE_MOVE_OUT_MAX_BYTES, decode_work_bytes

    p = plan(sizes, 8)
    moved, tiled = p.decode_plan(1024, 1024, 1)
    assert moved == p.decode_moved_out and moved and not tiled and not p.vae_tiled
    assert set(moved) <= set(p.resident_pinned)
    assert p.phases["decode"] <= 8 * GiB and p.peak_bytes <= 8 * GiB
    moved_bytes = sum(dict(sizes.transformer_blocks)[n] for n in moved)
    assert 0 < moved_bytes <= DECODE_MOVE_OUT_MAX_BYTES
    assert p.phases["decode"] + moved_bytes > 8 * GiB  # they had to go: without moving them it would not fit
    assert decode_work_bytes(1024, 1024, 1, False) + sizes.vae < p.phases["decode"]
    fewer = dict(p.blocks)
    assert all(fewer[n].value == "gpu" for n in moved)
    assert f"{len(moved)} resident blocks moved out for it" in p.summary()
    assert p.decode_plan(640, 640, 1) == ((), False)  # a smaller image fits beside them all
    assert p.decode_plan(2048, 2048, 1) == ((), True)  # 10 GB of decode: tiles
    no_copies = plan(sizes, 8, host_gb=6.5)  # the streamed blocks take the pinned RAM
    assert not no_copies.resident_pinned and no_copies.decode_plan(1024, 1024, 1) == ((), True)
    assert no_copies.vae_tiled and not no_copies.decode_moved_out


def test_more_budget_means_more_resident_blocks(sizes):
    resident = [len(p.blocks) - len(p.streamed) for p in (plan(sizes, b) for b in (6, 8, 12, 16))]
    assert resident == sorted(resident) and resident[0] < resident[-1]


def test_bf16_streaming_has_two_buffers_and_the_third_one_s_room_holds_a_resident_block(sizes, monkeypatch):
    from zimage_nodes.loaders import placement

    bf16, fp8 = plan(sizes, 8), plan(sizes, 8, storage="fp8")
    assert (bf16.n_buffers, fp8.n_buffers) == (2, 3)
    monkeypatch.setitem(placement.N_BUFFERS, placement.Storage.BF16, 3)
    three = plan(sizes, 8)
    assert three.n_buffers == 3 and len(three.streamed) == len(bf16.streamed) + 1
    assert three.peak_bytes <= 8 * GiB and bf16.peak_bytes <= 8 * GiB


def test_fp8_storage_halves_the_bytes_streamed_per_step(sizes):
    bf16, fp8 = plan(sizes, 6), plan(sizes, 6, storage="fp8")
    per_block = [p.streamed_bytes_per_step / len(p.streamed) for p in (bf16, fp8)]
    assert 0.49 < per_block[1] / per_block[0] < 0.52
    # fp8's three half-size staging buffers and its shared bf16 dequantisation buffer take half a
    # bf16 block more than bf16's two staging buffers: at most one block fewer stays resident
    assert len(bf16.streamed) <= len(fp8.streamed) <= len(bf16.streamed) + 1
    assert fp8.phases["denoise"] <= 6 * GiB


def test_host_ram_fallback_streams_from_the_mapped_file_when_pinned_ram_is_short(sizes):
    p = plan(sizes, 6, host_gb=3)
    kinds = [w.value for _, w in p.blocks if w.value != "gpu"]
    assert "pinned" in kinds and "mapped" in kinds
    assert p.pinned_bytes <= 3 * GiB
    assert p.text_encoder_host.value == "mapped"
    assert "from the mapped file" in p.summary()


def test_higher_resolution_and_batch_need_more_working_memory(sizes):
    small, big = plan(sizes, 12), plan(sizes, 12, height=2048, width=2048, batch=2)
    assert len(big.streamed) > len(small.streamed)
    assert big.phases["denoise"] <= 12 * GiB


def test_plan_display_names_resident_streamed_and_peak(sizes):
    text = plan(sizes, 8).summary()
    assert "GB resident" in text and "GB streamed per step" in text and "expected peak" in text


def test_impossible_budget_is_an_error_that_states_the_minimum(sizes):
    from zimage_nodes.loaders.errors import ZImageError

    with pytest.raises(ZImageError) as e:
        plan(sizes, 1.5)
    msg = str(e.value)
    assert "vram_budget_gb" in msg and "at least" in msg and "Found: 1.5 GB" in msg and "Fix:" in msg
    need = float(msg.split("at least ")[1].split(" GB")[0])
    assert 1.5 < need < 4.0
    plan(sizes, need + 0.05, storage="bf16")  # the stated minimum is enough


def test_cpu_runs_keep_everything_in_ram(sizes):
    from zimage_nodes.loaders.placement import plan_memory

    p = plan_memory(sizes, "cpu", 4)
    assert all(w.value == "cpu" for _, w in p.blocks) and p.text_encoder == "cpu"


def test_fp8_matmuls_halve_resident_and_streamed_bytes(sizes):
    bf16, fp8 = plan(sizes, 0), plan(sizes, 0, matmul="fp8")
    assert all(w.value == "gpu" for _, w in fp8.blocks)
    blocks = sum(b for _, b in sizes.transformer_blocks)
    assert 0.49 < (fp8.resident_bytes - sizes.transformer_stem) / blocks < 0.52
    assert fp8.peak_bytes < bf16.peak_bytes - 5 * GiB
    # at 8 GB, fp8 blocks leave room for about twice as many resident ones, with no dequantisation buffers
    b8, f8 = plan(sizes, 8), plan(sizes, 8, matmul="fp8")
    assert len(f8.blocks) - len(f8.streamed) >= 1.8 * (len(b8.blocks) - len(b8.streamed))
    assert f8.peak_bytes <= 8 * GiB and "fp8 matmuls" in f8.summary()


def devices_plan(sizes, budgets, **kw):
    from zimage_nodes.loaders.placement import plan_devices

    devs = [f"cuda:{i}" for i in range(len(budgets))]
    return plan_devices(sizes, devs, budgets, 64, free_bytes={d: 79 * GiB for d in devs}, **kw)


def test_two_gpus_of_12gb_split_the_transformer_without_streaming(sizes):
    p = devices_plan(sizes, [12, 12])
    assert [d.device for d in p.device_plans] == ["cuda:0", "cuda:1"]
    assert p.streamed_bytes_per_step == 0 and all(w.value == "gpu" for _, w in p.blocks)
    where = p.block_device()
    names = [n for n, _ in sizes.transformer_blocks]
    # one contiguous run per device, in call order; the refiners (and the stem) on the first
    assert [where[n] for n in names] == sorted(where[n] for n in names)
    assert all(where[n] == "cuda:0" for n in names if "refiner" in n)
    assert p.text_encoder_device == p.vae_device == "cuda:1"
    assert all(d.peak_bytes <= 12 * GiB for d in p.device_plans)
    assert p.device_plans[0].resident_bytes + p.device_plans[1].resident_bytes == p.resident_bytes
    assert "cuda:0 (12.0 GB): blocks noise_refiner.0..layers." in p.summary() and "text encoder" in p.summary()


def test_two_gpus_of_8gb_stream_less_than_one(sizes):
    one, two = plan(sizes, 8), devices_plan(sizes, [8, 8])
    assert all(d.peak_bytes <= 8 * GiB for d in two.device_plans)
    assert two.streamed_bytes_per_step < one.streamed_bytes_per_step / 4


def test_any_number_of_gpus_and_unequal_budgets(sizes):
    p = devices_plan(sizes, [6, 6, 6])
    assert len(p.device_plans) == 3 and all(d.peak_bytes <= 6 * GiB for d in p.device_plans)
    assert sum(len(d.blocks) for d in p.device_plans) == 34
    big_small = devices_plan(sizes, [16, 4])
    assert len(big_small.device_plans[0].blocks) > 3 * len(big_small.device_plans[1].blocks)


def test_bad_device_lists_are_errors_that_say_what_to_do(sizes):
    from zimage_nodes.loaders.errors import ZImageError
    from zimage_nodes.loaders.placement import plan_devices

    with pytest.raises(ZImageError, match="distinct GPUs"):
        plan_devices(sizes, ["cuda:0", "cuda:0"], [8, 8], 64, free_bytes={"cuda:0": 79 * GiB})
    with pytest.raises(ZImageError) as e:
        devices_plan(sizes, [2, 2])
    assert "too small to split" in str(e.value) and "raise the budgets" in str(e.value)


def test_spare_pinned_ram_keeps_resident_blocks_for_fast_reloads_after_the_streamed_ones(sizes):
    roomy = plan(sizes, 0, host_gb=64)
    assert len(roomy.resident_pinned) == 34 and "34 resident blocks kept for fast reloads" in roomy.summary()
    assert roomy.pinned_bytes <= 64 * GiB
    tight = plan(sizes, 8, host_gb=16)  # streamed blocks and the text encoder come first
    assert all(w.value == "pinned" for _, w in tight.blocks if w.value != "gpu")
    assert 0 < len(tight.resident_pinned) < len(tight.blocks) - len(tight.streamed)
    assert tight.pinned_bytes <= 16 * GiB
    assert not plan(sizes, 0, host_gb=64, matmul="fp8").resident_pinned  # quantised on the GPU instead


def test_a_decode_keeps_its_memory_cached_only_where_the_budget_holds_it_beside_the_other_phases(sizes):
    """Handing a decode's memory back to the driver after each image and allocating it again cost
    ~11 ms an image on an H100: with room for it beside the encode and denoise peaks it stays in
    PyTorch's cache; an untiled decode that moved blocks out, a tiled one, or a tight budget hands
    it back."""
    from zimage_nodes.loaders.placement import decode_work_bytes

    roomy = plan(sizes, 40)
    assert roomy.keeps_decode_memory(1024, 1024, 1)
    kept = sizes.vae + decode_work_bytes(1024, 1024, 1, tiled=False)
    assert max(roomy.phases["encode"], roomy.phases["denoise"]) + kept <= 40 * GiB
    assert not roomy.keeps_decode_memory(4096, 4096, 1)  # 40 GiB of decode work does not fit beside them
    assert not plan(sizes, 8).keeps_decode_memory(1024, 1024, 1)  # blocks move out for it
    assert not plan(sizes, 4).keeps_decode_memory(1024, 1024, 1)  # tiled
    full = plan(sizes, 16)  # every block resident and the decode beside them, but not both peaks at once
    assert full.decode_plan(1024, 1024, 1) == ((), False) and full.phases["denoise"] + kept > 16 * GiB
    assert not full.keeps_decode_memory(1024, 1024, 1)
    assert plan(sizes, 20).keeps_decode_memory(1024, 1024, 1)
