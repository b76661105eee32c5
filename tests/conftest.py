"""Fixtures: the pack imported the way ComfyUI imports a custom-node folder, and tiny random
Z-Image models written once per test run as real files in both layouts."""
from __future__ import annotations

import gc
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_TOKENIZER = os.environ.get("ZIMAGE_QWEN_TOKENIZER",
                                  os.path.join(ROOT, "..", "shared", "data", "qwen_tokenizer"))


def import_pack():
    """Import the repository root as a package, as ComfyUI's custom-node loader does."""
    if "zimage_nodes" in sys.modules:
        return sys.modules["zimage_nodes"]
    spec = importlib.util.spec_from_file_location("zimage_nodes", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    module = importlib.util.module_from_spec(spec)
    sys.modules["zimage_nodes"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def pack():
    return import_pack()


def qwen_tokenizer_dir() -> str | None:
    return SHARED_TOKENIZER if os.path.isfile(os.path.join(SHARED_TOKENIZER, "vocab.json")) else None


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, pack):
    """Paths of the tiny models: 'transformer', 'transformer_fp8', 'text_encoder', 'vae' (ComfyUI
    single files, original key names) and 'diffusers' (a diffusers folder with tokenizer/)."""
    from zimage_nodes.loaders.tiny_models import write_tiny_models

    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")), tokenizer_dir=qwen_tokenizer_dir())


def live_tensors() -> int:
    """Tensors holding memory (meta tensors, shapes without data, are not counted)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta)


def mapped_files() -> set[str]:
    """Files this process has memory-mapped (Linux), to check the loader let go of them."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
