"""Z-Image-Turbo loading, placement and sampling: plain torch/diffusers code, no ComfyUI.

Heavy libraries (diffusers, transformers) are imported by the functions that need them, so
importing this package stays cheap inside ComfyUI's start-up.
"""
