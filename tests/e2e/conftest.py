"""Fixtures for the end-to-end tests: one real ComfyUI server per test session, on the CPU, with random
Z-Image models under the official file names (the tiny transformer and text encoder, a full-size Flux
VAE), an input image for the img2img example, and this pack in its custom_nodes.

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
def full_size_vae(comfy_dir, tmp_path_factory) -> str:
    """A full-size Flux VAE with random weights in the original key names (ae.safetensors' layout), the
    only VAE ComfyUI's native VAELoader accepts. Returns its path; the base folder has it as
    models/vae/ae.safetensors."""
    return h.write_full_size_vae(str(tmp_path_factory.mktemp("full_vae") / "ae_full.safetensors"))


@pytest.fixture(scope="session")
def comfy_base(comfy_dir, tiny, full_size_vae, tmp_path_factory) -> str:
    """ComfyUI's --base-directory: models/ (the tiny transformer and text encoder, the full-size VAE),
    input/, custom_nodes/, user/ (output/ appears on the first save)."""
    models = {"transformer": tiny["transformer"], "text_encoder": tiny["text_encoder"], "vae": full_size_vae}
    return h.make_base_dir(str(tmp_path_factory.mktemp("comfy_base")), models)


@pytest.fixture(scope="session")
def comfy(comfy_dir, comfy_base, tmp_path_factory):
    """The running server (an e2e_helpers.ComfyServer); stopped when the session ends. Its stdout and
    stderr are in comfy.log()."""
    server = h.ComfyServer(comfy_dir, comfy_base, str(tmp_path_factory.mktemp("comfy_log") / "comfyui.log"))
    with h.running(server):
        yield server


@pytest.fixture(scope="module")
def extra_paths_comfy(comfy_dir, tiny, tmp_path_factory):
    """A second server, beside `comfy`, whose base folder has empty model folders: the tiny transformer,
    text encoder and VAE are in a folder elsewhere, under h.EXTRA_NAMES, and reach ComfyUI only through
    an extra_model_paths.yaml given with --extra-model-paths-config (ComfyUI 0.8.0 reads no such file
    from the base folder by itself, only the one beside its main.py). server.extra_models is that folder.
    Stopped after the module."""
    models = {"transformer": tiny["transformer"], "text_encoder": tiny["text_encoder"], "vae": tiny["vae"]}
    store = h.place_models(str(tmp_path_factory.mktemp("extra_models")), models, h.EXTRA_NAMES)
    base = h.make_base_dir(str(tmp_path_factory.mktemp("comfy_base_extra_paths")), None)
    yaml_path = h.write_extra_model_paths(
        os.path.join(base, "extra_model_paths.yaml"), store,
        {h.OFFICIAL_NAMES[key][0]: folder for key, (folder, _) in h.EXTRA_NAMES.items()})
    server = h.ComfyServer(comfy_dir, base, str(tmp_path_factory.mktemp("comfy_log_extra_paths") / "comfyui.log"),
                           extra_args=("--extra-model-paths-config", yaml_path))
    server.extra_models = store
    with h.running(server):
        yield server


@pytest.fixture(scope="session")
def object_info(comfy) -> dict:
    info = comfy.get("/object_info")
    missing = [n for n in h.OUR_NODES if n not in info]
    if missing:
        pytest.fail(f"ComfyUI did not register {missing}; the pack failed to import:\n{comfy.log_tail()}")
    return info
