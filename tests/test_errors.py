"""Bad input: a clear error naming the file or input, what was expected and found, and the fix;
and nothing left behind (no tensors held, no file still mapped)."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from pack_testing import live_tensors, mapped_files


def _write(path, tensors):
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, str(path))
    return str(path)


@pytest.fixture
def other_models(tmp_path):
    """Small files with the key layouts of models users mix up with Z-Image's."""
    return {
        "sdxl_unet": _write(tmp_path / "sdxl_unet.safetensors", {
            "model.diffusion_model.input_blocks.0.0.weight": (8, 4, 3, 3),
            "model.diffusion_model.label_emb.0.0.weight": (8, 16),
            "model.diffusion_model.out.2.weight": (4, 8, 3, 3)}),
        "flux": _write(tmp_path / "flux1-dev.safetensors", {
            "double_blocks.0.img_attn.qkv.weight": (24, 8), "single_blocks.0.linear1.weight": (8, 8),
            "img_in.weight": (8, 64)}),
        "clip_l": _write(tmp_path / "clip_l.safetensors", {
            "text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
            "text_model.embeddings.token_embedding.weight": (16, 8)}),
    }


def _assert_clear(err, *fragments):
    msg = str(err)
    for f in fragments:
        assert f in msg, f"{f!r} not in: {msg}"
    assert "Fix:" in msg, msg


def _load_parts(pack, model, te=None, vae=None, **kw):
    from zimage_nodes.loaders.pipeline_loading import load_parts

    return load_parts(model, te, vae, device="cpu", **kw)


def _leaves_nothing(fn, path):
    """Run a failing call; check it raised ZImageError, held on to no tensor and unmapped `path`."""
    from zimage_nodes.loaders.errors import ZImageError

    before = live_tensors()
    with pytest.raises(ZImageError) as e:
        fn()
    err = e.value
    e = None  # the traceback holds frames (and their tensors) alive
    assert live_tensors() <= before, "tensors were left behind after the failure"
    assert os.path.abspath(path) not in mapped_files()
    return err


def test_missing_file(pack, tiny, tmp_path):
    missing = str(tmp_path / "z_image_turbo_bf16.safetensors")
    err = _leaves_nothing(lambda: _load_parts(pack, missing, tiny["text_encoder"], tiny["vae"]), missing)
    _assert_clear(err, missing, "does not exist")


def test_missing_file_in_comfyui_folders_names_the_input(pack):
    from zimage_nodes.loaders.errors import ZImageError
    from zimage_nodes.nodes import comfy_bridge

    with pytest.raises(ZImageError) as e:
        comfy_bridge.resolve("text_encoders", "qwen_3_4b.safetensors", "text_encoder")
    _assert_clear(e.value, "loader input 'text_encoder'", "qwen_3_4b.safetensors", "models/text_encoders")


def test_truncated_file(pack, tiny, tmp_path):
    cut = tmp_path / "truncated.safetensors"
    data = open(tiny["transformer"], "rb").read()
    cut.write_bytes(data[: len(data) // 2])
    err = _leaves_nothing(lambda: _load_parts(pack, str(cut), tiny["text_encoder"], tiny["vae"]), str(cut))
    _assert_clear(err, str(cut), "truncated", "Expected:", "Found:", "download the file again")


def test_corrupt_header(pack, tiny, tmp_path):
    bad = tmp_path / "corrupt.safetensors"
    data = bytearray(open(tiny["vae"], "rb").read())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    bad.write_bytes(bytes(data))
    err = _leaves_nothing(lambda: _load_parts(pack, tiny["transformer"], tiny["text_encoder"], str(bad)), str(bad))
    _assert_clear(err, str(bad), "not a valid safetensors file", "Found:")


def test_gguf_file_points_to_a_gguf_loader(pack, tiny, tmp_path):
    g = tmp_path / "z_image_turbo-Q4_K_M.gguf"
    g.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 64)
    err = _leaves_nothing(lambda: _load_parts(pack, str(g), tiny["text_encoder"], tiny["vae"]), str(g))
    _assert_clear(err, str(g), "GGUF", "ComfyUI-GGUF")


def test_pickled_checkpoint_is_refused(pack, tiny, tmp_path):
    p = tmp_path / "model.ckpt"
    torch.save({"w": torch.zeros(2)}, str(p))
    err = _leaves_nothing(lambda: _load_parts(pack, str(p), tiny["text_encoder"], tiny["vae"]), str(p))
    _assert_clear(err, str(p), "pickled")


@pytest.mark.parametrize("which,slot,found,belongs", [
    ("sdxl_unet", "transformer", "SDXL/SD UNet", "models/diffusion_models or models/checkpoints"),
    ("flux", "transformer", "Flux transformer", "models/diffusion_models"),
    ("clip_l", "text_encoder", "CLIP text encoder", "not Z-Image"),
    ("flux", "vae", "Flux transformer", "models/diffusion_models"),
])
def test_file_of_another_model_in_a_slot(pack, tiny, other_models, which, slot, found, belongs):
    files = {"transformer": tiny["transformer"], "text_encoder": tiny["text_encoder"], "vae": tiny["vae"]}
    files[slot] = other_models[which]
    err = _leaves_nothing(lambda: _load_parts(pack, files["transformer"], files["text_encoder"], files["vae"]),
                          other_models[which])
    _assert_clear(err, other_models[which], "Expected:", found, belongs)


def test_z_image_transformer_in_the_text_encoder_slot(pack, tiny):
    err = _leaves_nothing(lambda: _load_parts(pack, tiny["transformer"], tiny["transformer"], tiny["vae"]),
                          tiny["transformer"])
    _assert_clear(err, "Qwen3-4B", "Z-Image transformer", "models/diffusion_models")


def _copy_without(src, dst, drop=(), reshape=None):
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    for k, shape in (reshape or {}).items():
        sd[k] = torch.zeros(shape, dtype=sd[k].dtype)
    save_file(sd, dst)
    return dst


def test_missing_tensor_is_named(pack, tiny, tmp_path):
    path = _copy_without(tiny["transformer"], str(tmp_path / "partial.safetensors"),
                         drop=("layers.1.feed_forward.w2.weight",))
    err = _leaves_nothing(lambda: _load_parts(pack, path, tiny["text_encoder"], tiny["vae"]), path)
    _assert_clear(err, path, "missing", "layers.1.feed_forward.w2.weight", "z_image_turbo_bf16.safetensors")


def test_misshaped_tensor_is_named(pack, tiny, tmp_path):
    path = _copy_without(tiny["vae"], str(tmp_path / "ae_bad.safetensors"),
                         reshape={"decoder.mid.block_1.conv1.weight": (32, 32, 1, 1)})
    err = _leaves_nothing(lambda: _load_parts(pack, tiny["transformer"], tiny["text_encoder"], path), path)
    _assert_clear(err, path, "wrong shape",
                  "decoder.mid.block_1.conv1.weight is [32, 32, 1, 1], expected [32, 32, 3, 3]")


def test_sd_vae_with_four_channels_is_refused(pack, tiny, tmp_path):
    path = _copy_without(tiny["vae"], str(tmp_path / "sdxl_vae.safetensors"),
                         reshape={"decoder.conv_in.weight": (32, 4, 3, 3)})
    err = _leaves_nothing(lambda: _load_parts(pack, tiny["transformer"], tiny["text_encoder"], path), path)
    _assert_clear(err, path, "16 latent channels", "4 latent channels", "ae.safetensors")


def test_single_transformer_file_without_text_encoder(pack, tiny):
    err = _leaves_nothing(lambda: _load_parts(pack, tiny["transformer"], None, tiny["vae"]), tiny["transformer"])
    _assert_clear(err, "no text encoder was given", "qwen_3_4b")


def test_diffusers_folder_with_a_missing_shard(pack, tiny, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny["diffusers"], folder)
    os.remove(folder / "vae" / "diffusion_pytorch_model.safetensors")
    from zimage_nodes.loaders.errors import ZImageError

    with pytest.raises(ZImageError) as e:
        _load_parts(pack, str(folder))
    _assert_clear(e.value, str(folder / "vae"), "no .safetensors weights for the VAE")


@pytest.fixture(scope="module")
def parts(tiny, pack):
    from zimage_nodes.loaders.pipeline_loading import load_parts

    return load_parts(tiny["diffusers"], device="cpu", dtype=torch.float32)


def _denoise_error(parts, **kw):
    from zimage_nodes.loaders.errors import ZImageError
    from zimage_nodes.loaders.generation import denoise

    args = dict(positive=parts.text_encoder.encode("a fox"), negative=None, latent=torch.zeros(1, 16, 4, 4),
                seed=0, steps=2)
    args.update(kw)
    before = live_tensors()
    with pytest.raises(ZImageError) as e:
        denoise(parts, **args)
    err = e.value
    e = None
    assert live_tensors() <= before
    return err


def test_height_or_width_not_a_multiple_of_16(parts):
    err = _denoise_error(parts, latent=torch.zeros(1, 16, 5, 4))
    _assert_clear(err, "multiples of 16", "32x40 pixels", "use 32x32")


def test_steps_below_one(parts):
    _assert_clear(_denoise_error(parts, steps=0), "sampler input 'steps'", "Found: 0")


def test_sd_latent_with_four_channels(parts):
    _assert_clear(_denoise_error(parts, latent=torch.zeros(1, 4, 4, 4)), "16", "[1, 4, 4, 4]", "EmptySD3LatentImage")


@pytest.mark.parametrize("backend,needs", [
    ("xformers", "pip install xformers"), ("flash_attn", "pip install flash-attn"),
    ("sage", "pip install sageattention"), ("sdpa_flash", "NVIDIA GPUs only")])
def test_unavailable_attention_backend_names_the_fix(parts, backend, needs):
    import importlib.util

    if backend != "sdpa_flash" and importlib.util.find_spec(backend.replace("flash_attn", "flash_attn")
                                                            .replace("sage", "sageattention")):
        pytest.skip(f"{backend} is installed here")
    err = _denoise_error(parts, attention_backend=backend)
    _assert_clear(err, "sampler input 'attention'", backend, needs)


def test_fp8_attention_says_what_it_needs(parts, monkeypatch):
    """cudnn_fp8: on this CPU an error that says it runs on Hopper GPUs; on GPUs without it (an
    older card, no cuDNN frontend package) the reason and the fix; with compiled blocks an error
    rather than bf16 attention in its place."""
    import importlib.util

    from zimage_nodes.loaders import fp8_attention

    _assert_clear(_denoise_error(parts, attention_backend="cudnn_fp8"), "sampler input 'attention'", "cudnn_fp8",
                  "NVIDIA Hopper GPUs only", "pick sdpa")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    old_card = fp8_attention.why_unavailable(gpu)
    assert "compute capability 9.0" in old_card and "8.9" in old_card
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cudnn" else find(name, *a))
    assert "pip install nvidia-cudnn-frontend>=1.32.0" in fp8_attention.why_unavailable(gpu)
    monkeypatch.setattr(fp8_attention, "why_unavailable", lambda device: None)
    _assert_clear(_denoise_error(parts, attention_backend="cudnn_fp8", compile_blocks=True),
                  "sampler inputs 'attention' and 'compile'", "cudnn_fp8", "compile off")


def test_conditioning_of_another_text_encoder(parts):
    err = _denoise_error(parts, positive=torch.zeros(7, 768))
    _assert_clear(err, "sampler input 'positive'", "width 32", "[7, 768]")


def test_empty_prompt_is_valid(parts):
    from zimage_nodes.loaders.generation import denoise

    feats = parts.text_encoder.encode("")
    assert feats.shape[0] > 0
    out, _ = denoise(parts, feats, None, torch.zeros(1, 16, 4, 4), seed=0, steps=1)
    assert torch.isfinite(out).all()
