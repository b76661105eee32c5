"""Generate a PNG from a prompt on the command line, through the same code the nodes use.

    python -m loaders.generate "a red fox in the snow" --out fox.png \
        --model models/diffusion_models/z_image_turbo_bf16.safetensors \
        --text-encoder models/text_encoders/qwen_3_4b.safetensors --vae models/vae/ae.safetensors

Without --model it runs a tiny built-in demo model with random weights (the picture is noise,
but every loading, sampling and decoding step is the real one).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np
import torch

from .placement import Storage


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loaders.generate", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt")
    ap.add_argument("--out", default="zimage.png")
    ap.add_argument("--model", help="z_image_turbo_bf16.safetensors, or a diffusers Z-Image-Turbo folder")
    ap.add_argument("--text-encoder", help="qwen_3_4b.safetensors (not needed with a diffusers folder)")
    ap.add_argument("--vae", help="ae.safetensors (not needed with a diffusers folder)")
    ap.add_argument("--tokenizer", help="a folder with the Qwen tokenizer (tokenizer.json, or vocab.json + "
                    "merges.txt + tokenizer_config.json), such as ComfyUI's comfy/text_encoders/qwen25_tokenizer")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--height", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cfg", type=float, default=1.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--sampler", default="euler", choices=["euler", "res_multistep"])
    ap.add_argument("--attention", default="auto")
    ap.add_argument("--vram-budget-gb", type=float, default=0.0)
    ap.add_argument("--ram-budget-gb", type=float, default=0.0)
    ap.add_argument("--streamed-weights", default="bf16", choices=[s.value for s in Storage])
    ap.add_argument("--matmul", default="bf16", choices=["bf16", "fp8"], help="fp8: Ada and Hopper GPUs")
    ap.add_argument("--compile", action="store_true", help="compile the transformer's repeated blocks")
    ap.add_argument("--devices", default="", help="several GPUs, e.g. 'cuda:0,cuda:1' (each gets --vram-budget-gb)")
    args = ap.parse_args(argv)

    from .errors import ZImageError
    from .generation import decode, denoise
    from .pipeline_loading import load_parts

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from .tiny_models import write_tiny_models

            print("No --model given: using the tiny built-in DEMO model with random weights. The image will be "
                  "noise; pass --model/--text-encoder/--vae for real pictures.", file=sys.stderr)
            paths = write_tiny_models(tmp)
            model = paths["diffusers"]
            if args.width == 1024 and args.height == 1024:
                args.width = args.height = 256
        try:
            t0 = time.perf_counter()
            devices = [d.strip() for d in args.devices.split(",") if d.strip()]
            parts = load_parts(model, args.text_encoder, args.vae, args.vram_budget_gb,
                               comfy_tokenizer=args.tokenizer, ram_budget_gb=args.ram_budget_gb,
                               storage=args.streamed_weights, matmul=args.matmul, devices=devices or None)
            print(f"loaded in {time.perf_counter() - t0:.1f} s; {parts.runtime.plan.summary()}", file=sys.stderr)
            positive = parts.text_encoder.encode(args.prompt)
            latent = torch.zeros(1, 16, args.height // 8, args.width // 8)
            from tqdm import tqdm

            with tqdm(total=args.steps, desc="sampling", file=sys.stderr) as bar:
                from .sampling import StepHooks

                samples, report = denoise(parts, positive, None, latent, args.seed, args.steps, args.cfg, args.shift,
                                          args.sampler, 1.0, args.attention,
                                          StepHooks(on_step=lambda i, n, x0: bar.update(1)),
                                          compile_blocks=args.compile)
            image = decode(parts.vae, samples)
        except ZImageError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    from PIL import Image

    Image.fromarray((image[0].numpy() * 255).round().astype(np.uint8)).save(args.out)
    print(f"wrote {args.out} ({args.width}x{args.height}, {report.summary()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
