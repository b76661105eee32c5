"""The frontend in headless Chromium: drop an example workflow on the canvas, queue it, see the image
and the reports the extension (web/zimage.js) writes on the nodes, in full; open every example
workflow and picture it (the template browser's thumbnails).

ZIMAGE_UPDATE_THUMBNAILS=1 writes the pictures to example_workflows/<name>.jpg; otherwise they are
only made and checked. docs/workflow_with_plan.png is written on every run.

Opt-in: COMFYUI_DIR (see e2e_helpers.py), plus Debian's chromium (`apt-get install -y chromium`)
and `pip install playwright` (never `playwright install`: it downloads a browser of its own).
"""
from __future__ import annotations

import io
import json
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
EXAMPLES = sorted(f for f in os.listdir(h.EXAMPLE_WORKFLOWS) if f.endswith(".json"))
UPDATE_THUMBNAILS = os.environ.get("ZIMAGE_UPDATE_THUMBNAILS") == "1"
THUMBNAIL_WIDTH = 512
THUMBNAIL_MAX_BYTES = 150_000
# the budget the page sets on the loader, and the plan it shows for it on a GPU
BUDGET_GB = 7.5

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

# A report box (web/zimage.js): its text, label, whether it is saved, and whether all of it shows.
REPORT_BOX = """([type, name]) => {
    const node = window.app.graph.nodes.find((n) => n.type === type);
    const widget = node.widgets?.find((w) => w.name === name);
    if (!widget) {
        return null;
    }
    const el = widget.inputEl;
    return {value: widget.value, label: widget.label, serialize: widget.serialize,
            optionsSerialize: widget.options?.serialize, readOnly: el?.readOnly,
            scrollHeight: el?.scrollHeight, clientHeight: el?.clientHeight, shown: !!el && el.isConnected
            && el.getClientRects().length > 0, nodeHeight: node.size[1], nodeWidth: node.size[0]};
}"""

# What the frontend does with an "executed" message for a node: calls its onExecuted with the node's UI output.
SHOW_OUTPUT = """([type, output]) => {
    const node = window.app.graph.nodes.find((n) => n.type === type);
    node.onExecuted(output);
    window.app.graph.setDirtyCanvas(true, true);
}"""

# The graph's on-screen box (all nodes with their titles), padded, in page pixels.
GRAPH_BOX = """(pad) => {
    const canvas = window.app.canvas, ds = canvas.ds;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of window.app.graph.nodes) {
        const [x, y, w, h] = n.boundingRect ?? [n.pos[0], n.pos[1] - 30, n.size[0], n.size[1] + 30];
        x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
    }
    const r = canvas.canvas.getBoundingClientRect();
    return {x: Math.max(0, (x0 + ds.offset[0]) * ds.scale + r.left - pad),
            y: Math.max(0, (y0 + ds.offset[1]) * ds.scale + r.top - pad),
            width: (x1 - x0) * ds.scale + 2 * pad, height: (y1 - y0) * ds.scale + 2 * pad};
}"""

COMMAND = "(id) => window.app.extensionManager?.command?.execute(id)"

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


def open_comfyui(browser, comfy, viewport=(1280, 720), scale=1.5):
    """A page with ComfyUI's frontend and our extension loaded; its console errors, page errors and
    failed requests are collected in page.zimage_log."""
    page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]}, device_scale_factor=scale)
    log = {"console": [], "page_errors": [], "failed": []}
    page.on("console", lambda m: log["console"].append((m.type, m.text, m.location.get("url", ""))))
    page.on("pageerror", lambda e: log["page_errors"].append(str(e)))
    page.on("response", lambda r: r.status >= 400 and log["failed"].append((r.status, r.url)))
    page.zimage_log = log
    page.goto(comfy.url + "/")
    page.wait_for_function("() => window.app?.graph && window.app.canvasEl", timeout=90_000)
    page.wait_for_function("() => window.app.extensions?.some((e) => e.name === 'zimage.nodes')", timeout=30_000)
    return page


def drop_workflow(page, name: str) -> dict:
    """Drop example_workflows/<name> on the canvas, as a user drags the file in; returns the file's graph."""
    with open(os.path.join(h.EXAMPLE_WORKFLOWS, name)) as f:
        text = f.read()
    workflow = json.loads(text)
    page.evaluate(DROP_FILE, [name, text])
    expected = sorted(f"{n['id']}:{n['type']}" for n in workflow["nodes"])
    page.wait_for_function("(expected) => JSON.stringify(window.app.graph.nodes.map((n) => `${n.id}:${n.type}`)"
                           ".sort()) === JSON.stringify(expected)", arg=expected, timeout=30_000)
    return workflow


def assert_no_errors_of_ours(page) -> None:
    log = page.zimage_log
    ours = [c for c in log["console"] if c[0] in ("error", "warning") and "zimage" in (c[1] + c[2]).lower()]
    assert not ours, ours
    assert not [e for e in log["page_errors"] if "zimage" in e.lower()], log["page_errors"]
    assert not [f for f in log["failed"] if "zimage" in f[1].lower()], log["failed"]


def gpu_plan(budget_gb: float) -> str:
    """The plan the loader reports on a CUDA GPU for this budget (3/4 of 32 GB of RAM for pinning), made by
    the loader's own planner for the full-size model's sizes, measured on the meta device (no GPU needed)."""
    import torch
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from zimage_nodes.loaders.model_detection import scaffold_config
    from zimage_nodes.loaders.model_sizes import ModelSizes
    from zimage_nodes.loaders.placement import GiB, plan_memory

    with torch.device("meta"):
        t = ZImageTransformer2DModel(**scaffold_config("transformer"))
        te = Qwen3Model(Qwen3Config(**scaffold_config("text_encoder")))
        v = AutoencoderKL(**scaffold_config("vae"))
    sizes = ModelSizes.of(t, te, v, torch.bfloat16, torch.bfloat16)  # on a GPU the VAE is bf16 too
    return plan_memory(sizes, "cuda:0", budget_gb, 0.0, free_host_bytes=32 * GiB).summary()


def assert_report_shown_in_full(page, node_type: str, name: str, text: str) -> dict:
    box = page.evaluate(REPORT_BOX, [node_type, name])
    assert box is not None, f"no {name!r} report on {node_type}"
    assert box["value"] == text, box
    assert (box["label"], box["serialize"], box["optionsSerialize"], box["readOnly"]) == (name, False, False, True), box
    assert box["shown"], f"the {name!r} box of {node_type} is not on the page: {box}"
    # every line fits: the text box does not scroll (a cut-off report would)
    assert 0 < box["scrollHeight"] <= box["clientHeight"] + 1, box
    return box


def test_drop_queue_and_show_plan(comfy, object_info, browser):
    page = open_comfyui(browser, comfy)
    drop_workflow(page, WORKFLOW)
    types = sorted(page.evaluate("() => window.app.graph.nodes.map((n) => n.type)"))
    assert types == sorted(["ZImageShardedLoader", "ZImageTextEncode", "EmptySD3LatentImage", "ZImageSampler",
                            "ZImageVAEDecodeLazy", "SaveImage"]), types

    seed = h.unique_seed()
    page.evaluate(SET_WIDGETS, [["EmptySD3LatentImage", "width", 64], ["EmptySD3LatentImage", "height", 64],
                                ["ZImageSampler", "steps", 2], ["ZImageSampler", "seed", seed],
                                # a budget no other test uses, so the loader runs (and reports) in this
                                # run: ComfyUI sends no UI output for a node it serves from its cache
                                ["ZImageShardedLoader", "vram_budget_gb", BUDGET_GB]])
    page.evaluate("async () => await window.app.queuePrompt(0, 1)")
    run = wait_for_run(comfy, seed)
    assert run["status"]["status_str"] == "success", h.describe(run)
    latent = [n for n in run["prompt"][2].values() if n["class_type"] == "EmptySD3LatentImage"][0]
    assert latent["inputs"] == {"width": 64, "height": 64, "batch_size": 1}, latent
    page.wait_for_function(IMAGE_SHOWN, timeout=30_000)
    src, width, height = page.evaluate(IMAGE_SHOWN)
    assert (width, height) == (64, 64) and "type=output" in src, src
    outputs = {run["prompt"][2][i]["class_type"]: out for i, out in run["outputs"].items()}
    page.wait_for_function("() => window.app.graph.nodes.find((n) => n.type === 'ZImageSampler')"
                           ".widgets.some((w) => w.name === 'run')", timeout=30_000)

    # the reports of this run, each in full under its label
    cpu_plan = outputs["ZImageShardedLoader"]["zimage_plan"][0]
    assert "CPU" in cpu_plan, cpu_plan
    before = assert_report_shown_in_full(page, "ZImageShardedLoader", "plan", cpu_plan)
    assert_report_shown_in_full(page, "ZImageSampler", "run", outputs["ZImageSampler"]["zimage_run"][0])
    loader = page.evaluate(WIDGETS, "ZImageShardedLoader")
    assert loader["model"] == "z_image_turbo_bf16.safetensors", loader  # the report did not shift real widgets
    sampler = page.evaluate(WIDGETS, "ZImageSampler")
    assert "s/step" in sampler["run"] and sampler["steps"] == 2, sampler

    # On a GPU the plan has several lines (loaders/placement.py MemoryPlan.summary()): the loader's own
    # planner makes the one for this budget, delivered to the node as ComfyUI delivers a run's output.
    plan = gpu_plan(BUDGET_GB)
    assert plan.count("\n") >= 3 and f"budget {BUDGET_GB:.1f} GB" in plan, plan
    page.evaluate(SHOW_OUTPUT, ["ZImageShardedLoader", {"zimage_plan": [plan]}])
    page.wait_for_timeout(300)
    after = assert_report_shown_in_full(page, "ZImageShardedLoader", "plan", plan)
    assert after["nodeHeight"] > before["nodeHeight"] and after["nodeWidth"] >= before["nodeWidth"], (before, after)
    count = page.evaluate("() => window.app.graph.nodes.find((n) => n.type === 'ZImageShardedLoader')"
                          ".widgets.filter((w) => w.name === 'plan').length")
    assert count == 1, count  # the new plan replaced the old one

    # the picture the README shows
    page.evaluate(COMMAND, "Comfy.Canvas.FitView")
    page.wait_for_timeout(500)
    os.makedirs(os.path.dirname(SCREENSHOT), exist_ok=True)
    page.screenshot(path=SCREENSHOT)

    # The wheel over a report that has nothing to scroll zooms the canvas, as over the rest of the node.
    zoom = page.evaluate("""() => {
        const node = window.app.graph.nodes.find((n) => n.type === 'ZImageShardedLoader');
        const box = node.widgets.find((w) => w.name === 'plan').inputEl, r = box.getBoundingClientRect();
        const before = window.app.canvas.ds.scale;
        box.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: r.x + 5, clientY: r.y + 5,
                                                   bubbles: true, cancelable: true}));
        return [before, window.app.canvas.ds.scale];
    }""")
    assert zoom[1] > zoom[0], zoom

    # The reports are display-only: out of the saved workflow's widgets_values and out of the API prompt.
    loader = page.evaluate(WIDGETS, "ZImageShardedLoader")
    saved = page.evaluate("() => window.app.graph.serialize().nodes.find((n) => n.type === 'ZImageShardedLoader')")
    assert saved["widgets_values"] == [v for k, v in loader.items() if k != "plan"], saved["widgets_values"]
    saved = page.evaluate("() => window.app.graph.serialize().nodes.find((n) => n.type === 'ZImageSampler')")
    # seed and its control, steps, cfg, shift, sampler, denoise, attention, compile: no report
    assert "run" not in saved["widgets_values"] and len(saved["widgets_values"]) == 9, saved["widgets_values"]
    prompt = page.evaluate("async () => (await window.app.graphToPrompt()).output")
    for node in prompt.values():
        assert not {"plan", "run"} & set(node["inputs"]), node

    assert_no_errors_of_ours(page)
    page.close()


@pytest.mark.parametrize("workflow", EXAMPLES)
def test_example_workflow_opens_in_the_frontend_and_its_thumbnail(comfy, object_info, browser, workflow, tmp_path):
    """Every node of the example is a known, registered node with the file's widget values; then the
    graph is pictured for the template browser: the nodes only (no menus), 512 pixels wide, as a JPEG."""
    page = open_comfyui(browser, comfy, viewport=(1600, 900), scale=2)
    wf = drop_workflow(page, workflow)
    nodes = page.evaluate("() => window.app.graph.nodes.map((n) => [n.id, n.type, n.constructor?.comfyClass ?? null,"
                          " !!n.has_errors])")
    assert sorted(nodes) == sorted([n["id"], n["type"], n["type"], False] for n in wf["nodes"]), nodes
    saved = {n["id"]: n["widgets_values"] for n in page.evaluate("() => window.app.graph.serialize().nodes")}
    assert saved == {n["id"]: n["widgets_values"] for n in wf["nodes"]}, saved
    links = page.evaluate("() => window.app.graph.serialize().links")
    assert sorted(map(tuple, links)) == sorted(map(tuple, wf["links"])), links

    page.evaluate(COMMAND, "Workspace.ToggleFocusMode")  # hide the menus and side bars
    page.wait_for_timeout(300)
    page.evaluate(COMMAND, "Comfy.Canvas.FitView")
    page.wait_for_timeout(800)
    shot = page.screenshot(clip=page.evaluate(GRAPH_BOX, 12))
    assert_no_errors_of_ours(page)
    page.close()

    from PIL import Image

    image = Image.open(io.BytesIO(shot)).convert("RGB")
    image = image.resize((THUMBNAIL_WIDTH, round(image.height * THUMBNAIL_WIDTH / image.width)), Image.LANCZOS)
    data = io.BytesIO()
    image.save(data, "JPEG", quality=85, optimize=True, progressive=True)
    assert len(data.getvalue()) < THUMBNAIL_MAX_BYTES, len(data.getvalue())
    folder = h.EXAMPLE_WORKFLOWS if UPDATE_THUMBNAILS else str(tmp_path)
    with open(os.path.join(folder, workflow[: -len(".json")] + ".jpg"), "wb") as f:
        f.write(data.getvalue())
