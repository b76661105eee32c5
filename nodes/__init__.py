"""ComfyUI glue: parse inputs, call `loaders/`, wrap outputs."""
from .decode_nodes import ZImageVAEDecodeLazy
from .loader_nodes import ZImageShardedLoader
from .sampler_nodes import ZImageSampler
from .text_nodes import ZImageTextEncode

NODE_CLASS_MAPPINGS = {
    "ZImageShardedLoader": ZImageShardedLoader,
    "ZImageTextEncode": ZImageTextEncode,
    "ZImageSampler": ZImageSampler,
    "ZImageVAEDecodeLazy": ZImageVAEDecodeLazy,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ZImageShardedLoader": "Z-Image Sharded Loader",
    "ZImageTextEncode": "Z-Image Text Encode",
    "ZImageSampler": "Z-Image Sampler",
    "ZImageVAEDecodeLazy": "Z-Image VAE Decode (Lazy)",
}
