"""The pack inside ComfyUI's own machinery: its model management and its progress bar with latent
previews (opt-in: COMFYUI_DIR points at a ComfyUI checkout, COMFYUI_PYTHON at a Python that runs
it). Runs ComfyUI's real modules in a subprocess on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pack_testing import ROOT

COMFY = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_DIR to a ComfyUI checkout to run this test")

SCRIPT = textwrap.dedent('''
    import dataclasses, importlib.util, sys
    sys.argv = ["main.py", "--cpu", "--preview-method", "latent2rgb"]
    sys.path.insert(0, {comfy!r})
    import torch
    try:  # a CPU torch beside PyPI's torchvision: its C++ ops do not load; their schemas suffice
        import torchvision
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        LIB = torch.library.Library("torchvision", "FRAGMENT")
        for schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
            LIB.define(schema)
        import torchvision
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    spec = importlib.util.spec_from_file_location("zimage_nodes", {root!r} + "/__init__.py",
                                                  submodule_search_locations=[{root!r}])
    pack = importlib.util.module_from_spec(spec); sys.modules["zimage_nodes"] = pack; spec.loader.exec_module(pack)
    from zimage_nodes.loaders.pipeline_loading import load_parts
    from zimage_nodes.loaders.placement import Where
    from zimage_nodes.loaders.generation import denoise
    from zimage_nodes.nodes.comfy_memory import make_room
    parts = load_parts({model!r}, device="cpu", dtype=torch.float32)
    rt = parts.runtime  # a hand-made plan: resident copies even on the CPU, as on a GPU
    rt.plan = dataclasses.replace(rt.plan, blocks=tuple((n, Where.GPU) for n, _ in rt.plan.blocks))
    rt.fixed_plan = True
    make_room(parts)
    denoise(parts, parts.text_encoder.encode("a fox"), None, torch.zeros(1, 16, 4, 4), seed=0, steps=1)
    listed = [type(m.model.model).__name__ for m in mm.current_loaded_models]
    print("listed", listed, "held", parts.transformer._replica is not None)
    make_room(parts)  # a second run finds it already listed: no duplicate
    print("count", sum(type(m.model.model).__name__ == "ZImageTurbo" for m in mm.current_loaded_models))
    mm.unload_all_models()  # what /free with unload_models does
    print("after_free", [type(m.model.model).__name__ for m in mm.current_loaded_models],
          "held", parts.transformer._replica is not None)
    import comfy.utils
    from zimage_nodes.nodes.comfy_bridge import step_hooks
    seen = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: seen.append(
        (value, total, preview[0], preview[1].size) if preview else (value, total, None, None)))
    denoise(parts, parts.text_encoder.encode("a fox"), None, torch.zeros(1, 16, 6, 4), seed=0, steps=3,
            hooks=step_hooks(3, parts.runtime.device))
    print("progress", seen)
''')


def _run(tiny, tmp_path) -> str:
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(comfy=COMFY, root=ROOT, model=tiny["diffusers"]))
    py = os.environ.get("COMFYUI_PYTHON", sys.executable)
    r = subprocess.run([py, str(script)], cwd=COMFY, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_comfyui_free_memory_releases_the_packs_copies(tiny, tmp_path):
    out = _run(tiny, tmp_path)
    assert "listed ['ZImageTurbo'] held True" in out
    assert "count 1" in out
    assert "after_free [] held False" in out


def test_progress_ticks_once_per_step_with_latent_previews(tiny, tmp_path):
    out = _run(tiny, tmp_path)
    # one tick per step, each with a JPEG preview of the 4x6 latent (ComfyUI's Flux latent2rgb)
    assert "progress [(1, 3, 'JPEG', (4, 6)), (2, 3, 'JPEG', (4, 6)), (3, 3, 'JPEG', (4, 6))]" in out
