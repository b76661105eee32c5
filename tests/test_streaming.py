"""The streaming engine on the CPU: the same code as on a GPU with synchronous copies, so its
logic (buffer pool, prefetch order, views, fp8 storage, recovery) is checked on real tiny models."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch


@pytest.fixture
def parts(tiny, pack):
    from zimage_nodes.loaders.pipeline_loading import load_parts

    return load_parts(tiny["diffusers"], device="cpu", dtype=torch.float32)


def use_plan(parts, blocks, storage="bf16", text_encoder="cpu", te_host="pinned"):
    """Pin a hand-made plan on a CPU run: blocks as 'gpu' (a resident copy), 'pinned' or 'mapped'."""
    from zimage_nodes.loaders.placement import Storage, Where

    rt = parts.runtime
    names = [n for n, _ in rt.plan.blocks]
    rt.plan = dataclasses.replace(rt.plan, blocks=tuple((n, Where(w)) for n, w in zip(names, blocks)),
                                  storage=Storage(storage), text_encoder=text_encoder, text_encoder_host=Where(te_host))
    rt.fixed_plan = True
    return names


def run(parts, seed=3, steps=3, cfg=1.0):
    from zimage_nodes.loaders.generation import denoise

    pos = parts.text_encoder.encode("a red fox")
    out, _ = denoise(parts, pos, None, torch.zeros(1, 16, 6, 4), seed=seed, steps=steps, cfg=cfg)
    return out


def psnr(a, b):
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return 10 * math.log10(1.0 / mse) if mse > 0 else float("inf")


def test_streamed_output_equals_resident_output_bitwise(parts):
    reference = run(parts)
    n = len(use_plan(parts, ["gpu"] * 4))  # tiny model: 1 noise refiner, 1 context refiner, 2 layers
    assert n == 4
    resident = run(parts)
    use_plan(parts, ["pinned", "gpu", "mapped", "pinned"])
    streamed = run(parts)
    assert torch.equal(reference, resident) and torch.equal(reference, streamed)
    use_plan(parts, ["pinned"] * 4)
    assert torch.equal(reference, run(parts, cfg=2.0)) is False  # cfg changes the picture...
    assert torch.equal(run(parts, cfg=2.0), run(parts, cfg=2.0))  # ...deterministically, all streamed


def test_each_streamed_block_is_copied_once_per_step_through_a_fixed_pool(parts):
    use_plan(parts, ["pinned", "gpu", "pinned", "pinned"])
    run(parts, steps=4)
    s = parts.transformer.last_streamer
    # the pool (3 buffers for 3 streamed blocks) filled at attach, then a copy after each
    # streamed block call, for the call 3 ahead: 3 blocks x 4 steps, none for a fifth step
    assert s.n == 3 and s.copies == 3 * 4
    assert len(s.stage) == 0  # closed after the run: the buffers are gone
    rt = parts.runtime
    rt.plan = dataclasses.replace(rt.plan, n_buffers=2)  # the pool is the size the plan has room for
    run(parts, steps=4)
    s = parts.transformer.last_streamer
    assert s.n == 2 and s.copies == 3 * 4


@pytest.mark.parametrize("passes, copies", [(None, 2 + 3 * 5), (3, 3 * 5), (1, 5)])
def test_the_last_pass_copies_no_block_for_a_pass_that_never_comes(pack, passes, copies):
    """BlockStreamer(passes=k) stops copying where the k-th pass ends; without it the copies wrap
    around to the next pass's first blocks. Either way each call finds its own weights."""
    from torch import nn

    from zimage_nodes.loaders.streaming import BlockStreamer, HostBlock

    torch.manual_seed(0)
    blocks = [nn.Linear(8, 8) for _ in range(5)]
    x = torch.randn(2, 8)
    ref = [x]
    with torch.no_grad():
        for _ in range(3):
            for b in blocks:
                ref.append(b(ref[-1]))
        streamer = BlockStreamer([(b, HostBlock(str(i), b, "bf16", True, torch.float32))
                                  for i, b in enumerate(blocks)], torch.device("cpu"), n_buffers=2,
                                 passes=passes).attach()
        for _ in range(passes or 3):
            for b in blocks:
                x = b(x)
    assert streamer.copies == copies
    assert torch.equal(x, ref[5 * (passes or 3)])
    streamer.close()


def test_blocks_copied_out_of_the_mapping_are_read_ahead_of_their_copy(parts, monkeypatch):
    from zimage_nodes.loaders import streaming

    monkeypatch.setattr(streaming, "READ_AHEAD", 1)  # one block ahead, whatever the block size
    advised, copied = [], []
    monkeypatch.setattr(streaming.HostBlock, "advise", lambda self: advised.append(self.name))
    real = streaming.HostBlock.copy_into
    monkeypatch.setattr(streaming.HostBlock, "copy_into",
                        lambda self, *a, **k: (copied.append(self.name), real(self, *a, **k))[1])
    use_plan(parts, ["mapped", "mapped", "gpu", "mapped"])
    run(parts, steps=2)
    assert parts.transformer.last_streamer.read_ahead == 1
    # every copy of a block came after the disk was asked to read it
    for i, name in enumerate(copied):
        assert name in advised[: i + 2], (name, advised, copied)
    assert set(advised) == set(copied) and len(set(copied)) == 3


def test_fp8_storage_stays_close_to_bf16(parts):
    reference = run(parts)
    use_plan(parts, ["pinned"] * 4, storage="fp8")
    fp8 = run(parts)
    cos = torch.nn.functional.cosine_similarity(reference.flatten(), fp8.flatten(), dim=0).item()
    # per-row scaled e4m3 keeps ~3 significant bits per weight: measured ~50 dB on the tiny model
    assert cos > 0.999 and psnr(reference / reference.abs().max(), fp8 / reference.abs().max()) > 30
    assert not torch.equal(reference, fp8)


def test_fp8_quantisation_round_trips_within_e4m3_precision(pack):
    from zimage_nodes.loaders.streaming import fp8_quantize

    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scale
    q, s = fp8_quantize(w)
    back = q.float() * s[:, None]
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64,)
    assert ((back - w).abs() <= w.abs() * 2**-3 + 1e-6).all()  # within half an e4m3 ulp of each value


def test_an_error_inside_a_streamed_block_frees_the_pool_and_the_next_run_works(parts):
    reference = run(parts)
    use_plan(parts, ["pinned", "gpu", "pinned", "mapped"])
    replica_holder = {}

    class Boom(RuntimeError):
        pass

    from zimage_nodes.loaders import generation

    real = generation.Velocity.__call__
    calls = {"n": 0}

    def failing(self, x, t):
        calls["n"] += 1
        replica_holder["tr"] = self.transformer
        if calls["n"] == 2:
            layer = self.transformer.layers[0]
            hook = layer.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(Boom("mid-step")))
            try:
                return real(self, x, t)
            finally:
                hook.remove()
        return real(self, x, t)

    generation.Velocity.__call__ = failing
    try:
        with pytest.raises(Boom):
            run(parts)
    finally:
        generation.Velocity.__call__ = real
    s = parts.transformer.last_streamer
    assert s.stage == [] and s.compute is None and not s._handles
    # every streamed block is unbound: its parameters are empty placeholders again
    for name in ("noise_refiner.0", "layers.0", "layers.1"):
        block = replica_holder["tr"].get_submodule(name)
        assert all(p.numel() == 0 for p in block.parameters())
    assert torch.equal(run(parts), reference)


def test_blocks_called_out_of_order_are_recovered(parts):
    """A step that stops half-way (interrupt) leaves the pipeline mid-cycle; the next call restarts it."""
    from zimage_nodes.loaders.sampling import StepHooks

    reference = run(parts)
    use_plan(parts, ["pinned"] * 4)
    from zimage_nodes.loaders.generation import denoise

    tr_handle = parts.transformer
    with tr_handle.on_device(parts.runtime.plan) as tr:
        tr.layers[1](*_layer_args(tr))  # a call the streamer did not expect first
        s = tr_handle.last_streamer
        assert s._next == 0  # after layers.1 (the last block) the cycle wraps to the first
    out, _ = denoise(parts, parts.text_encoder.encode("a red fox"), None, torch.zeros(1, 16, 6, 4), seed=3, steps=3,
                     hooks=StepHooks())
    assert torch.equal(out, reference)


def _layer_args(tr):
    n, dim = 8, tr.dim
    x = torch.randn(1, n, dim)
    mask = torch.ones(1, n, dtype=torch.bool)
    freqs = torch.ones(1, n, tr.config.axes_dims[0] // 2 + tr.config.axes_dims[1] // 2 + tr.config.axes_dims[2] // 2,
                       dtype=torch.complex64)
    adaln = torch.randn(1, min(dim, 256))
    return x, mask, freqs, adaln


def test_streamed_text_encoder_gives_the_same_features(parts):
    from zimage_nodes.loaders.host_cache import HOST_CACHE

    te = parts.text_encoder
    reference = te.encode("a lighthouse at dusk")
    HOST_CACHE.clear()
    for host in ("mapped", "pinned"):
        use_plan(parts, ["gpu"] * 4, text_encoder="streamed", te_host=host)
        te._cache.clear()
        assert torch.equal(te.encode("a lighthouse at dusk"), reference)
    # not this encoder's first prompt (that one ran on the CPU plan): the layers were pinned for it
    assert te._pinned is not None and all(h.pinned for h in te._pinned.values())
    assert len(te._pinned) == len(te.component.module.layers)


def test_blocks_split_over_two_devices_give_the_same_output_with_one_streamer_each(parts):
    """Two devices simulated on the CPU ('cpu:0', 'cpu:1': distinct device names, so every block
    boundary between them goes through the hop hooks)."""
    from zimage_nodes.loaders.generation import decode
    from zimage_nodes.loaders.placement import Where

    reference = run(parts)
    reference_image = decode(parts.vae, reference)
    names = use_plan(parts, ["pinned", "gpu", "pinned", "gpu"])
    rt = parts.runtime
    p = rt.plan
    first = dataclasses.replace(p, device="cpu:0", blocks=p.blocks[:2], device_plans=())
    second = dataclasses.replace(p, device="cpu:1", blocks=p.blocks[2:], device_plans=())
    rt.plan = dataclasses.replace(p, device_plans=(first, second))
    assert rt.plan.block_device() == {names[0]: "cpu:0", names[1]: "cpu:0", names[2]: "cpu:1", names[3]: "cpu:1"}
    split = run(parts)
    assert torch.equal(split, reference)
    h = parts.transformer
    assert [s.device for s in h.streamers] == [torch.device("cpu:0"), torch.device("cpu:1")]
    assert all(s.copies > 0 for s in h.streamers)
    assert h.last_hops is not None and h.last_hops.hops > 0 and not h.last_hops._handles  # hooks removed after
    assert all(w in (Where.GPU, Where.PINNED) for _, w in rt.plan.blocks)
    # the VAE decodes on the last device, from its one host copy (the pinned one on a GPU machine)
    assert torch.equal(decode(parts.vae, split), reference_image)


def test_resident_blocks_kept_in_pinned_ram_at_release_come_back_from_it_bit_for_bit(parts):
    from zimage_nodes.loaders.host_cache import HOST_CACHE

    reference = run(parts)
    HOST_CACHE.clear()  # other tests' copies of these files
    names = use_plan(parts, ["gpu", "gpu", "pinned", "gpu"])
    rt = parts.runtime
    rt.plan = dataclasses.replace(rt.plan, resident_pinned=(names[0], names[3]), host_budget_bytes=2**30)

    def cached():
        return {k[2] for k in HOST_CACHE._entries if k[1] == "transformer"}
    assert torch.equal(run(parts), reference)
    assert cached() == {names[2]}  # the first build reads resident blocks from the file: no pinning
    parts.release()  # as when ComfyUI frees the model: the planned resident blocks go to pinned RAM
    assert cached() == {names[0], names[2], names[3]}
    built = HOST_CACHE.built
    assert torch.equal(run(parts), reference) and HOST_CACHE.built == built  # rebuilt from RAM alone


def test_blocks_moved_out_for_a_decode_come_back_for_the_next_run_bit_for_bit(parts, monkeypatch):
    """A decode whose plan moves resident blocks out (MemoryPlan.decode_plan) frees their memory
    until the transformer's next run, which copies them back: from pinned RAM, or from the file
    once the host cache has dropped them."""
    from zimage_nodes.loaders.generation import decode
    from zimage_nodes.loaders.host_cache import HOST_CACHE
    from zimage_nodes.loaders.placement import MemoryPlan

    reference = run(parts)
    HOST_CACHE.clear()
    names = use_plan(parts, ["gpu", "gpu", "pinned", "gpu"])
    parts.runtime.plan = dataclasses.replace(parts.runtime.plan, host_budget_bytes=2**30)
    latent = run(parts)
    image = decode(parts.vae, latent)
    h = parts.transformer
    moved = (names[3], names[0])
    monkeypatch.setattr(MemoryPlan, "decode_plan", lambda self, height, width, batch: (moved, False))

    def sizes():
        return [sum(t.numel() for t in h._replica.get_submodule(n).parameters()) for n in moved]
    full = sizes()
    assert torch.equal(decode(parts.vae, latent), image)
    assert sizes() == [0, 0] and all(n > 0 for n in full)
    assert {k[2] for k in HOST_CACHE._entries if k[1] == "transformer"} == {names[2], *moved}
    assert torch.equal(run(parts), reference) and sizes() == full
    assert h.last_streamer.interleaved == 2  # the copies back went through the streamer's link
    decode(parts.vae, latent)
    HOST_CACHE.clear()
    assert torch.equal(run(parts), reference) and sizes() == full

    from zimage_nodes.loaders import runtime

    def no_pinned_memory(*args, **kwargs):
        raise RuntimeError("CUDA error: out of memory (cudaHostRegister)")
    monkeypatch.setattr(runtime, "HostBlock", no_pinned_memory)  # the copies can't be made: tiles
    HOST_CACHE.clear()
    assert torch.equal(decode(parts.vae, latent), decode(parts.vae, latent, tiled=True))
    assert sizes() == full and torch.equal(run(parts), reference)


def test_a_run_stopped_before_its_blocks_came_back_leaves_no_stale_weights(parts, monkeypatch):
    """Blocks moved out for a decode get their copies back when the next run reaches them; if that
    run stops first, the copies still pending are finished before anything reads those blocks
    back to host memory (another move-out, a release), so no uninitialised buffer is kept."""
    from zimage_nodes.loaders import generation
    from zimage_nodes.loaders.generation import decode
    from zimage_nodes.loaders.host_cache import HOST_CACHE
    from zimage_nodes.loaders.placement import MemoryPlan

    reference = run(parts)
    names = use_plan(parts, ["gpu", "gpu", "pinned", "gpu"])
    parts.runtime.plan = dataclasses.replace(parts.runtime.plan, host_budget_bytes=2**30)
    latent = run(parts)
    moved = (names[3], names[0])
    monkeypatch.setattr(MemoryPlan, "decode_plan", lambda self, height, width, batch: (moved, False))
    h = parts.transformer

    class Stop(RuntimeError):
        pass

    real = generation.Velocity.__call__

    def stopped_in_the_first_block(self, x, t):
        block = self.transformer.get_submodule(names[1])
        hook = block.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(Stop("interrupted")))
        try:
            return real(self, x, t)
        finally:
            hook.remove()

    from zimage_nodes.loaders.streaming import BlockStreamer

    for then in ("move out again", "release"):
        decode(parts.vae, latent)
        monkeypatch.setattr(generation.Velocity, "__call__", stopped_in_the_first_block)
        # this tiny model streams one block, so the copies back would go at once: hold them
        monkeypatch.setattr(BlockStreamer, "interleave", lambda self, copies: None)
        with pytest.raises(Stop):
            run(parts)
        monkeypatch.undo()
        monkeypatch.setattr(MemoryPlan, "decode_plan", lambda self, height, width, batch: (moved, False))
        assert not h._deferred[names[3]].issued  # the run stopped before the last block
        HOST_CACHE.clear()  # host copies are made again from the GPU copies
        if then == "move out again":
            decode(parts.vae, latent)
        else:
            parts.release()
        assert not h._deferred
        assert torch.equal(run(parts), reference)


def test_copies_slipped_in_between_streamed_blocks_go_when_their_block_is_near(pack):
    """BlockStreamer.interleave: a copy whose block the model calls after streamed block d - 1 goes
    on the link once the streamer is n_buffers blocks from it, not at the start of the run."""
    from torch import nn

    from zimage_nodes.loaders.streaming import BlockStreamer, HostBlock

    blocks = [nn.Linear(8, 8) for _ in range(6)]
    streamer = BlockStreamer([(b, HostBlock(str(i), b, "bf16", True, torch.float32)) for i, b in enumerate(blocks)],
                             torch.device("cpu"), n_buffers=2).attach()
    issued = {}

    class Copy:
        def __init__(self, name):
            self.name = name

        def issue(self, stream):
            assert stream is None  # a CPU: synchronous
            issued[self.name] = streamer.copies  # streamed copies issued before it
    # called after streamed blocks 0, 2 and 4: within the first n_buffers blocks goes now (after
    # the two copies attach issues); the others after block d - 1 - n_buffers ran
    streamer.interleave([(5, Copy("late")), (1, Copy("first")), (3, Copy("middle"))])
    assert issued == {"first": 2}
    x = torch.randn(2, 8)
    for b in blocks:
        x = b(x)
    streamer.close()
    assert issued == {"first": 2, "middle": 3, "late": 5} and streamer.interleaved == 3


def test_activation_hops_copy_each_shared_input_once_per_device_and_forward(pack):
    from torch import nn

    from zimage_nodes.loaders.device_hops import DeviceHops

    class Layer(nn.Module):
        def forward(self, x, mask, freqs=None):
            return x + mask.sum() + freqs.sum()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(4))

        def forward(self, x, mask, freqs):
            for layer in self.layers:
                x = layer(x, mask, freqs=freqs)
            return x

    model = Model()
    x, mask, freqs = torch.zeros(2, 3), torch.ones(3), torch.ones(5)
    reference = model(x, mask, freqs)
    # 'cpu:0' / 'cpu:1' are distinct device names for the same memory: every input counts as a hop
    hops = DeviceHops(model, {"layers.0": "cpu:0", "layers.1": "cpu:0", "layers.2": "cpu:1", "layers.3": "cpu:1"})
    assert torch.equal(model(x, mask, freqs), reference)
    # per device: the first layer's three inputs, then at the next layer only the new hidden state
    # (mask and freqs, positional and keyword alike, come from the per-forward cache)
    assert hops.hops == 2 * 3 + 2
    model(x, mask, freqs)
    assert hops.hops == 2 * (2 * 3 + 2)  # the cache starts afresh each forward
    hops.remove()
    model(x, mask, freqs)
    assert hops.hops == 2 * (2 * 3 + 2)


def test_blocks_called_in_the_first_pass_only_are_copied_once(pack):
    """BlockStreamer(once=...): the context refiner's blocks run in the first forward only (later ones
    replay their output); the copies follow that call order and stop where the last pass ends."""
    from torch import nn

    from zimage_nodes.loaders.streaming import BlockStreamer, HostBlock

    torch.manual_seed(0)
    blocks = [nn.Linear(8, 8) for _ in range(5)]
    once = {1, 2}
    x = torch.randn(2, 8)
    ref = x
    with torch.no_grad():
        for p in range(3):
            for i, b in enumerate(blocks):
                if p == 0 or i not in once:
                    ref = b(ref)
        streamer = BlockStreamer([(b, HostBlock(str(i), b, "bf16", True, torch.float32))
                                  for i, b in enumerate(blocks)], torch.device("cpu"), n_buffers=2, passes=3,
                                 once=sorted(once)).attach()
        for p in range(3):
            for i, b in enumerate(blocks):
                if p == 0 or i not in once:
                    x = b(x)
            if p == 0:
                assert all(id(blocks[i]) not in streamer._handles for i in once)  # unhooked after their call
    assert torch.equal(x, ref)
    assert streamer.copies == 5 + 2 * 3 and streamer._pending == {}
    streamer.close()
