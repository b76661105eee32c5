"""The frontend in headless Chromium: drop an example workflow on the canvas, queue it, see the image
and the plan the extension (web/zimage.js) writes on the loader node.

Opt-in: COMFYUI_DIR (see e2e_helpers.py), plus Debian's chromium (`apt-get install -y chromium`)
and `pip install playwright` (never `playwright install`: it downloads a browser of its own).
"""
from __future__ import annotations

import os
import time

import pytest

from . import e2e_helpers as h

if h.SKIP_REASON:
    pytest.skip(h.SKIP_REASON, allow_module_level=True)

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = os.path.join(h.PACK_ROOT, "docs", "workflow_with_plan.png")
WORKFLOW = "zimage_text_to_image.json"

DROP_FILE = """([name, text]) => {
    const transfer = new DataTransfer();
    transfer.items.add(new File([text], name, {type: "application/json"}));
    const canvas = window.app.canvasEl;
    for (const type of ["dragenter", "dragover", "drop"]) {
        canvas.dispatchEvent(new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}));
    }
}"""

SET_WIDGETS = """(changes) => {
    const graph = window.app.graph;
    for (const [type, name, value] of changes) {
        const node = graph.nodes.find((n) => n.type === type);
        const widget = node.widgets.find((w) => w.name === name);
        widget.value = value;
        widget.callback?.(value, window.app.canvas, node);
    }
    graph.setDirtyCanvas(true, true);
}"""

WIDGETS = """(type) => {
    const node = window.app.graph.nodes.find((n) => n.type === type);
    return Object.fromEntries((node.widgets || []).map((w) => [w.name, w.value]));
}"""

IMAGE_SHOWN = """() => {
    const node = window.app.graph.nodes.find((n) => n.type === "SaveImage");
    const img = node?.imgs?.[0];
    return img && img.complete && img.naturalWidth > 0 ? [img.src, img.naturalWidth, img.naturalHeight] : null;
}"""


def wait_for_run(comfy, seed: int) -> dict:
    """The /history entry of the run the page queued (found by its seed), once it has finished."""
    deadline = time.monotonic() + h.RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        runs = [e for e in comfy.get("/history").values()
                if any(n.get("class_type") == "ZImageSampler" and n["inputs"].get("seed") == seed
                       for n in e["prompt"][2].values())]
        assert len(runs) <= 1, f"{len(runs)} runs with seed {seed}"
        if runs and runs[0]["status"].get("status_str") in ("success", "error"):
            return runs[0]
        time.sleep(0.5)
    raise AssertionError(f"the queued workflow (seed {seed}) did not finish within {h.RUN_TIMEOUT_S:.0f} s:\n"
                         + comfy.log_tail())


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


def test_drop_queue_and_show_plan(comfy, object_info, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 720}, device_scale_factor=1.5)
    console, page_errors, failed = [], [], []
    page.on("console", lambda m: console.append((m.type, m.text, m.location.get("url", ""))))
    page.on("pageerror", lambda e: page_errors.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and failed.append((r.status, r.url)))

    page.goto(comfy.url + "/")
    page.wait_for_function("() => window.app?.graph && window.app.canvasEl", timeout=90_000)
    page.wait_for_function("() => window.app.extensions?.some((e) => e.name === 'zimage.nodes')", timeout=30_000)

    with open(os.path.join(h.EXAMPLE_WORKFLOWS, WORKFLOW)) as f:
        page.evaluate(DROP_FILE, [WORKFLOW, f.read()])
    page.wait_for_function("() => window.app.graph.nodes.some((n) => n.type === 'ZImageSampler')", timeout=30_000)
    types = sorted(page.evaluate("() => window.app.graph.nodes.map((n) => n.type)"))
    assert types == sorted(["ZImageShardedLoader", "ZImageTextEncode", "EmptySD3LatentImage", "ZImageSampler",
                            "ZImageVAEDecodeLazy", "SaveImage"]), types

    seed = h.unique_seed()
    page.evaluate(SET_WIDGETS, [["EmptySD3LatentImage", "width", 64], ["EmptySD3LatentImage", "height", 64],
                                ["ZImageSampler", "steps", 2], ["ZImageSampler", "seed", seed],
                                # a budget no other test uses, so the loader runs (and reports) in this
                                # run: ComfyUI sends no UI output for a node it serves from its cache
                                ["ZImageShardedLoader", "vram_budget_gb", 7.5]])
    page.evaluate("async () => await window.app.queuePrompt(0, 1)")
    run = wait_for_run(comfy, seed)
    assert run["status"]["status_str"] == "success", h.describe(run)
    latent = [n for n in run["prompt"][2].values() if n["class_type"] == "EmptySD3LatentImage"][0]
    assert latent["inputs"] == {"width": 64, "height": 64, "batch_size": 1}, latent
    page.wait_for_function(IMAGE_SHOWN, timeout=30_000)
    src, width, height = page.evaluate(IMAGE_SHOWN)
    assert (width, height) == (64, 64) and "type=output" in src, src

    # the picture the README shows
    page.evaluate("() => window.app.extensionManager?.command?.execute('Comfy.Canvas.FitView')")
    page.wait_for_timeout(500)
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    page.screenshot(path=SCREENSHOT)

    loader = page.evaluate(WIDGETS, "ZImageShardedLoader")
    assert "zimage_info" in loader, loader
    assert "CPU" in loader["zimage_info"], loader["zimage_info"]
    assert loader["model"] == "z_image_turbo_bf16.safetensors", loader  # the report did not shift real widgets
    sampler = page.evaluate(WIDGETS, "ZImageSampler")
    assert "s/step" in sampler.get("zimage_info", ""), sampler
    assert sampler["steps"] == 2, sampler

    # The report is display-only: it stays out of the saved workflow's widgets_values.
    saved = page.evaluate("() => window.app.graph.serialize().nodes.find((n) => n.type === 'ZImageShardedLoader')")
    assert saved["widgets_values"] == [v for k, v in loader.items() if k != "zimage_info"], saved["widgets_values"]

    ours = [c for c in console if c[0] in ("error", "warning") and "zimage" in (c[1] + c[2]).lower()]
    assert not ours, ours
    assert not [e for e in page_errors if "zimage" in e.lower()], page_errors
    assert not [f for f in failed if "zimage" in f[1].lower()], failed
    page.close()
