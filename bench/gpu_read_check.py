"""On a GPU: the same latents whether weights reach the device through the file readers
(loaders/file_reads: resident blocks and mapped streaming through the pinned ring, pinned copies
read by threads) or out of the file mapping, for every placement. Tiny random models, bf16 files.

    python bench/gpu_read_check.py      # env: OUT (results folder), TOKENIZER; exits 1 on a mismatch
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from full_size_files import OUT, TOKENIZER  # noqa: E402  (also puts the repo on sys.path)

from loaders import device_copy, file_reads, streaming  # noqa: E402
from loaders.generation import denoise  # noqa: E402
from loaders.host_cache import HOST_CACHE  # noqa: E402
from loaders.pipeline_loading import load_parts  # noqa: E402
from loaders.placement import Where  # noqa: E402
from loaders.tiny_models import write_tiny_models  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def run(paths, blocks: str, te_host: str) -> torch.Tensor:
    parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], device=DEVICE,
                       comfy_tokenizer=TOKENIZER)
    rt = parts.runtime
    names = [n for n, _ in rt.plan.blocks]
    where = [Where.GPU if blocks == "gpu" else Where(blocks)] * len(names)
    rt.plan = dataclasses.replace(rt.plan, blocks=tuple(zip(names, where)), text_encoder="streamed",
                                  text_encoder_host=Where(te_host))
    rt.fixed_plan = True
    pos = parts.text_encoder.encode("a red fox")
    out, _ = denoise(parts, pos, None, torch.zeros(1, 16, 8, 8), seed=3, steps=3)
    parts.release()
    HOST_CACHE.clear()  # each run builds its own host copies
    return out.float().cpu()


def fused_dequantize_check() -> bool:
    """The fp8 storage's fused dequantisation (compiled on a GPU) gives the eager bits."""
    from loaders.fp8_matmul import _dequantize, dequantize_into, fp8_quantize

    shapes = ((3840, 3840), (10240, 3840), (64, 48))  # several shapes in one call
    w8s, scales = zip(*(fp8_quantize(torch.randn(shape, device=DEVICE)) for shape in shapes))
    a = [torch.empty(shape, dtype=torch.bfloat16, device=DEVICE) for shape in shapes]
    b = [torch.empty(shape, dtype=torch.bfloat16, device=DEVICE) for shape in shapes]
    dequantize_into(list(w8s), list(scales), a)
    _dequantize(list(w8s), list(scales), b)
    return all(bool(torch.equal(x, y)) for x, y in zip(a, b))


def main():
    root = tempfile.mkdtemp()
    tiny = write_tiny_models(root, tokenizer_dir=TOKENIZER)
    paths = {k: tiny[k] for k in ("transformer", "text_encoder", "vae")}  # ComfyUI single files, bf16
    cases = [("gpu", "mapped"), ("pinned", "pinned"), ("mapped", "mapped")]
    with_readers = {c: run(paths, *c) for c in cases}
    real = file_reads.file_range
    for mod in (device_copy, streaming):
        mod.file_range = lambda t: None  # every byte out of the mapping, as before the readers
    without = {c: run(paths, *c) for c in cases}
    for mod in (device_copy, streaming):
        mod.file_range = real
    ref = without[cases[0]]
    res = {f"{b}/{te}": {"readers_equal_mapping": bool(torch.equal(with_readers[(b, te)], without[(b, te)])),
                         "equal_to_resident": bool(torch.equal(with_readers[(b, te)], ref))}
           for b, te in cases}
    res["fused_fp8_dequantize_equals_eager"] = fused_dequantize_check()
    res["gpu"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test)"
    print(json.dumps(res, indent=1))
    with open(os.path.join(OUT, "gpu_read_check.json"), "w") as f:
        json.dump(res, f, indent=1)
    sys.exit(0 if all(v["readers_equal_mapping"] for v in res.values() if isinstance(v, dict))
             and res["fused_fp8_dequantize_equals_eager"] else 1)


if __name__ == "__main__":
    main()
