"""Z-Image's prompt format and where its Qwen2 BPE tokenizer comes from."""
from __future__ import annotations

import functools
import os

from .errors import ZImageError

# comfy/text_encoders/z_image.py; diffusers reaches the same string through Qwen3's chat
# template with enable_thinking=True.
PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 512  # the diffusers pipeline's max_sequence_length
HUB_REPO = "Tongyi-MAI/Z-Image-Turbo"


def format_prompt(prompt: str) -> str:
    return PROMPT_TEMPLATE.format(prompt)


def tokenizer_folder(model_path: str | None, comfy_folder: str | None = None) -> str | None:
    """ComfyUI's own copy first, then a diffusers folder's `tokenizer/`; None means the hub."""
    candidates = [comfy_folder]
    if model_path and os.path.isdir(model_path):
        candidates.append(os.path.join(model_path, "tokenizer"))
        candidates.append(os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer"))
    for c in candidates:
        if c and os.path.isdir(c) and any(
                os.path.exists(os.path.join(c, f)) for f in ("tokenizer.json", "vocab.json")):
            return c
    return None


@functools.lru_cache(maxsize=4)
def load_tokenizer(folder: str | None):
    """A transformers tokenizer from `folder`, or from the model hub when it is None. Kept for the
    next load of the same folder (encoding leaves a tokenizer unchanged; loading one takes ~0.5 s)."""
    from transformers import AutoTokenizer

    try:
        if folder is None:
            try:  # the local hub cache first: offline machines should not wait for retries
                return AutoTokenizer.from_pretrained(HUB_REPO, subfolder="tokenizer", local_files_only=True)
            except OSError:
                return AutoTokenizer.from_pretrained(HUB_REPO, subfolder="tokenizer")
        # tokenizer_config.json declares the chat special tokens (<|im_start|> ...); without it
        # they would be split into characters.
        if not any(os.path.exists(os.path.join(folder, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
            raise OSError("tokenizer.json or tokenizer_config.json is missing beside vocab.json")
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise ZImageError("the Qwen tokenizer could not be loaded",
                          where=folder or f"the model hub ({HUB_REPO})", found=str(e).splitlines()[0][:200],
                          fix="run inside ComfyUI (it ships the tokenizer), load a diffusers model folder "
                              "with its tokenizer/ subfolder, or connect to the internet once so the "
                              "hub copy is cached.") from None


def token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the formatted prompt, truncated to the pipeline's 512."""
    ids = tokenizer(format_prompt(prompt), add_special_tokens=False, truncation=True,
                    max_length=MAX_TOKENS)["input_ids"]
    return list(ids)
