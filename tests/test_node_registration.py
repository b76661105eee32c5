"""The pack as ComfyUI sees it: imported as a package, four nodes, valid INPUT_TYPES schemas."""
from __future__ import annotations

import subprocess
import sys

import pytest

from pack_testing import ROOT

COMFY_WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
NUMBER_KEYS = {"default", "min", "max", "step", "round"}


def test_importing_the_folder_gives_four_nodes_with_display_names(pack):
    assert set(pack.NODE_CLASS_MAPPINGS) == {"ZImageShardedLoader", "ZImageTextEncode", "ZImageSampler",
                                             "ZImageVAEDecodeLazy"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    assert pack.WEB_DIRECTORY == "./web"


def test_every_input_types_is_a_valid_comfyui_schema(pack):
    for name, cls in pack.NODE_CLASS_MAPPINGS.items():
        schema = cls.INPUT_TYPES()
        assert set(schema) <= {"required", "optional", "hidden"} and schema["required"], name
        for section in ("required", "optional"):
            for inp, spec in schema.get(section, {}).items():
                assert isinstance(spec, tuple) and 1 <= len(spec) <= 2, (name, inp)
                kind, opts = spec[0], spec[1]
                assert isinstance(opts, dict) and opts.get("tooltip"), f"{name}.{inp} has no tooltip"
                if isinstance(kind, list):  # a combo
                    assert all(isinstance(c, str) for c in kind)
                    if "default" in opts:
                        assert opts["default"] in kind, (name, inp)
                elif kind in ("INT", "FLOAT"):
                    assert opts["min"] <= opts["default"] <= opts["max"], (name, inp)
                    assert set(opts) - {"tooltip", "control_after_generate"} <= NUMBER_KEYS, (name, inp)
                else:
                    assert isinstance(kind, str) and kind.isupper(), (name, inp)
        assert cls.CATEGORY.startswith("Z-Image"), name
        assert callable(getattr(cls, cls.FUNCTION)), name
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES, name
        assert cls.DESCRIPTION, name


def test_sampler_defaults_follow_the_model_card(pack):
    req = pack.NODE_CLASS_MAPPINGS["ZImageSampler"].INPUT_TYPES()["required"]
    assert req["steps"][1]["default"] == 9 and req["cfg"][1]["default"] == 1.0 and req["shift"][1]["default"] == 3.0
    assert req["sampler"][0] == ["euler", "res_multistep"]
    assert {"auto", "sdpa", "xformers", "flash_attn", "sage", "flex"} <= set(req["attention"][0])
    assert "negative" in pack.NODE_CLASS_MAPPINGS["ZImageSampler"].INPUT_TYPES()["optional"]


def test_importing_the_pack_does_not_import_diffusers_or_transformers():
    """ComfyUI times each pack's import; diffusers alone costs seconds, so it waits for the first run."""
    code = ("import importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('zn', {ROOT + '/__init__.py'!r}, "
            f"submodule_search_locations=[{ROOT!r}]); m = importlib.util.module_from_spec(s); "
            "sys.modules['zn'] = m; s.loader.exec_module(m); "
            "print(sorted(k for k in ('diffusers', 'transformers') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_comfyui_tokenizer_is_found_in_its_namespace_package(pack, tmp_path, monkeypatch):
    """ComfyUI's comfy/ has no __init__.py, so the module has __path__ but no __file__."""
    import types

    from zimage_nodes.nodes import comfy_bridge

    tok = tmp_path / "comfy" / "text_encoders" / "qwen25_tokenizer"
    tok.mkdir(parents=True)
    fake = types.ModuleType("comfy")
    fake.__path__ = [str(tmp_path / "comfy")]
    fake.__file__ = None
    monkeypatch.setitem(__import__("sys").modules, "comfy", fake)
    assert comfy_bridge.comfy_tokenizer_folder() == str(tok)


def test_loader_device_list_reads_names_and_budgets(pack):
    from zimage_nodes.loaders.errors import ZImageError
    from zimage_nodes.nodes.loader_nodes import parse_devices

    assert parse_devices("", 8) == ([], [])
    assert parse_devices("cuda:0, cuda:1", 8) == (["cuda:0", "cuda:1"], [8, 8])
    assert parse_devices("0=12; 1=6.5", 0) == (["cuda:0", "cuda:1"], [12.0, 6.5])
    with pytest.raises(ZImageError, match="cuda:0=12, cuda:1=8"):
        parse_devices("gpu zero=lots", 8)
