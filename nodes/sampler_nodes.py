from __future__ import annotations

from ..loaders.attention import AttentionBackend
from ..loaders.errors import ZImageError
from ..loaders.generation import denoise
from ..loaders.sampling import SamplerName
from . import comfy_bridge as bridge
from .comfy_memory import make_room
from .conditioning import from_conditioning


class ZImageSampler:
    """Denoises a LATENT with Z-Image-Turbo."""

    DESCRIPTION = "Samples Z-Image-Turbo. Defaults follow the model card: 9 steps, cfg 1 (no guidance), shift 3."
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The denoised latent; decode it with Z-Image VAE Decode (Lazy) or a native VAE Decode.",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("ZIMAGE_MODEL", {"tooltip": "The model output of Z-Image Sharded Loader."}),
            "positive": ("CONDITIONING", {"tooltip": "What to draw: a Z-Image Text Encode output."}),
            "latent_image": ("LATENT", {"tooltip": "Empty latent (EmptySD3LatentImage) for text-to-image, or an "
                                                   "encoded image with denoise < 1. Its batch size is the number "
                                                   "of images."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True,
                             "tooltip": "Noise seed; the same seed gives the same image as ComfyUI's KSampler."}),
            "steps": ("INT", {"default": 9, "min": 1, "max": 200,
                              "tooltip": "Denoising steps. Turbo is made for 8-9."}),
            "cfg": ("FLOAT", {"default": 1.0, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01,
                              "tooltip": "Classifier-free guidance. 1 = off (Turbo's setting, twice as fast); "
                                         "above 1 also runs the negative prompt."}),
            "shift": ("FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                "tooltip": "Timestep shift of the flow schedule; 3 is the model's own."}),
            "sampler": ([s.value for s in SamplerName], {
                "default": SamplerName.EULER.value,
                "tooltip": "euler: diffusers' flow-matching Euler. res_multistep: ComfyUI's Z-Image template "
                           "(with the simple schedule)."}),
            "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                  "tooltip": "1 = start from pure noise; less keeps that much of the input latent."}),
            "attention": ([b.value for b in AttentionBackend], {
                "default": AttentionBackend.AUTO.value,
                "tooltip": "Attention kernel for this run only. auto picks the fastest measured for your GPU. "
                           "A backend that is not installed is an error that says how to install it. "
                           "cudnn_fp8: attention in fp8 on Hopper GPUs (pip install nvidia-cudnn-frontend); "
                           "pair it with the loader's fp8 matmuls, eager (not with compile)."}),
            "compile": ("BOOLEAN", {
                "default": False,
                "tooltip": "Compile the transformer's repeated blocks with torch.compile (needs a C++ compiler; "
                           "Triton on NVIDIA). The first run compiles (tens of seconds, shown on the node); "
                           "later runs and other resolutions reuse it. Works with streamed blocks."}),
        }, "optional": {
            "negative": ("CONDITIONING", {"tooltip": "What to avoid; used only when cfg > 1. Left empty with "
                                                     "cfg > 1, the empty prompt is the negative."}),
        }}

    def sample(self, model, positive, latent_image, seed, steps, cfg, shift, sampler, denoise, attention,
               compile=False, negative=None):
        if "noise_mask" in latent_image:
            raise ZImageError("inpainting masks are not supported yet", where="sampler input 'latent_image'",
                              found="a latent with a noise_mask (from Set Latent Noise Mask or VAE Encode for "
                                    "Inpainting)", fix="use ComfyUI's KSampler for inpainting, or a latent without "
                                                       "a mask.")
        pos = from_conditioning(positive, "positive")
        neg = from_conditioning(negative, "negative") if negative is not None else None
        samples, report = _denoise(model, pos, neg, latent_image["samples"], seed, steps, cfg, shift, sampler,
                                   denoise, attention, compile)
        out = dict(latent_image)
        out["samples"] = samples
        return {"ui": {"zimage_run": [report.summary()]}, "result": (out,)}


def _denoise(parts, pos, neg, latent, seed, steps, cfg, shift, sampler, denoise_, attention, compile_blocks):
    make_room(parts)
    return denoise(parts, pos, neg, latent, seed, steps, cfg, shift, sampler, denoise_, attention,
                   bridge.step_hooks(steps, parts.runtime.device), compile_blocks=compile_blocks)
