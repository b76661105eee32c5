"""End to end through a real ComfyUI server on the CPU: node registration, every example workflow as
the frontend would queue it (with ComfyUI's own VAELoader, VAEEncode, VAEDecode and LoadImage where
the examples use them), an error a user can fix, cancel, and the native VAE Decode.

Opt-in: set COMFYUI_DIR (and COMFYUI_PYTHON); see e2e_helpers.py.
"""
from __future__ import annotations

import json
import os
import time
import uuid

import pytest

from . import e2e_helpers as h

if h.SKIP_REASON:
    pytest.skip(h.SKIP_REASON, allow_module_level=True)

EXAMPLES = sorted(f for f in os.listdir(h.EXAMPLE_WORKFLOWS) if f.endswith(".json"))


def test_object_info_lists_the_nodes_and_the_models(object_info):
    for name in h.OUR_NODES:
        assert object_info[name]["category"] == "Z-Image", (name, object_info[name]["category"])
        assert object_info[name]["python_module"].startswith("custom_nodes."), object_info[name]["python_module"]
    loader = object_info["ZImageShardedLoader"]["input"]["required"]
    assert "z_image_turbo_bf16.safetensors" in loader["model"][0]
    assert "qwen_3_4b.safetensors" in loader["text_encoder"][0]
    assert "ae.safetensors" in loader["vae"][0]
    assert object_info["ZImageShardedLoader"]["output"] == ["ZIMAGE_MODEL", "ZIMAGE_TEXT_ENCODER", "ZIMAGE_VAE"]
    assert object_info["ZImageSampler"]["output"] == ["LATENT"]
    assert object_info["ZImageVAEDecodeLazy"]["output"] == ["IMAGE"]


def test_extension_and_templates_are_served(comfy, object_info):
    """The frontend loads web/zimage.js from /extensions/zimage-nodes/ and offers the examples as templates."""
    scripts = comfy.get("/extensions")
    ours = [s for s in scripts if s.startswith("/extensions/zimage-nodes/")]
    assert ours == ["/extensions/zimage-nodes/zimage.js"], scripts
    with open(os.path.join(h.PACK_ROOT, "web", "zimage.js"), "rb") as f:
        expected = f.read()
    import urllib.request

    with urllib.request.urlopen(comfy.url + ours[0], timeout=30) as r:
        assert r.read() == expected
    templates = comfy.get("/api/workflow_templates")
    assert sorted(templates.get("zimage-nodes", [])) == sorted(e[: -len(".json")] for e in EXAMPLES), templates
    # the template browser shows /api/workflow_templates/<pack>/<name>.jpg for each
    for example in EXAMPLES:
        with urllib.request.urlopen(f"{comfy.url}/api/workflow_templates/zimage-nodes/{example[:-5]}.jpg",
                                    timeout=30) as r:
            assert r.headers.get("Content-Type") == "image/jpeg" and r.read(3) == b"\xff\xd8\xff", example


def test_native_nodes_the_examples_use_are_declared_as_the_static_check_expects(object_info):
    """tests/test_example_workflows.py checks the examples without ComfyUI, from its own copy of the
    native nodes' declarations (NATIVE_NODES); this is that copy against ComfyUI's /object_info."""
    native = _static_checks().NATIVE_NODES
    for name, expected in native.items():
        info = object_info[name]
        inputs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        links, widgets = {}, 0
        for input_name, decl in inputs.items():
            kind, opts = decl[0], (decl[1] if len(decl) > 1 else {})
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets += 1 + bool(opts.get("control_after_generate")) + bool(opts.get("image_upload"))
            else:
                links[input_name] = kind
        assert (links, info["output"], widgets) == (expected["inputs"], expected["outputs"], expected["widgets"]), \
            (name, links, info["output"], widgets)


def _static_checks():
    import importlib.util

    path = os.path.join(h.PACK_ROOT, "tests", "test_example_workflows.py")
    spec = importlib.util.spec_from_file_location("zimage_static_example_checks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workflow", EXAMPLES)
def test_example_workflow_runs(comfy, object_info, workflow):
    """Each example as the frontend queues it, shrunk to 64x64 and 2 steps: the native-VAE ones load
    models/vae/ae.safetensors (a full-size Flux VAE here) in ComfyUI's own VAELoader; img2img starts
    from input/example.png (64x64)."""
    prompt = h.shrink(h.to_api(h.load_workflow(workflow), object_info), size=64, steps=2)
    types = {n["class_type"] for n in prompt.values()}
    assert types >= {"ZImageShardedLoader", "ZImageTextEncode", "ZImageSampler", "SaveImage"}, types
    for node in prompt.values():
        if node["class_type"] == "VAELoader":
            assert node["inputs"]["vae_name"] == h.OFFICIAL_NAMES["vae"][1], node
        if node["class_type"] == "LoadImage":
            assert node["inputs"]["image"] == h.INPUT_IMAGE, node
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    assert "execution_error" not in h.messages(entry), h.describe(entry)
    image = h.saved_image(comfy, entry, h.node_id(prompt, "SaveImage"))
    # img2img keeps its input picture's size; the others make 64x64 from the empty latent
    assert image.size == (h.INPUT_SIZE if "LoadImage" in types else (64, 64)) and image.mode == "RGB", image

    loader = h.node_id(prompt, "ZImageShardedLoader")
    cached = h.messages(entry)["execution_cached"][0]["nodes"]
    if loader not in cached:  # a loader served from ComfyUI's cache reports nothing
        plan = entry["outputs"][loader]["zimage_plan"][0]
        assert "CPU" in plan, plan  # on the CPU the budget (6 GB in the low-VRAM example) is not applied
    sampler = h.node_id(prompt, "ZImageSampler")
    run = entry["outputs"][sampler]["zimage_run"][0]
    assert "attention" in run and "s/step" in run, run
    if "LoadImage" in types:  # img2img: the sampler starts from the encoded picture, part way
        assert prompt[sampler]["inputs"]["denoise"] == 0.6
        assert prompt[h.node_id(prompt, "VAEEncode")]["inputs"]["pixels"] == [h.node_id(prompt, "LoadImage"), 0]


def test_img2img_keeps_the_input_picture_where_denoise_is_low(comfy, object_info):
    """The sampler starts from the encoded input/example.png: with denoise 0.05 the result stays closer to
    that picture's encode-decode round trip than with denoise 1 (pure noise). The weights are random, so
    the round trip, not the picture itself, is the reference."""
    import numpy as np

    prompt = h.shrink(h.to_api(h.load_workflow("zimage_img2img.json"), object_info))
    loader, encode = h.node_id(prompt, "ZImageShardedLoader"), h.node_id(prompt, "VAEEncode")
    sampler, decode = h.node_id(prompt, "ZImageSampler"), h.node_id(prompt, "ZImageVAEDecodeLazy")
    save = h.node_id(prompt, "SaveImage")

    def pixels(entry) -> np.ndarray:
        return np.asarray(h.saved_image(comfy, entry, save).convert("RGB"), np.float32)

    round_trip = {i: n for i, n in prompt.items() if i not in (sampler, h.node_id(prompt, "ZImageTextEncode"))}
    round_trip[decode] = {"class_type": "ZImageVAEDecodeLazy", "inputs": {"vae": [loader, 2], "samples": [encode, 0]}}
    entry = comfy.run(round_trip)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    reference = pixels(entry)

    distance = {}
    for denoise in (0.05, 1.0):
        prompt[sampler]["inputs"].update(denoise=denoise, seed=h.unique_seed())
        entry = comfy.run(prompt)
        assert entry["status"]["status_str"] == "success", h.describe(entry)
        distance[denoise] = float(np.abs(pixels(entry) - reference).mean())
    # measured: about 26 against 36 (of 255)
    assert distance[0.05] < distance[1.0] - 3, distance


def test_low_vram_example_loads_on_the_cpu(comfy, object_info):
    """On a CPU the 6 GB budget is ignored: the loader must run (not come from the cache) and plan 'cpu'."""
    prompt = h.shrink(h.to_api(h.load_workflow("zimage_low_vram_6gb.json"), object_info))
    loader = h.node_id(prompt, "ZImageShardedLoader")
    assert prompt[loader]["inputs"]["vram_budget_gb"] == 6
    prompt[loader]["inputs"]["vram_budget_gb"] = 5.5  # a budget no other test uses: the loader really runs
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    assert loader not in h.messages(entry)["execution_cached"][0]["nodes"]
    plan = entry["outputs"][loader]["zimage_plan"][0]
    assert "CPU" in plan, plan


@pytest.mark.parametrize("case", ["sd_latent", "size_not_multiple_of_16"])
def test_bad_input_reports_our_error(comfy, object_info, case):
    prompt = h.shrink(h.to_api(h.load_workflow("zimage_text_to_image.json"), object_info))
    latent = h.node_id(prompt, "EmptySD3LatentImage")
    if case == "sd_latent":  # a 4-channel SD latent where a 16-channel Flux-VAE latent belongs
        prompt[latent] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
        expected = ["not a Z-Image (Flux VAE) latent", "Expected: [batch, 16,", "Found: [1, 4, 8, 8]"]
    else:  # 72 px: a multiple of 8 (so a valid latent), not of 16 (the transformer's 2x2 patches)
        prompt[latent]["inputs"].update(width=72, height=72)
        expected = ["multiples of 16", "Found: 72x72"]
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "error", h.describe(entry)
    errors = h.messages(entry).get("execution_error", [])
    assert len(errors) == 1, h.describe(entry)
    err = errors[0]
    assert err["node_type"] == "ZImageSampler" and err["node_id"] == h.node_id(prompt, "ZImageSampler"), err
    assert err["exception_type"].endswith("ZImageError"), err["exception_type"]
    message = err["exception_message"]
    assert all(text in message for text in expected) and "Fix:" in message, message
    assert not entry["outputs"].get(h.node_id(prompt, "SaveImage")), h.describe(entry)


def test_interrupt_stops_the_sampler_and_the_next_run_works(comfy, object_info):
    websocket = pytest.importorskip("websocket", reason="pip install websocket-client (comfy-cli brings it)")
    prompt = h.shrink(h.to_api(h.load_workflow("zimage_text_to_image.json"), object_info), size=256, steps=60)
    sampler = h.node_id(prompt, "ZImageSampler")
    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{comfy.port}/ws?clientId={client_id}", timeout=10)
    try:
        prompt_id = comfy.queue(prompt, client_id)
        deadline, progress = time.monotonic() + 120, None
        while time.monotonic() < deadline:  # wait for the sampler's first step
            try:
                frame = ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            if isinstance(frame, bytes):  # previews
                continue
            msg = json.loads(frame)
            data = msg.get("data", {})
            if msg.get("type") == "progress" and data.get("prompt_id") == prompt_id and data.get("node") == sampler:
                progress = data
                break
            if msg.get("type") in ("execution_error", "execution_success") and data.get("prompt_id") == prompt_id:
                break
        assert progress is not None, "no progress from the sampler:\n" + h.describe(comfy.wait(prompt_id))
        assert progress["max"] == 60 and progress["value"] >= 1, progress
        interrupted_at = time.monotonic()
        comfy.post("/interrupt", {"prompt_id": prompt_id})
    finally:
        ws.close()
    entry = comfy.wait(prompt_id, timeout=60)
    stopped_after = time.monotonic() - interrupted_at
    msgs = h.messages(entry)
    assert entry["status"]["status_str"] == "error", h.describe(entry)
    assert "execution_success" not in msgs and "execution_error" not in msgs, h.describe(entry)
    assert [m["node_id"] for m in msgs.get("execution_interrupted", [])] == [sampler], h.describe(entry)
    assert not entry["outputs"].get(h.node_id(prompt, "SaveImage")), h.describe(entry)
    assert stopped_after < 20, f"the sampler took {stopped_after:.1f} s to stop"  # 60 steps take far longer

    again = comfy.run(h.shrink(h.to_api(h.load_workflow("zimage_text_to_image.json"), object_info)))
    assert again["status"]["status_str"] == "success", h.describe(again)
    assert h.saved_image(comfy, again, h.node_id(prompt, "SaveImage")).size == (64, 64)


def test_native_vae_decode_takes_our_latent(comfy, object_info):
    """The sampler's LATENT decodes with ComfyUI's own VAELoader + VAEDecode and a full-size Flux VAE
    (models/vae/ae.safetensors here), and the probe sees a proper image."""
    prompt = h.shrink(h.to_api(h.load_workflow("zimage_text_to_image.json"), object_info))
    sampler = h.node_id(prompt, "ZImageSampler")
    decode = h.node_id(prompt, "ZImageVAEDecodeLazy")
    save = h.node_id(prompt, "SaveImage")
    prompt["100"] = {"class_type": "VAELoader", "inputs": {"vae_name": h.OFFICIAL_NAMES["vae"][1]}}
    prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["100", 0]}}
    prompt["101"] = {"class_type": "ZImageE2EImageProbe", "inputs": {"images": [decode, 0]}}
    prompt[save]["inputs"]["filename_prefix"] = "native_vae"
    entry = comfy.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    stats = entry["outputs"]["101"]["probe"][0]
    assert stats["shape"] == [1, 64, 64, 3] and stats["finite"], stats
    assert 0.0 <= stats["min"] <= stats["max"] <= 1.0 and stats["std"] > 0, stats
    assert h.saved_image(comfy, entry, save).size == (64, 64)
