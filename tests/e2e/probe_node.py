"""A test-only ComfyUI custom node (copied into the e2e base folder's custom_nodes, never shipped):
reports an IMAGE's shape, whether every value is finite, and its range, as the run's UI output,
so a test can read them from /history."""
import torch


class ZImageE2EImageProbe:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "probe"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}

    def probe(self, images):
        x = images.float()
        stats = {"shape": list(x.shape), "dtype": str(images.dtype), "finite": bool(torch.isfinite(x).all()),
                 "min": float(x.nan_to_num().min()), "max": float(x.nan_to_num().max()),
                 "std": float(x.nan_to_num().std())}
        return {"ui": {"probe": [stats]}}


NODE_CLASS_MAPPINGS = {"ZImageE2EImageProbe": ZImageE2EImageProbe}
