"""Everything the nodes need from ComfyUI, in one place, imported only when a node runs.

Outside ComfyUI (the tests, scripts) model inputs may be absolute paths, progress goes to a
terminal bar and there is no interrupt button.
"""
from __future__ import annotations

import os

from ..loaders.errors import ZImageError
from ..loaders.sampling import StepHooks

FROM_MODEL_FOLDER = "(from model folder)"


def _folder_paths():
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def diffusers_folders() -> list[str]:
    fp = _folder_paths()
    if fp is None or "diffusers" not in fp.folder_names_and_paths:
        return []
    found = []
    for base in fp.get_folder_paths("diffusers"):
        if os.path.isdir(base):
            found += [n for n in sorted(os.listdir(base))
                      if os.path.isfile(os.path.join(base, n, "model_index.json"))
                      and os.path.isdir(os.path.join(base, n, "transformer"))]
    return found


def filenames(kind: str) -> list[str]:
    fp = _folder_paths()
    return [] if fp is None else [n for n in fp.get_filename_list(kind) if n.endswith((".safetensors", ".sft"))]


def resolve(kind: str, name: str, input_name: str) -> str | None:
    """A model input's value -> a path on disk (None for 'from model folder')."""
    if name == FROM_MODEL_FOLDER:
        return None
    if os.path.isabs(name) and os.path.exists(name):
        return name
    fp = _folder_paths()
    if fp is not None:
        if kind == "diffusion_models" and "diffusers" in fp.folder_names_and_paths:
            for base in fp.get_folder_paths("diffusers"):
                if os.path.isdir(os.path.join(base, name)):
                    return os.path.join(base, name)
        path = fp.get_full_path(kind, name)
        if path is not None:
            return path
    raise ZImageError(f"the {input_name} file was not found", where=f"loader input '{input_name}' = {name!r}",
                      expected=f"a file in ComfyUI's models/{kind} folder (or extra_model_paths.yaml locations)",
                      found="no such file", fix=f"put the file in models/{kind} (or a folder extra_model_paths.yaml "
                                                     "lists for it) and press R to refresh the list.")


def comfy_tokenizer_folder() -> str | None:
    """ComfyUI's own copy of the Qwen tokenizer, when running inside ComfyUI."""
    try:
        import comfy
    except ImportError:
        return None
    # ComfyUI's comfy/ has no __init__.py: a namespace package, whose __file__ is None.
    for base in getattr(comfy, "__path__", None) or []:
        folder = os.path.join(base, "text_encoders", "qwen25_tokenizer")
        if os.path.isdir(folder):
            return folder
    return None


def step_hooks(steps: int, device) -> StepHooks:
    """ComfyUI's progress bar, latent previews (as the user set them: none, latent2rgb or TAESD)
    and interrupt button; a terminal bar outside ComfyUI."""
    try:
        import comfy.model_management
        import comfy.utils
    except ImportError:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="Z-Image sampling")

        def tick(i: int, n: int, x0) -> None:
            bar.update(1)
            if i + 1 == n:
                bar.close()
        return StepHooks(on_step=tick)
    import comfy.latent_formats
    import latent_preview

    pbar = comfy.utils.ProgressBar(steps)
    # Z-Image's latents are the Flux VAE's: ComfyUI's own Flux previewer reads them.
    previewer = latent_preview.get_previewer(device, comfy.latent_formats.Flux())

    def tick(i: int, n: int, x0) -> None:
        preview = previewer.decode_latent_to_preview_image("JPEG", x0) if previewer is not None else None
        pbar.update_absolute(i + 1, n, preview)
    return StepHooks(check_interrupt=comfy.model_management.throw_exception_if_processing_interrupted,
                     on_step=tick)
