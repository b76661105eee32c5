"""The four nodes, run in a chain as ComfyUI would, against diffusers' ZImagePipeline."""
from __future__ import annotations

import pytest
import torch

# Qwen3's chat template reduced to the one user turn the pipeline sends; it renders the same
# string as Qwen3's own template with enable_thinking=True. (The reference tokenizer folder
# carries Qwen2.5-VL's template, which adds a system prompt.)
QWEN3_TURN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                       "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(autouse=True)
def comfy_tokenizer(monkeypatch, pack, tiny):
    """Inside ComfyUI the loader takes ComfyUI's own tokenizer folder; here, the tiny model's."""
    import os

    from zimage_nodes.nodes import comfy_bridge

    monkeypatch.setattr(comfy_bridge, "comfy_tokenizer_folder", lambda: os.path.join(tiny["diffusers"], "tokenizer"))


def run_nodes(pack, tiny, prompt, seed, steps, cfg, width, height, negative=None, batch=1):
    m = pack.NODE_CLASS_MAPPINGS
    loaded = m["ZImageShardedLoader"]().load(tiny["transformer"], tiny["text_encoder"], tiny["vae"], 0.0, 0.0, "bf16")
    model, te, vae = loaded["result"]
    (pos,) = m["ZImageTextEncode"]().encode(te, prompt)
    neg = m["ZImageTextEncode"]().encode(te, negative)[0] if negative is not None else None
    latent = {"samples": torch.zeros(batch, 16, height // 8, width // 8)}
    out = m["ZImageSampler"]().sample(model, pos, latent, seed, steps, cfg, 3.0, "euler", 1.0, "auto", negative=neg)
    (image,) = m["ZImageVAEDecodeLazy"]().decode(vae, out["result"][0])
    return image, loaded, out


def reference(tiny, prompt, seed, steps, cfg, width, height):
    from diffusers import AutoencoderKL, ZImagePipeline

    # the pack decodes in fp32 on CPUs (fp16 would overflow), so the reference VAE is fp32 too
    vae = AutoencoderKL.from_pretrained(tiny["diffusers"], subfolder="vae", torch_dtype=torch.float32)
    pipe = ZImagePipeline.from_pretrained(tiny["diffusers"], vae=vae, torch_dtype=torch.bfloat16)
    pipe.tokenizer.chat_template = QWEN3_TURN_TEMPLATE
    # diffusers 0.42's default Z-Image schedule, passed explicitly: 0.36 defaulted to
    # linspace(1, 0, N), whose last step has zero length (N-1 real steps). The pack follows the new one.
    sigmas = torch.linspace(1.0, 1 / steps, steps).tolist()
    images = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=cfg - 1.0,
                  sigmas=sigmas, generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images
    return torch.from_numpy(images)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_node_chain_reproduces_diffusers_pipeline_pixels(pack, tiny, cfg):
    """Nodes load ComfyUI single files (original key names), diffusers its own folder: same weights,
    same seed and settings. Tolerance: 1e-6 absolute on 0..1 pixels (bf16 compute on both
    sides, same kernels: in practice the images are bitwise equal)."""
    image, loaded, out = run_nodes(pack, tiny, "a red fox in the snow", seed=42, steps=4, cfg=cfg, width=96, height=64)
    ref = reference(tiny, "a red fox in the snow", seed=42, steps=4, cfg=cfg, width=96, height=64)
    assert image.shape == ref.shape == (1, 64, 96, 3) and image.dtype == torch.float32
    assert image.std() > 0.01  # a real picture, not a constant
    torch.testing.assert_close(image, ref, atol=1e-6, rtol=0)


def test_node_outputs_are_comfyui_types(pack, tiny):
    image, loaded, out = run_nodes(pack, tiny, "", seed=1, steps=2, cfg=1.0, width=32, height=48, batch=2)
    assert "zimage_plan" in loaded["ui"] and "CPU" in loaded["ui"]["zimage_plan"][0]
    latent = out["result"][0]
    assert set(latent) == {"samples"} and latent["samples"].shape == (2, 16, 6, 4)
    assert image.shape == (2, 48, 32, 3) and 0.0 <= image.min() and image.max() <= 1.0
    assert "attention sdpa" in out["ui"]["zimage_run"][0]
