"""Fixtures for the end-to-end tests: one real ComfyUI server per test session, on the CPU, with the
tiny random Z-Image models under the official file names and this pack in its custom_nodes.

Opt-in: without COMFYUI_DIR every test here is skipped (see e2e_helpers.SKIP_REASON).
"""
from __future__ import annotations

import os

import pytest

from . import e2e_helpers as h

if not h.SKIP_REASON:
    # transformers (which the tiny models need here) imports torchvision; make a torchvision
    # built for another torch importable, as the launcher does for ComfyUI.
    from .comfy_launcher import make_torchvision_importable

    make_torchvision_importable()


@pytest.fixture(scope="session")
def comfy_dir() -> str:
    if h.SKIP_REASON:
        pytest.skip(h.SKIP_REASON)
    return h.check_comfyui_dir()


@pytest.fixture(scope="session")
def comfy_base(comfy_dir, tiny, tmp_path_factory) -> str:
    """ComfyUI's --base-directory: models/, custom_nodes/, user/ (output/ appears on the first save)."""
    return h.make_base_dir(str(tmp_path_factory.mktemp("comfy_base")), tiny)


@pytest.fixture(scope="session")
def comfy(comfy_dir, comfy_base, tmp_path_factory):
    """The running server (an e2e_helpers.ComfyServer); stopped when the session ends."""
    server = h.ComfyServer(comfy_dir, comfy_base, str(tmp_path_factory.mktemp("comfy_log") / "comfyui.log"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def object_info(comfy) -> dict:
    info = comfy.get("/object_info")
    missing = [n for n in h.OUR_NODES if n not in info]
    if missing:
        pytest.fail(f"ComfyUI did not register {missing}; the pack failed to import:\n{comfy.log_tail()}")
    return info


@pytest.fixture(scope="session")
def full_size_vae(comfy_base) -> str:
    """models/vae/ae_full.safetensors: a full-size Flux VAE with random weights in the original key names,
    the only VAE ComfyUI's native VAELoader accepts. Returns its file name."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from zimage_nodes.loaders.model_detection import scaffold_config
    from zimage_nodes.loaders.tiny_models import original_vae_state

    config = scaffold_config("vae")
    levels = len(config["block_out_channels"])
    assert config["block_out_channels"] == [128, 256, 512, 512] and config["latent_channels"] == 16
    torch.manual_seed(0)
    vae = AutoencoderKL(**config).eval()
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in vae.state_dict().items()}
    name = "ae_full.safetensors"
    save_file(original_vae_state(state, levels), os.path.join(comfy_base, "models", "vae", name))
    return name
