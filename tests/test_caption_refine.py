"""The context refiner runs once per caption: later steps and runs with the same conditioning replay
its output, bit for bit what diffusers' forward computes at every step, on real tiny models."""
from __future__ import annotations

import dataclasses

import pytest
import torch


@pytest.fixture
def parts(tiny, pack):
    from zimage_nodes.loaders.pipeline_loading import load_parts

    return load_parts(tiny["diffusers"], device="cpu", dtype=torch.float32)


@pytest.fixture
def refiner_calls(monkeypatch, pack):
    """How many times a context-refiner block really computed (a replayed call does not reach the
    class's forward)."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    calls = []
    real = ZImageTransformerBlock.forward

    def counted(self, x, *args, **kwargs):
        if not self.modulation:  # the context refiner's blocks have no timestep modulation
            calls.append(x.shape)
        return real(self, x, *args, **kwargs)
    monkeypatch.setattr(ZImageTransformerBlock, "forward", counted)
    return calls


def use_plan(parts, blocks):
    from zimage_nodes.loaders.placement import Where

    rt = parts.runtime
    names = [n for n, _ in rt.plan.blocks]
    rt.plan = dataclasses.replace(rt.plan, blocks=tuple((n, Where(w)) for n, w in zip(names, blocks)),
                                  text_encoder="cpu")
    rt.fixed_plan = True
    return names


def forward_args(parts, captions, seed=0):
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(16, 1, 6, 4, generator=g)]
    return frames * (len(captions)), torch.full((len(captions),), 0.5), captions


@pytest.mark.parametrize("blocks", [["gpu"] * 4, ["pinned"] * 4, ["pinned", "pinned", "gpu", "mapped"]])
def test_replayed_refiner_output_is_what_every_forward_computes(parts, refiner_calls, blocks):
    names = use_plan(parts, blocks)
    assert names[1] == "context_refiner.0"  # the tiny model: 1 noise refiner, 1 context refiner, 2 layers
    h = parts.transformer
    pos, neg = parts.text_encoder.encode("a red fox"), parts.text_encoder.encode("blurry")
    given = [pos, neg]
    with torch.no_grad():
        with h.on_device(parts.runtime.plan) as tr:  # no captions: the refiner runs at every forward
            reference = [tr(*forward_args(parts, given, seed), return_dict=False)[0] for seed in range(3)]
        assert len(refiner_calls) == 3
        refiner_calls.clear()
        with h.on_device(parts.runtime.plan, passes=3, captions=given) as tr:
            out = [tr(*forward_args(parts, given, seed), return_dict=False)[0] for seed in range(3)]
        assert len(refiner_calls) == 1  # the first forward only
        with h.on_device(parts.runtime.plan, passes=3, captions=[pos.clone(), neg.clone()]) as tr:
            again = [tr(*forward_args(parts, given, seed), return_dict=False)[0] for seed in range(3)]
        assert len(refiner_calls) == 1  # the same conditioning in other tensors: not computed again
    for a, b, c in zip(reference, out, again):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a, b, c))
    # the refiner's blocks are plain blocks again after the runs
    assert "forward" not in parts.transformer.component.module.context_refiner[0].__dict__


def test_a_new_or_changed_caption_is_refined_again(parts, refiner_calls):
    from zimage_nodes.loaders.generation import denoise

    use_plan(parts, ["pinned", "pinned", "gpu", "pinned"])
    latent = torch.zeros(1, 16, 6, 4)
    pos = parts.text_encoder.encode("a red fox").clone()
    first, _ = denoise(parts, pos, None, latent, seed=1, steps=3)
    s = parts.transformer.last_streamer
    assert len(refiner_calls) == 1 and s.copies == 3 + 2 * 2  # streamed once, then 2 blocks a step
    second, _ = denoise(parts, pos, None, latent, seed=1, steps=3)
    assert len(refiner_calls) == 1 and torch.equal(first, second)
    assert parts.transformer.last_streamer.copies == 2 * 3  # the refiner is neither run nor copied
    denoise(parts, parts.text_encoder.encode("a blue whale"), None, latent, seed=1, steps=3)
    assert len(refiner_calls) == 2
    pos[0, 0] += 1.0  # the same tensor, changed in place
    denoise(parts, pos, None, latent, seed=1, steps=3)
    assert len(refiner_calls) == 3
    denoise(parts, pos, None, latent, seed=1, steps=3, cfg=2.0)  # a batch with the negative: new
    assert len(refiner_calls) == 4
    with torch.inference_mode():  # as ComfyUI runs nodes: tensors without version counters
        cond = pos.clone()
        again, _ = denoise(parts, cond, None, latent, seed=1, steps=3)
        assert len(refiner_calls) == 5
        denoise(parts, cond, None, latent, seed=1, steps=3)
        assert len(refiner_calls) == 5
        cond[0, 0] -= 1.0
        denoise(parts, cond, None, latent, seed=1, steps=3)
        assert len(refiner_calls) == 6
    parts.transformer.release()
    assert parts.transformer.refined.value is None


def test_a_caller_with_other_captions_than_declared_gets_an_error_not_a_wrong_image(parts):
    use_plan(parts, ["gpu"] * 4)
    pos = parts.text_encoder.encode("a red fox")
    long = parts.text_encoder.encode("a red fox in a snowy forest at dawn, oil painting, high detail " * 4)
    with torch.no_grad(), parts.transformer.on_device(parts.runtime.plan, passes=2, captions=[pos]) as tr:
        tr(*forward_args(parts, [pos]), return_dict=False)
        with pytest.raises(RuntimeError, match="context refiner replay"):
            tr(*forward_args(parts, [long]), return_dict=False)
