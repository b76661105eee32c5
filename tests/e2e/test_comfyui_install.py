"""How the pack sits in a real ComfyUI install: its model lists follow ComfyUI's extra_model_paths.yaml
(models kept outside ComfyUI, under names of their own), and importing it adds little to ComfyUI's
start-up.

Opt-in: set COMFYUI_DIR (and COMFYUI_PYTHON); see e2e_helpers.py.
"""
from __future__ import annotations

import os

import pytest

from . import e2e_helpers as h

if h.SKIP_REASON:
    pytest.skip(h.SKIP_REASON, allow_module_level=True)

# ComfyUI prints each custom node's import time rounded to 0.1 s; ours must print below this.
MAX_IMPORT_S = 1.0


def test_models_found_through_extra_model_paths_yaml(extra_paths_comfy):
    """The base folder's models/ is empty; the loader lists, and a 64x64 two-step text-to-image run loads,
    the tiny models that only the extra_model_paths.yaml points at."""
    comfy = extra_paths_comfy
    names = {key: name for key, (_, name) in h.EXTRA_NAMES.items()}
    # ComfyUI read the yaml: one search path per model kind, base_path joined with the folder
    log = comfy.log()
    for key, (folder, _) in h.EXTRA_NAMES.items():
        kind = h.OFFICIAL_NAMES[key][0]
        path = os.path.join(comfy.extra_models, folder)
        assert f"Adding extra search path {kind} {path}" in log, (kind, path, comfy.log_tail())

    info = comfy.get("/object_info")
    assert all(n in info for n in h.OUR_NODES), comfy.log_tail()
    lists = {key: info["ZImageShardedLoader"]["input"]["required"][widget][0]
             for key, widget in (("transformer", "model"), ("text_encoder", "text_encoder"), ("vae", "vae"))}
    for key, listed in lists.items():
        assert names[key] in listed, (key, listed)
        # nothing under the official names: the base folder really has no models (a yaml beside
        # ComfyUI's own main.py, which it also reads, could add some)
        assert h.OFFICIAL_NAMES[key][1] not in listed, (key, listed)

    prompt = h.shrink(h.to_api(h.load_workflow("zimage_text_to_image.json"), info), size=64, steps=2)
    loader = h.node_id(prompt, "ZImageShardedLoader")
    inputs = prompt[loader]["inputs"]
    assert (inputs["model"], inputs["text_encoder"], inputs["vae"]) == \
        tuple(name for _, name in h.OFFICIAL_NAMES.values()), inputs
    inputs.update(model=names["transformer"], text_encoder=names["text_encoder"], vae=names["vae"])
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    assert "execution_error" not in h.messages(entry), h.describe(entry)
    assert loader not in h.messages(entry)["execution_cached"][0]["nodes"], h.describe(entry)
    assert "CPU" in entry["outputs"][loader]["zimage_plan"][0], entry["outputs"][loader]
    image = h.saved_image(comfy, entry, h.node_id(prompt, "SaveImage"))
    assert image.size == (64, 64) and image.mode == "RGB", image
    assert os.path.realpath(image.filename).startswith(os.path.realpath(comfy.output_dir) + os.sep), image.filename


def test_pack_imports_in_under_a_second(comfy, object_info):
    """ComfyUI's start-up log lists every custom node's import time; ours is there, did not fail, and
    printed below MAX_IMPORT_S (heavy imports such as diffusers must wait until a node runs)."""
    log = comfy.log()
    times = h.import_times(log)
    assert times, "no 'Import times for custom nodes:' block in ComfyUI's log:\n" + log[-6000:]
    pack = os.path.join(comfy.base_dir, "custom_nodes", h.PACK_FOLDER)
    assert pack in times, (pack, times)
    seconds, failed = times[pack]
    assert not failed, "ComfyUI reports (IMPORT FAILED) for the pack:\n" + log[-6000:]
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and h.PACK_FOLDER in line], log[-6000:]
    assert seconds < MAX_IMPORT_S, f"importing the pack took {seconds:.1f} s at ComfyUI's start-up"
