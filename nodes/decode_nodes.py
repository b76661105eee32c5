from __future__ import annotations

from ..loaders.generation import decode


class ZImageVAEDecodeLazy:
    """Decodes a LATENT with the Flux VAE, which stays off the GPU until the first decode."""

    DESCRIPTION = ("Decodes a Z-Image (Flux VAE) latent. The VAE waits in system RAM until the first decode; "
                   "when the loader's plan swaps it, it is also freed right after each decode.")
    CATEGORY = "Z-Image"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The decoded images.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "vae": ("ZIMAGE_VAE", {"tooltip": "The vae output of Z-Image Sharded Loader."}),
            "samples": ("LATENT", {"tooltip": "A latent from Z-Image Sampler or any Flux-VAE latent."}),
        }}

    def decode(self, vae, samples):
        return (decode(vae, samples["samples"]),)
