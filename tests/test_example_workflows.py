"""The workflows in example_workflows/ (offered as templates in ComfyUI's UI) must open and queue
against the nodes as they are declared now: known node types, links whose types match both ends,
and widget values that line up with each node's inputs and lie within their ranges."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / "example_workflows").glob("*.json"))

# Types that arrive through a link, never through a widget.
CONNECTION_TYPES = {"ZIMAGE_MODEL", "ZIMAGE_TEXT_ENCODER", "ZIMAGE_VAE", "CONDITIONING", "LATENT", "IMAGE", "VAE",
                    "MASK"}
# Values ComfyUI's frontend stores for the extra widget that follows a seed.
CONTROL_AFTER_GENERATE = {"fixed", "increment", "decrement", "randomize"}
# Loader inputs whose choices are the files in the user's model folders: empty outside ComfyUI.
MODEL_FILE_INPUTS = {("ZImageShardedLoader", "model"), ("ZImageShardedLoader", "text_encoder"),
                     ("ZImageShardedLoader", "vae")}

# The native ComfyUI nodes the examples may use, as ComfyUI declares them to the frontend:
# connection inputs by name, output types by slot, and how many widget values they store (LoadImage's
# second value is its "upload" button). tests/e2e checks these against a real ComfyUI's /object_info.
NATIVE_NODES = {
    "EmptySD3LatentImage": {"inputs": {}, "outputs": ["LATENT"], "widgets": 3},
    "EmptyLatentImage": {"inputs": {}, "outputs": ["LATENT"], "widgets": 3},
    "SaveImage": {"inputs": {"images": "IMAGE"}, "outputs": [], "widgets": 1},
    "VAEDecode": {"inputs": {"samples": "LATENT", "vae": "VAE"}, "outputs": ["IMAGE"], "widgets": 0},
    "VAEEncode": {"inputs": {"pixels": "IMAGE", "vae": "VAE"}, "outputs": ["LATENT"], "widgets": 0},
    "VAELoader": {"inputs": {}, "outputs": ["VAE"], "widgets": 1},
    "LoadImage": {"inputs": {}, "outputs": ["IMAGE", "MASK"], "widgets": 2},
}
# The picture ComfyUI's template browser shows for a custom node's workflow: the same name with .jpg
# (the frontend asks for /api/workflow_templates/<pack>/<name>.jpg).
THUMBNAIL_SUFFIX = ".jpg"
THUMBNAIL_MAX_BYTES = 150_000


@pytest.fixture(scope="module")
def mappings(pack) -> dict:
    return pack.NODE_CLASS_MAPPINGS


def _load(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _inputs(cls) -> list[tuple[str, object, dict]]:
    """(name, type or combo list, options) of every input, required first, in declaration order."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, decl in spec.get(section, {}).items():
            out.append((name, decl[0], decl[1] if len(decl) > 1 else {}))
    return out


def _is_connection(kind) -> bool:
    return isinstance(kind, str) and kind in CONNECTION_TYPES


def _declared(node_type: str, mappings: dict) -> tuple[dict[str, str], list[str]]:
    """({connection input name: type}, [output type by slot]) for a node type."""
    if node_type in mappings:
        cls = mappings[node_type]
        inputs = {name: kind for name, kind, _ in _inputs(cls) if _is_connection(kind)}
        return inputs, list(cls.RETURN_TYPES)
    native = NATIVE_NODES[node_type]
    return native["inputs"], native["outputs"]


def _ids(workflows: list[Path]) -> list[str]:
    return [p.name for p in workflows]


def test_the_pack_ships_example_workflows():
    names = {p.name for p in WORKFLOWS}
    assert {"zimage_text_to_image.json", "zimage_low_vram_6gb.json", "zimage_native_nodes.json",
            "zimage_img2img.json"} <= names


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_every_workflow_has_a_small_jpeg_thumbnail(path):
    thumb = path.with_suffix(THUMBNAIL_SUFFIX)
    assert thumb.is_file(), f"{path.name}: no thumbnail {thumb.name} beside it (the template browser shows a blank)"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", f"{thumb.name} is not a JPEG"
    assert len(data) < THUMBNAIL_MAX_BYTES, f"{thumb.name} is {len(data)} bytes, keep it under {THUMBNAIL_MAX_BYTES}"
    image = pytest.importorskip("PIL.Image", reason="Pillow reads the thumbnail's size").open(thumb)
    assert 256 <= image.width <= 1024 and image.height >= 128, f"{thumb.name} is {image.size}"


def test_no_thumbnail_without_its_workflow():
    root = ROOT / "example_workflows"
    orphans = sorted(p.name for p in root.iterdir() if p.suffix != ".json" and not p.with_suffix(".json").exists())
    assert not orphans, f"files in example_workflows/ with no workflow of the same name: {orphans}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_is_a_ui_format_graph_with_unique_ids(path):
    wf = _load(path)
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        assert key in wf, f"{path.name}: top-level key {key!r} is missing"
    node_ids = [n["id"] for n in wf["nodes"]]
    link_ids = [link[0] for link in wf["links"]]
    assert len(node_ids) == len(set(node_ids)), f"{path.name}: duplicate node ids {node_ids}"
    assert len(link_ids) == len(set(link_ids)), f"{path.name}: duplicate link ids {link_ids}"
    assert wf["last_node_id"] >= max(node_ids), f"{path.name}: last_node_id is below the largest node id"
    assert wf["last_link_id"] >= max(link_ids, default=0), f"{path.name}: last_link_id is below the largest link id"
    for node in wf["nodes"]:
        for key in ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                    "widgets_values"):
            assert key in node, f"{path.name}: node {node.get('id')} has no {key!r}"
        assert node["properties"].get("Node name for S&R") == node["type"]


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_workflow_uses_only_our_nodes_and_known_native_nodes(path, mappings):
    known = set(mappings) | set(NATIVE_NODES)
    unknown = sorted({n["type"] for n in _load(path)["nodes"]} - known)
    assert not unknown, f"{path.name}: node types {unknown} are neither ours ({sorted(mappings)}) nor known native ones"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_every_link_joins_a_declared_output_to_a_declared_input_of_the_same_type(path, mappings):
    wf = _load(path)
    nodes = {n["id"]: n for n in wf["nodes"]}
    for link_id, src_id, src_slot, dst_id, dst_slot, kind in wf["links"]:
        where = f"{path.name}: link {link_id}"
        assert src_id in nodes and dst_id in nodes, f"{where} joins a node that does not exist"
        src, dst = nodes[src_id], nodes[dst_id]

        out = src["outputs"][src_slot]
        assert out["type"] == kind, f"{where}: output {out['name']!r} of {src['type']} is {out['type']}, link is {kind}"
        assert link_id in (out["links"] or []), f"{where} is not listed on output {out['name']!r} of {src['type']}"
        declared_outputs = _declared(src["type"], mappings)[1]
        assert declared_outputs[src_slot] == kind, \
            f"{where}: {src['type']} declares output {src_slot} as {declared_outputs[src_slot]}, not {kind}"

        inp = dst["inputs"][dst_slot]
        assert inp["type"] == kind, f"{where}: input {inp['name']!r} of {dst['type']} is {inp['type']}, link is {kind}"
        assert inp["link"] == link_id, f"{where}: input {inp['name']!r} of {dst['type']} names link {inp['link']}"
        declared_inputs = _declared(dst["type"], mappings)[0]
        assert declared_inputs.get(inp["name"]) == kind, \
            f"{where}: {dst['type']} declares input {inp['name']!r} as {declared_inputs.get(inp['name'])}, not {kind}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_node_slots_name_only_links_that_exist(path, mappings):
    wf = _load(path)
    link_ids = {link[0] for link in wf["links"]}
    for node in wf["nodes"]:
        declared_inputs, declared_outputs = _declared(node["type"], mappings)
        for inp in node["inputs"]:
            assert inp["name"] in declared_inputs, f"{path.name}: {node['type']} has no input {inp['name']!r}"
            assert inp["link"] is None or inp["link"] in link_ids, \
                f"{path.name}: {node['type']} input {inp['name']!r} names missing link {inp['link']}"
        assert len(node["outputs"]) <= len(declared_outputs), f"{path.name}: {node['type']} has too many outputs"
        for out in node["outputs"]:
            for link in out["links"] or []:
                assert link in link_ids, f"{path.name}: {node['type']} output {out['name']!r} names missing link {link}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_every_required_connection_of_our_nodes_is_linked(path, mappings):
    # ComfyUI refuses to queue a prompt whose required input has nothing connected.
    for node in _load(path)["nodes"]:
        if node["type"] not in mappings:
            continue
        required = mappings[node["type"]].INPUT_TYPES()["required"]
        linked = {i["name"] for i in node["inputs"] if i["link"] is not None}
        missing = [name for name, decl in required.items() if _is_connection(decl[0]) and name not in linked]
        assert not missing, f"{path.name}: {node['type']} (node {node['id']}) has nothing connected to {missing}"


def _check_widget(node_type: str, name: str, kind, options: dict, value, where: str) -> None:
    if isinstance(kind, list):
        if (node_type, name) in MODEL_FILE_INPUTS and value not in kind:
            # The choices are the user's own files; outside ComfyUI the list is (nearly) empty.
            assert isinstance(value, str) and value.endswith(".safetensors"), \
                f"{where}: {value!r} is not a .safetensors model file name"
        else:
            assert value in kind, f"{where}: {value!r} is not one of {kind}"
    elif kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
    elif kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), f"{where}: {value!r} is not a number"
    elif kind == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not true/false"
    else:
        pytest.fail(f"{where}: widget type {kind!r} is not handled by this test")
    if kind in ("INT", "FLOAT"):
        assert options.get("min", value) <= value <= options.get("max", value), \
            f"{where}: {value} is outside [{options.get('min')}, {options.get('max')}]"


@pytest.mark.parametrize("path", WORKFLOWS, ids=_ids(WORKFLOWS))
def test_widget_values_line_up_with_the_nodes_inputs_and_are_allowed(path, mappings):
    for node in _load(path)["nodes"]:
        values = list(node["widgets_values"])
        if node["type"] not in mappings:
            expected = NATIVE_NODES[node["type"]]["widgets"]
            assert len(values) == expected, f"{path.name}: {node['type']} stores {len(values)} widget values, " \
                                            f"expected {expected}"
            continue
        widgets = [(name, kind, opts) for name, kind, opts in _inputs(mappings[node["type"]])
                   if not _is_connection(kind)]
        expected = len(widgets) + sum(1 for _, kind, opts in widgets
                                      if kind == "INT" and opts.get("control_after_generate"))
        assert len(values) == expected, \
            f"{path.name}: {node['type']} stores {len(values)} widget values {values}, its inputs need {expected} " \
            f"({[name for name, _, _ in widgets]})"
        it = iter(values)
        for name, kind, opts in widgets:
            where = f"{path.name}: {node['type']} input {name!r}"
            _check_widget(node["type"], name, kind, opts, next(it), where)
            if kind == "INT" and opts.get("control_after_generate"):
                control = next(it)
                assert control in CONTROL_AFTER_GENERATE, f"{where}: control_after_generate {control!r}"


def _widgets_by_name(node: dict, mappings: dict) -> dict:
    values, out = iter(node["widgets_values"]), {}
    for name, kind, opts in _inputs(mappings[node["type"]]):
        if _is_connection(kind):
            continue
        out[name] = next(values)
        if kind == "INT" and opts.get("control_after_generate"):
            out[name + ".control_after_generate"] = next(values)
    return out


def _only(wf: dict, node_type: str) -> dict:
    found = [n for n in wf["nodes"] if n["type"] == node_type]
    assert len(found) == 1, f"expected one {node_type}, found {len(found)}"
    return found[0]


def test_text_to_image_example_uses_turbo_settings_and_automatic_budget(mappings):
    wf = _load(ROOT / "example_workflows" / "zimage_text_to_image.json")
    sampler = _widgets_by_name(_only(wf, "ZImageSampler"), mappings)
    assert (sampler["steps"], sampler["cfg"], sampler["shift"], sampler["sampler"], sampler["denoise"]) == \
        (9, 1.0, 3.0, "euler", 1.0)
    assert _widgets_by_name(_only(wf, "ZImageShardedLoader"), mappings)["vram_budget_gb"] == 0
    assert _only(wf, "EmptySD3LatentImage")["widgets_values"] == [1024, 1024, 1]


def test_low_vram_example_differs_from_text_to_image_only_in_the_budget(mappings):
    base = _load(ROOT / "example_workflows" / "zimage_text_to_image.json")
    low = _load(ROOT / "example_workflows" / "zimage_low_vram_6gb.json")
    assert _widgets_by_name(_only(low, "ZImageShardedLoader"), mappings)["vram_budget_gb"] == 6
    assert low["links"] == base["links"]
    assert [n["type"] for n in low["nodes"]] == [n["type"] for n in base["nodes"]]
    assert not any(n["type"] in ("Note", "MarkdownNote") for n in low["nodes"])


def _links_into(wf: dict, node: dict) -> dict[str, dict]:
    """{input name: the node its link comes from} for one node."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    sources = {link[0]: nodes[link[1]] for link in wf["links"]}
    return {i["name"]: sources[i["link"]] for i in node["inputs"] if i["link"] is not None}


def test_native_nodes_example_decodes_with_the_native_vae(mappings):
    wf = _load(ROOT / "example_workflows" / "zimage_native_nodes.json")
    assert sorted(n["type"] for n in wf["nodes"]) == sorted(
        ["ZImageShardedLoader", "ZImageTextEncode", "ZImageSampler", "EmptySD3LatentImage", "VAELoader", "VAEDecode",
         "SaveImage"])
    sampler = _only(wf, "ZImageSampler")
    assert _widgets_by_name(sampler, mappings)["denoise"] == 1.0
    assert _links_into(wf, sampler)["latent_image"]["type"] == "EmptySD3LatentImage"
    assert _only(wf, "EmptySD3LatentImage")["widgets_values"] == [1024, 1024, 1]
    assert _only(wf, "VAELoader")["widgets_values"] == ["ae.safetensors"]
    decode = _links_into(wf, _only(wf, "VAEDecode"))
    assert (decode["samples"]["type"], decode["vae"]["type"]) == ("ZImageSampler", "VAELoader")
    assert _links_into(wf, _only(wf, "SaveImage"))["images"]["type"] == "VAEDecode"


def test_img2img_example_encodes_an_input_image_and_denoises_part_way(mappings):
    wf = _load(ROOT / "example_workflows" / "zimage_img2img.json")
    assert sorted(n["type"] for n in wf["nodes"]) == sorted(
        ["ZImageShardedLoader", "ZImageTextEncode", "ZImageSampler", "LoadImage", "VAELoader", "VAEEncode",
         "ZImageVAEDecodeLazy", "SaveImage"])
    assert _only(wf, "LoadImage")["widgets_values"] == ["example.png", "image"]  # ComfyUI's own input/example.png
    assert _only(wf, "VAELoader")["widgets_values"] == ["ae.safetensors"]
    encode = _links_into(wf, _only(wf, "VAEEncode"))
    assert (encode["pixels"]["type"], encode["vae"]["type"]) == ("LoadImage", "VAELoader")
    sampler = _only(wf, "ZImageSampler")
    settings = _widgets_by_name(sampler, mappings)
    assert (settings["steps"], settings["cfg"], settings["denoise"]) == (9, 1.0, 0.6)
    assert _links_into(wf, sampler)["latent_image"]["type"] == "VAEEncode"
    decode = _links_into(wf, _only(wf, "ZImageVAEDecodeLazy"))
    assert (decode["samples"]["type"], decode["vae"]["type"]) == ("ZImageSampler", "ZImageShardedLoader")
