"""Full-size random-weight Z-Image files in ComfyUI's layout (original key names), for benchmarks on
the GPU machine: z_image_turbo_bf16.safetensors (12.3 GB), qwen_3_4b.safetensors (8.0 GB),
ae.safetensors. Random weights cost exactly what the real ones cost."""
from __future__ import annotations

import os
import sys
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Where the benchmarks write results (the device tool's $OUT), keep the weights, find the tokenizer.
OUT = os.environ.get("OUT", "/tmp")
WORK = os.environ.get("WORK", "/tmp/zimage_full")
TOKENIZER = os.environ.get("TOKENIZER", os.path.join(ROOT, ".bench_data", "qwen_tokenizer"))

from loaders import key_names  # noqa: E402
from loaders.model_detection import scaffold_config  # noqa: E402
from loaders.tiny_models import original_transformer_state, original_vae_state  # noqa: E402


def _random_like(state: dict, device: str) -> dict:
    gen = torch.Generator(device).manual_seed(0)
    out = {}
    for name, t in state.items():
        if "pad_token" in name or (t.ndim == 1 and "norm" in name):
            v = torch.ones(t.shape, dtype=torch.bfloat16)
        elif t.ndim >= 2:
            v = (torch.randn(t.shape, generator=gen, device=device, dtype=torch.float32) * 0.02).to(
                torch.bfloat16).cpu()
        else:
            v = torch.zeros(t.shape, dtype=torch.bfloat16)
        out[name] = v
    return out


def write(folder: str, device: str = "cuda", layers: int | None = None,
          text_encoder_layers: int | None = None) -> dict[str, str]:
    """The three files in `folder` (kept if there already). `layers`/`text_encoder_layers`: fewer
    transformer/Qwen3 layers at full width, for smoke runs of ComfyUI's loaders, which recognise
    Z-Image and Qwen3-4B by their widths."""
    from diffusers import AutoencoderKL, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    paths = {"transformer": os.path.join(folder, "z_image_turbo_bf16.safetensors"),
             "text_encoder": os.path.join(folder, "qwen_3_4b.safetensors"),
             "vae": os.path.join(folder, "ae.safetensors")}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    os.makedirs(folder, exist_ok=True)
    t0 = time.perf_counter()
    with torch.device("meta"):
        tr = ZImageTransformer2DModel(**(scaffold_config("transformer") | (
            {"n_layers": layers} if layers else {})))
        te = Qwen3Model(Qwen3Config(**(scaffold_config("text_encoder") | (
            {"num_hidden_layers": text_encoder_layers} if text_encoder_layers else {}))))
    save_file(original_transformer_state(_random_like(tr.state_dict(), device)), paths["transformer"])
    save_file({key_names.TEXT_ENCODER_PREFIX + k: v for k, v in _random_like(te.state_dict(), device).items()},
              paths["text_encoder"])
    torch.manual_seed(0)
    vae = AutoencoderKL(**scaffold_config("vae"))
    save_file(original_vae_state({k: v.contiguous() for k, v in vae.state_dict().items()}, 4), paths["vae"])
    print(f"wrote full-width random files in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else "/tmp/zimage_full"))
