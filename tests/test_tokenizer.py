"""Z-Image's prompt format and token ids, checked against the reference Qwen2 tokenizer."""
from __future__ import annotations

import os

import pytest

from pack_testing import qwen_tokenizer_dir

PROMPTS = ["a red fox in the snow, photograph, 35mm", "", "Ein Fuchs im Schnee 🦊, 雪の中の狐",
           "  leading spaces and\nnew lines\t"]


def test_prompt_is_wrapped_in_the_qwen_chat_turn(pack):
    from zimage_nodes.loaders.tokenizer import format_prompt

    assert format_prompt("a fox") == "<|im_start|>user\na fox<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.skipif(qwen_tokenizer_dir() is None,
                    reason="no reference Qwen tokenizer (set ZIMAGE_QWEN_TOKENIZER or provide ../shared/data)")
def test_token_ids_equal_the_reference_qwen2_tokenizer(pack):
    from transformers import Qwen2Tokenizer

    from zimage_nodes.loaders.tokenizer import load_tokenizer, token_ids

    folder = qwen_tokenizer_dir()
    ref = Qwen2Tokenizer.from_pretrained(folder)  # the slow reference implementation
    ours = load_tokenizer(folder)
    for p in PROMPTS:
        text = f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n"
        expected = ref(text, add_special_tokens=False)["input_ids"]
        assert token_ids(ours, p) == expected
    ids = token_ids(ours, "a fox")
    assert ids[:3] == [151644, 872, 198]  # <|im_start|> user \n
    assert ids[-5:] == [151645, 198, 151644, 77091, 198]  # <|im_end|> \n <|im_start|> assistant \n


@pytest.mark.skipif(qwen_tokenizer_dir() is None, reason="no reference Qwen tokenizer")
def test_long_prompts_are_cut_at_512_tokens(pack):
    from zimage_nodes.loaders.tokenizer import load_tokenizer, token_ids

    assert len(token_ids(load_tokenizer(qwen_tokenizer_dir()), "fox " * 2000)) == 512


def test_tokenizer_is_found_in_comfyui_first_then_the_diffusers_folder(tiny, tmp_path, pack):
    from zimage_nodes.loaders.tokenizer import tokenizer_folder

    d = tiny["diffusers"]
    assert tokenizer_folder(d) == os.path.join(d, "tokenizer")
    comfy = tmp_path / "qwen25_tokenizer"
    comfy.mkdir()
    (comfy / "vocab.json").write_text("{}")
    assert tokenizer_folder(d, str(comfy)) == str(comfy)
    assert tokenizer_folder(tiny["transformer"]) is None  # a single file: the model hub
