"""Fixtures: the pack imported the way ComfyUI imports a custom-node folder, and tiny random
Z-Image models written once per test run as real files in both layouts."""
from __future__ import annotations

import pytest

from pack_testing import import_pack, qwen_tokenizer_dir


@pytest.fixture(scope="session")
def pack():
    return import_pack()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, pack):
    """Paths of the tiny models: 'transformer', 'transformer_fp8', 'text_encoder', 'vae' (ComfyUI
    single files, original key names) and 'diffusers' (a diffusers folder with tokenizer/)."""
    from zimage_nodes.loaders.tiny_models import write_tiny_models

    return write_tiny_models(str(tmp_path_factory.mktemp("tiny")), tokenizer_dir=qwen_tokenizer_dir())
