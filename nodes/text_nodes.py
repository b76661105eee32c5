from __future__ import annotations

from .conditioning import to_conditioning


class ZImageTextEncode:
    """Prompt -> CONDITIONING with Z-Image's Qwen3-4B text encoder."""

    DESCRIPTION = "Encodes a prompt with Z-Image's Qwen3-4B text encoder. An unchanged prompt is not encoded again."
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("The prompt's features; connect to Z-Image Sampler (positive or negative).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "text_encoder": ("ZIMAGE_TEXT_ENCODER", {"tooltip": "The text_encoder output of Z-Image Sharded Loader."}),
            "prompt": ("STRING", {"multiline": True, "dynamicPrompts": True, "default": "",
                                  "tooltip": "What to draw. Z-Image follows long, detailed prompts well; "
                                             "an empty prompt is allowed."}),
        }}

    def encode(self, text_encoder, prompt):
        return (to_conditioning(text_encoder.encode(prompt)),)
