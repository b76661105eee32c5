"""Helpers the tests share (imported by name; conftest.py only holds fixtures)."""
from __future__ import annotations

import gc
import importlib.util
import os
import sys

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


def qwen_tokenizer_dir() -> str | None:
    return SHARED_TOKENIZER if os.path.isfile(os.path.join(SHARED_TOKENIZER, "vocab.json")) else None


def live_tensors() -> int:
    """Tensors holding memory (meta tensors, shapes without data, are not counted)."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta)


def mapped_files() -> set[str]:
    """Files this process has memory-mapped (Linux), to check the loader let go of them."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
