"""The sampling loop: schedules, noise, batch, img2img, progress and interrupt, on a tiny real model."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def parts(tiny, pack):
    from zimage_nodes.loaders.pipeline_loading import load_parts

    return load_parts(tiny["diffusers"], device="cpu", dtype=torch.float32)


def test_euler_sigmas_are_diffusers_z_image_schedule(pack):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from zimage_nodes.loaders.sampling import sigmas

    s = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    s.set_timesteps(sigmas=torch.linspace(1.0, 1 / 9, 9).tolist())
    assert torch.equal(sigmas("euler", 9, 3.0), s.sigmas.float())


def test_res_multistep_sigmas_are_comfyui_simple_schedule(pack):
    from zimage_nodes.loaders.sampling import sigmas

    got = sigmas("res_multistep", 9, 3.0)
    # ComfyUI: sigma(t) = 3t / (1 + 2t) on t = k/1000, k = 1000 - int(i * 1000 / 9)
    ks = [1000 - int(i * 1000 / 9) for i in range(9)]
    expected = [3 * (k / 1000) / (1 + 2 * (k / 1000)) for k in ks] + [0.0]
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got[0] == 1.0 and got[-1] == 0.0 and len(got) == 10


def test_noise_is_comfyui_and_diffusers_noise(pack):
    from diffusers.utils.torch_utils import randn_tensor

    from zimage_nodes.loaders.sampling import make_noise

    ref = randn_tensor((2, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(7), dtype=torch.float32)
    assert torch.equal(make_noise((2, 16, 8, 8), 7), ref)


def test_a_run_starts_from_the_seed_s_noise_or_from_the_latent_noised_to_the_first_sigma(pack):
    from zimage_nodes.loaders.sampling import latent_to_model, make_noise, sigmas, start

    src = torch.randn(1, 16, 4, 6)
    full = start(src, 5, 3, "euler")  # text-to-image: the latent's content plays no part
    assert torch.equal(full.x, make_noise((1, 16, 4, 6), 5)) and torch.equal(full.x, start(src * 0, 5, 3, "euler").x)
    sig = sigmas("res_multistep", 4, 3.0, 0.5)
    part = start(src, 5, 4, "res_multistep", 3.0, 0.5)
    assert torch.equal(part.sig, sig) and part.levels == sig.tolist() and len(part.levels) == 5
    assert torch.equal(part.x, sig[0] * make_noise((1, 16, 4, 6), 5) + (1 - sig[0]) * latent_to_model(src))


def test_batch_size_comes_from_the_latent_and_images_differ(parts, pack):
    from zimage_nodes.loaders.generation import denoise

    pos = parts.text_encoder.encode("a fox")
    out, _ = denoise(parts, pos, None, torch.zeros(3, 16, 4, 4), seed=1, steps=2)
    assert out.shape == (3, 16, 4, 4)
    assert not torch.allclose(out[0], out[1])


def test_seed_changes_the_result_and_same_seed_repeats_it(parts, pack):
    from zimage_nodes.loaders.generation import denoise

    pos = parts.text_encoder.encode("a fox")
    a, _ = denoise(parts, pos, None, torch.zeros(1, 16, 4, 4), seed=1, steps=2, sampler="res_multistep")
    b, _ = denoise(parts, pos, None, torch.zeros(1, 16, 4, 4), seed=1, steps=2, sampler="res_multistep")
    c, _ = denoise(parts, pos, None, torch.zeros(1, 16, 4, 4), seed=2, steps=2, sampler="res_multistep")
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_low_denoise_keeps_the_input_latent(parts, pack):
    from zimage_nodes.loaders.generation import denoise

    pos = parts.text_encoder.encode("a fox")
    src = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(3))
    light, _ = denoise(parts, pos, None, src, seed=1, steps=4, denoise=0.1)
    full, _ = denoise(parts, pos, None, src, seed=1, steps=4, denoise=1.0)
    assert (light - src).abs().mean() < 0.5 * (full - src).abs().mean()


def test_res_multistep_second_order_update_matches_comfyui_formula(pack):
    """One step checked against ComfyUI's res_multistep written out by hand (eta 0)."""
    import math

    from zimage_nodes.loaders.sampling import _res_multistep_update

    x, d, d_old = torch.tensor(0.7), torch.tensor(0.2), torch.tensor(-0.1)
    s_prev, s, s_next = torch.tensor(0.9), torch.tensor(0.6), torch.tensor(0.3)
    t, t_prev, t_next = -math.log(0.6), -math.log(0.9), -math.log(0.3)
    h = t_next - t
    c2 = (t_prev - t) / h
    phi1 = math.expm1(-h) / -h
    phi2 = (phi1 - 1) / -h
    b1, b2 = phi1 - phi2 / c2, phi2 / c2
    expected = math.exp(-h) * 0.7 + h * (b1 * 0.2 + b2 * -0.1)
    assert _res_multistep_update(x, d, d_old, s_prev, s, s_next).item() == pytest.approx(expected, rel=1e-5)


def test_one_progress_tick_per_step(parts, pack):
    from zimage_nodes.loaders.generation import denoise
    from zimage_nodes.loaders.sampling import StepHooks

    ticks = []
    denoise(parts, parts.text_encoder.encode("a fox"), None, torch.zeros(1, 16, 4, 4), seed=1, steps=5,
            hooks=StepHooks(on_step=lambda i, n, x0: ticks.append((i, n, tuple(x0.shape)))))
    assert ticks == [(i, 5, (1, 16, 4, 4)) for i in range(5)]


def test_interrupt_between_steps_stops_sampling(parts, pack):
    from zimage_nodes.loaders.generation import denoise
    from zimage_nodes.loaders.sampling import StepHooks

    class Stop(Exception):
        pass

    done = []

    def check():
        if len(done) == 2:
            raise Stop

    with pytest.raises(Stop):
        denoise(parts, parts.text_encoder.encode("a fox"), None, torch.zeros(1, 16, 4, 4), seed=1, steps=9,
                hooks=StepHooks(check_interrupt=check, on_step=lambda i, n, x0: done.append(i)))
    assert done == [0, 1]
    # the next run works
    out, _ = denoise(parts, parts.text_encoder.encode("a fox"), None, torch.zeros(1, 16, 4, 4), seed=1, steps=2)
    assert torch.isfinite(out).all()


def test_cfg_above_one_uses_the_empty_prompt_as_default_negative(parts, pack):
    from zimage_nodes.loaders.generation import denoise

    pos = parts.text_encoder.encode("a fox")
    empty = parts.text_encoder.encode("")
    lat = torch.zeros(1, 16, 4, 4)
    implicit, _ = denoise(parts, pos, None, lat, seed=4, steps=2, cfg=3.0)
    explicit, _ = denoise(parts, pos, empty, lat, seed=4, steps=2, cfg=3.0)
    no_cfg, _ = denoise(parts, pos, None, lat, seed=4, steps=2, cfg=1.0)
    assert torch.equal(implicit, explicit) and not torch.allclose(implicit, no_cfg)


def test_unchanged_prompt_is_not_encoded_again(parts, pack):
    te = parts.text_encoder
    before = te.encodes
    a = te.encode("a cached prompt")
    b = te.encode("a cached prompt")
    assert te.encodes == before + 1 and a is b
    te.encode("another prompt")
    assert te.encodes == before + 2
