from __future__ import annotations

import torch

from ..loaders.errors import ZImageError
from ..loaders.pipeline_loading import load_parts
from ..loaders.placement import Matmul, Storage
from . import comfy_bridge as bridge


class ZImageShardedLoader:
    """Loads Z-Image-Turbo's transformer, text encoder and VAE and plans them for a VRAM budget."""

    DESCRIPTION = ("Loads Z-Image-Turbo and plans where each part lives for your VRAM budget. Weights are "
                   "memory-mapped and copied to the GPU only when a step needs them.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("ZIMAGE_MODEL", "ZIMAGE_TEXT_ENCODER", "ZIMAGE_VAE")
    RETURN_NAMES = ("model", "text_encoder", "vae")
    OUTPUT_TOOLTIPS = ("Connect to Z-Image Sampler.", "Connect to Z-Image Text Encode.",
                       "Connect to Z-Image VAE Decode (Lazy).")
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (bridge.diffusers_folders() + bridge.filenames("diffusion_models"), {
                "tooltip": "The Z-Image-Turbo transformer: z_image_turbo_bf16.safetensors (or an fp8_e4m3fn "
                           "variant) from models/diffusion_models, or a diffusers folder from models/diffusers."}),
            "text_encoder": ([bridge.FROM_MODEL_FOLDER] + bridge.filenames("text_encoders"), {
                "tooltip": "Qwen3-4B text encoder: qwen_3_4b.safetensors from models/text_encoders. "
                           "'(from model folder)' takes it from a diffusers folder."}),
            "vae": ([bridge.FROM_MODEL_FOLDER] + bridge.filenames("vae"), {
                "tooltip": "The Flux VAE: ae.safetensors from models/vae. "
                           "'(from model folder)' takes it from a diffusers folder."}),
            "vram_budget_gb": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 1024.0, "step": 0.5,
                "tooltip": "VRAM the model may use, in GB, as nvidia-smi counts it. 0 = all free VRAM "
                           "minus 1 GB. Transformer blocks that do not fit are streamed from system RAM "
                           "each step, hidden behind the compute of the resident ones."}),
            "ram_budget_gb": ("FLOAT", {
                "default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5,
                "tooltip": "System RAM the streamed weights may pin, in GB. 0 = 3/4 of the RAM free now. "
                           "Blocks beyond it stream straight from the model file (slower)."}),
            "streamed_weights": ([s.value for s in Storage], {
                "default": Storage.BF16.value,
                "tooltip": "How streamed blocks are kept: bf16 (exact), packed (exact too: bf16 in 12 bits a "
                           "weight, 3/4 of the bytes to copy and of the pinned RAM; the load reads the weights "
                           "once more to size them) or fp8 (half the bytes to copy, faster on small GPUs, a "
                           "small quality cost). Resident blocks stay bf16."}),
            "matmul": ([m.value for m in Matmul], {
                "default": Matmul.BF16.value,
                "tooltip": "bf16: exact. fp8 (Ada and Hopper GPUs: RTX 40xx/50xx, L4, L40, H100): the blocks' "
                           "linear layers keep fp8 weights and multiply in fp8. Half the weight memory and "
                           "bytes streamed, about 1/4 faster on an H100, a small quality cost (about 39 dB PSNR)."}),
            "devices": ("STRING", {
                "default": "",
                "tooltip": "Several GPUs: e.g. 'cuda:0, cuda:1' (each gets vram_budget_gb) or 'cuda:0=12, cuda:1=8' "
                           "(GB each). The transformer's blocks are split over them, the text encoder and VAE run "
                           "on the last. Empty: ComfyUI's GPU."}),
        }}

    def load(self, model, text_encoder, vae, vram_budget_gb, ram_budget_gb, streamed_weights, matmul="bf16",
             devices=""):
        devs, budgets = parse_devices(devices, vram_budget_gb)
        parts = load_parts(bridge.resolve("diffusion_models", model, "model"),
                           bridge.resolve("text_encoders", text_encoder, "text_encoder"),
                           bridge.resolve("vae", vae, "vae"), vram_budget_gb,
                           device=devs[0] if len(devs) == 1 else None,
                           comfy_tokenizer=bridge.comfy_tokenizer_folder(), ram_budget_gb=ram_budget_gb,
                           storage=streamed_weights, matmul=matmul, devices=devs, vram_budgets_gb=budgets)
        plan = parts.runtime.plan.summary()
        return {"ui": {"zimage_plan": [plan]}, "result": (parts, parts.text_encoder, parts.vae)}


def parse_devices(text: str, default_budget_gb: float) -> tuple[list[str], list[float]]:
    """'cuda:0=12, cuda:1' -> (['cuda:0', 'cuda:1'], [12.0, default]); '' -> ([], [])."""
    devices, budgets = [], []
    for item in filter(None, (part.strip() for part in text.replace(";", ",").split(","))):
        name, _, budget = item.partition("=")
        name = name.strip()
        if name.isdigit():
            name = f"cuda:{name}"
        try:
            torch.device(name)
            gb = float(budget) if budget.strip() else default_budget_gb
        except (RuntimeError, ValueError):
            raise ZImageError("the device list cannot be read", where="loader input 'devices'", found=repr(text),
                              expected="GPUs separated by commas, each optionally with its budget in GB",
                              fix="write e.g. 'cuda:0, cuda:1' or 'cuda:0=12, cuda:1=8', or leave it empty for "
                                  "one GPU.") from None
        devices.append(name)
        budgets.append(gb)
    return devices, budgets
