"""End to end through a real ComfyUI server on the CPU: node registration, the example workflows as
the frontend would queue them, an error a user can fix, cancel, and the native VAE Decode.

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


def saved_image(comfy, entry: dict, node: str):
    """The one PNG a SaveImage node wrote in this run, opened with PIL."""
    from PIL import Image

    images = entry["outputs"].get(node, {}).get("images", [])
    assert len(images) == 1, h.describe(entry)
    img = images[0]
    assert img["type"] == "output", img
    path = os.path.join(comfy.output_dir, img["subfolder"], img["filename"])
    assert os.path.isfile(path), f"{path} was reported but not written"
    return Image.open(path)


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


@pytest.mark.parametrize("workflow", EXAMPLES)
def test_example_workflow_runs(comfy, object_info, workflow):
    prompt = h.shrink(h.to_api(h.load_workflow(workflow), object_info), size=64, steps=2)
    assert {n["class_type"] for n in prompt.values()} >= {*h.OUR_NODES, "EmptySD3LatentImage", "SaveImage"}
    entry = comfy.run(prompt)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    assert "execution_error" not in h.messages(entry), h.describe(entry)
    image = saved_image(comfy, entry, h.node_id(prompt, "SaveImage"))
    assert image.size == (64, 64) and image.mode == "RGB"

    loader = h.node_id(prompt, "ZImageShardedLoader")
    cached = h.messages(entry)["execution_cached"][0]["nodes"]
    if loader not in cached:  # a loader served from ComfyUI's cache reports nothing
        plan = entry["outputs"][loader]["zimage_plan"][0]
        assert "CPU" in plan, plan  # on the CPU the budget (6 GB in the low-VRAM example) is not applied
    run = entry["outputs"][h.node_id(prompt, "ZImageSampler")]["zimage_run"][0]
    assert "attention" in run and "s/step" in run, run


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
    assert saved_image(comfy, again, h.node_id(prompt, "SaveImage")).size == (64, 64)


def test_native_vae_decode_takes_our_latent(comfy, object_info, full_size_vae):
    """The sampler's LATENT decodes with ComfyUI's own VAELoader + VAEDecode and a full-size Flux VAE."""
    prompt = h.shrink(h.to_api(h.load_workflow("zimage_text_to_image.json"), object_info))
    sampler = h.node_id(prompt, "ZImageSampler")
    decode = h.node_id(prompt, "ZImageVAEDecodeLazy")
    save = h.node_id(prompt, "SaveImage")
    prompt["100"] = {"class_type": "VAELoader", "inputs": {"vae_name": full_size_vae}}
    prompt[decode] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": ["100", 0]}}
    prompt["101"] = {"class_type": "ZImageE2EImageProbe", "inputs": {"images": [decode, 0]}}
    prompt[save]["inputs"]["filename_prefix"] = "native_vae"
    entry = comfy.run(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success", h.describe(entry)
    stats = entry["outputs"]["101"]["probe"][0]
    assert stats["shape"] == [1, 64, 64, 3] and stats["finite"], stats
    assert 0.0 <= stats["min"] <= stats["max"] <= 1.0 and stats["std"] > 0, stats
    assert saved_image(comfy, entry, save).size == (64, 64)
