"""Same seed, same picture: ComfyUI's native Z-Image template against the pack's nodes, on the
same three random-weight files, in one process (no ComfyUI server).

1. Native: UNETLoader -> ModelSamplingAuraFlow(3) -> KSampler(res_multistep, simple, cfg 1),
   CLIPLoader(lumina2) + CLIPTextEncode, ConditioningZeroOut, EmptySD3LatentImage, VAELoader +
   VAEDecode (settings of the official template, /work/shared/bench/native_zimage_api.json).
   Pack: ZImageShardedLoader -> ZImageTextEncode -> ZImageSampler(res_multistep, shift 3) ->
   ZImageVAEDecodeLazy. Reported: PSNR (dB, images in 0..1) and cosine of the two IMAGEs, of the
   two LATENTs (and of both latents decoded by one VAE), and cosine of the two conditionings.
2. Interop: native CLIPTextEncode conditioning into the pack's sampler vs the pack's own.
Controls, to read those numbers by: the native template at another seed (a different picture),
and another prompt at the same seed on both paths (random weights let the caption move the
picture only a little; prompt_effect_* says whether both paths move it the same way).
Also seconds per image of each path (warm: a second seed), the GPU and the versions; JSON goes
to $OUT/comfy_parity.json.

    python3 bench/comfy_parity.py        # from the repo root; env COMFY (ComfyUI checkout,
                                         # default .comfy/ComfyUI), OUT, WORK (weights folder)
Smoke run on a CPU, full-width but few-layer files (ComfyUI only recognises Z-Image and
Qwen3-4B at full width), written to $WORK/parity_l{LAYERS}_te{TE_LAYERS}:
    DEVICE=cpu LAYERS=1 RES=256 STEPS=3 COMFY=/work/comfyui OUT=/tmp/parity WORK=/tmp/parity_w \\
        /work/venv-comfy/bin/python bench/comfy_parity.py
More env: TE_LAYERS (Qwen3 layers of a smoke file, default 3), COMFY_ARGS (extra ComfyUI flags;
on the CPU ComfyUI runs the transformer in float32, the pack in bf16: "--bf16-unet" matches them).
"""
from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = os.environ.get("DEVICE") == "cpu"
if CPU:  # the pack's loader takes CUDA whenever it sees it; hide it before torch starts
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
COMFY = os.path.abspath(os.environ.get("COMFY", os.path.join(ROOT, ".comfy", "ComfyUI")))
SMOKE = "LAYERS" in os.environ
LAYERS = int(os.environ.get("LAYERS", 30))
# 3 at least: ComfyUI reads layer -2 and asserts it is not the first
TE_LAYERS = int(os.environ.get("TE_LAYERS", 3 if SMOKE else 36))
RES = int(os.environ.get("RES", 1024))
STEPS = int(os.environ.get("STEPS", 9))
SEED, SEED2 = 1, 2
SHIFT = 3.0
PROMPT = "a red fox in the snow, photograph, 35mm"  # the template's
CONTROL_PROMPT = "a blue vintage car on a wet city street at night"
OUT = os.environ.get("OUT", "/tmp")
R: dict = {}


def log(k, v):
    R[k] = v
    print(k, v, flush=True)


def save():
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "comfy_parity.json"), "w") as f:
        json.dump(R, f, indent=1)



def make_torchvision_importable() -> None:
    """The e2e launcher's fix for a CPU torch beside PyPI's torchvision ("operator torchvision::nms
    does not exist"); a torchvision that imports cleanly (the GPU machine) is left alone."""
    spec = importlib.util.spec_from_file_location(
        "comfy_launcher", os.path.join(ROOT, "tests", "e2e", "comfy_launcher.py"))
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    launcher.make_torchvision_importable()


def import_comfy():
    if not os.path.isfile(os.path.join(COMFY, "nodes.py")):
        sys.exit(f"comfy_parity: no ComfyUI checkout at {COMFY}; set COMFY to one (ComfyUI 0.8.0).")
    make_torchvision_importable()
    # ComfyUI's nodes.py must win the name `nodes` over the pack's nodes/ folder, which
    # full_size_files later puts on sys.path: import ComfyUI first, from the front of the path.
    sys.path.insert(0, COMFY)
    # COMFY_ARGS: more of ComfyUI's flags, e.g. "--bf16-unet" for a CPU run in the GPU's dtype
    sys.argv = ["main.py"] + (["--cpu"] if CPU else []) + os.environ.get("COMFY_ARGS", "").split()
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401
    import comfy.samplers  # noqa: F401
    import folder_paths
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    import nodes  # ComfyUI's nodes.py (first-party to ruff only by name)
    return nodes, folder_paths, ModelSamplingAuraFlow, EmptySD3LatentImage


def import_pack():
    """The pack as ComfyUI imports a custom-node folder: a package, so its relative imports work."""
    spec = importlib.util.spec_from_file_location("zimage_nodes", os.path.join(ROOT, "__init__.py"),
                                                  submodule_search_locations=[ROOT])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["zimage_nodes"] = pack
    spec.loader.exec_module(pack)
    return pack.NODE_CLASS_MAPPINGS


def write_few_layer_files(folder: str, device: str) -> dict[str, str]:
    """Full-width, few-layer files for smoke runs (ComfyUI's NextDiT always has two refiner layers
    of each kind, as the full-size config does)."""
    import full_size_files as ff

    return ff.write(folder, device, layers=LAYERS, text_encoder_layers=TE_LAYERS)


def psnr(a, b, peak: float = 1.0):
    mse = float(((a.double() - b.double()) ** 2).mean())
    return "inf" if mse == 0 else round(10 * math.log10(peak * peak / mse), 2)


def cosine(a, b) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return round(float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30)), 6)


def compare(tag: str, a, b, image: bool = True) -> None:
    if image:
        log(f"{tag}_psnr_db", psnr(a, b))
    else:  # latents have no fixed range: PSNR against the reference's own span
        log(f"{tag}_psnr_db", psnr(a, b, float(a.max() - a.min())))
        log(f"{tag}_rel_rmse", round(float((a.double() - b.double()).pow(2).mean().sqrt() / a.double().std()), 5))
    log(f"{tag}_cosine", cosine(a, b))
    log(f"{tag}_max_abs_diff", round(float((a.float() - b.float()).abs().max()), 5))


def main() -> None:
    nodes, folder_paths, ModelSamplingAuraFlow, EmptySD3LatentImage = import_comfy()
    import comfy.samplers
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import full_size_files  # also puts the repo root on sys.path, for `loaders`

    NODES = import_pack()
    from zimage_nodes.loaders import sampling

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    import diffusers
    import transformers

    log("gpu", torch.cuda.get_device_name() if cuda else "cpu")
    log("torch", torch.__version__)
    log("transformers", transformers.__version__)
    log("diffusers", diffusers.__version__)
    try:
        from comfyui_version import __version__ as comfy_version
    except ImportError:
        comfy_version = "unknown"
    log("comfyui", comfy_version)
    log("comfy_args", sys.argv[1:])
    log("res", RES)
    log("steps", STEPS)
    log("layers", LAYERS)
    log("text_encoder_layers", TE_LAYERS)

    t0 = time.perf_counter()
    if SMOKE:
        folder = os.path.join(full_size_files.WORK, f"parity_l{LAYERS}_te{TE_LAYERS}")
        paths = write_few_layer_files(folder, dev)
        # ComfyUI's Qwen3-4B always builds 36 layers; a shorter file would leave the rest
        # uninitialised, so in smoke runs its config gets the file's depth.
        import comfy.text_encoders.llama as llama

        llama.Qwen3_4BConfig = functools.partial(llama.Qwen3_4BConfig, num_hidden_layers=TE_LAYERS)
    else:
        folder = full_size_files.WORK
        paths = full_size_files.write(folder, dev)
    log("files_s", round(time.perf_counter() - t0, 1))
    for kind in ("diffusion_models", "text_encoders", "vae"):
        # first in line, so a same-named file in ComfyUI's own models/ cannot shadow ours
        folder_paths.add_model_folder_path(kind, folder, is_default=True)
    names = {k: os.path.basename(p) for k, p in paths.items()}

    with torch.inference_mode():  # as ComfyUI's executor runs every node of a prompt
        latent = EmptySD3LatentImage.execute(width=RES, height=RES, batch_size=1)[0]

        # ---- 1a. the native template ------------------------------------------------------------
        t0 = time.perf_counter()
        (model_n,) = nodes.UNETLoader().load_unet(names["transformer"], "default")
        (model_n,) = ModelSamplingAuraFlow().patch_aura(model_n, SHIFT)
        (clip_n,) = nodes.CLIPLoader().load_clip(names["text_encoder"], "lumina2", "default")
        (vae_n,) = nodes.VAELoader().load_vae(names["vae"])
        log("native_load_s", round(time.perf_counter() - t0, 2))
        log("native_model_class", type(model_n.model).__name__)
        log("native_unet_dtype", str(model_n.model.get_dtype()))
        log("native_vae_dtype", str(vae_n.vae_dtype))
        t0 = time.perf_counter()
        (pos_n,) = nodes.CLIPTextEncode().encode(clip_n, PROMPT)
        sync()
        log("native_text_encode_s", round(time.perf_counter() - t0, 3))
        (neg_n,) = nodes.ConditioningZeroOut().zero_out(pos_n)

        def native(seed, pos=None):
            pos, neg = (pos_n, neg_n) if pos is None else (pos, nodes.ConditioningZeroOut().zero_out(pos)[0])
            sync()
            t0 = time.perf_counter()
            (lat,) = nodes.KSampler().sample(model_n, seed, STEPS, 1.0, "res_multistep", "simple", pos, neg,
                                             latent, 1.0)
            sync()
            t1 = time.perf_counter()
            (img,) = nodes.VAEDecode().decode(vae_n, lat)
            sync()
            return lat["samples"].float().cpu(), img.float().cpu(), t1 - t0, time.perf_counter() - t1

        lat_n, img_n, d, v = native(SEED)
        log("native_first_image_s", round(d + v, 3))
        lat_n2, img_n2, d, v = native(SEED2)
        log("native_denoise_s", round(d, 3))
        log("native_decode_s", round(v, 3))
        log("native_image_s", round(d + v, 3))
        sig_n = comfy.samplers.calculate_sigmas(model_n.get_model_object("model_sampling"), "simple", STEPS)
        save()

        # ---- 1b. the pack's nodes on the same files ----------------------------------------------
        t0 = time.perf_counter()
        loaded = NODES["ZImageShardedLoader"]().load(names["transformer"], names["text_encoder"], names["vae"],
                                                     0.0, 0.0, "bf16")
        parts, te_o, vae_o = loaded["result"]
        log("pack_load_s", round(time.perf_counter() - t0, 2))
        log("pack_plan", loaded["ui"]["zimage_plan"][0])
        t0 = time.perf_counter()
        (pos_o,) = NODES["ZImageTextEncode"]().encode(te_o, PROMPT)
        sync()
        log("pack_text_encode_s", round(time.perf_counter() - t0, 3))
        sampler, decoder = NODES["ZImageSampler"](), NODES["ZImageVAEDecodeLazy"]()
        run_info = []  # the sampler's own report of each run (attention kernel, s/step)

        def pack(cond, seed):
            sync()
            t0 = time.perf_counter()
            out = sampler.sample(parts, cond, latent, seed, STEPS, 1.0, SHIFT, "res_multistep", 1.0, "auto")
            (lat,) = out["result"]
            sync()
            t1 = time.perf_counter()
            (img,) = decoder.decode(vae_o, lat)
            sync()
            run_info.append(out["ui"]["zimage_run"][0])
            return lat["samples"].float().cpu(), img.float().cpu(), t1 - t0, time.perf_counter() - t1

        lat_o, img_o, d, v = pack(pos_o, SEED)
        log("pack_first_image_s", round(d + v, 3))
        _, _, d, v = pack(pos_o, SEED2)
        log("pack_denoise_s", round(d, 3))
        log("pack_decode_s", round(v, 3))
        log("pack_image_s", round(d + v, 3))
        log("pack_run_info", run_info[-1])
        save()

        # ---- comparisons -------------------------------------------------------------------------
        sig_o = sampling.sigmas(sampling.SamplerName.RES_MULTISTEP, STEPS, SHIFT)
        log("sigmas_max_abs_diff", float((sig_n.float().cpu() - sig_o).abs().max()))
        c_n, c_o = pos_n[0][0].float().cpu(), pos_o[0][0].float().cpu()
        log("cond_tokens_native", c_n.shape[1])
        log("cond_tokens_pack", c_o.shape[1])
        mask = pos_n[0][1].get("attention_mask")
        log("cond_native_mask_tokens", None if mask is None else int(mask.sum()))
        if c_n.shape == c_o.shape:
            log("cond_cosine", cosine(c_n, c_o))
            log("cond_max_abs_diff", round(float((c_n - c_o).abs().max()), 5))
            log("cond_token_cosine_min", round(float(torch.nn.functional.cosine_similarity(
                c_n[0].double(), c_o[0].double(), dim=-1).min()), 6))
        for tag, img in (("native", img_n), ("pack", img_o)):
            log(f"{tag}_image_std", round(float(img.std()), 5))
        log("image_shape", list(img_n.shape))
        log("images_finite", bool(torch.isfinite(img_n).all() and torch.isfinite(img_o).all()))
        compare("image", img_n, img_o)
        compare("latent", lat_n, lat_o, image=False)
        # the same VAE for both latents: the sampler's share of the difference; the VAE's on its own
        (img_o_by_n,) = nodes.VAEDecode().decode(vae_n, {"samples": lat_o})
        (img_n_by_o,) = decoder.decode(vae_o, {"samples": lat_n})
        compare("image_native_vae", img_n, img_o_by_n.float().cpu())
        compare("image_pack_vae", img_n_by_o.float().cpu(), img_o)
        compare("vae_only", img_n, img_n_by_o.float().cpu())
        # what a different picture scores: the native template at another seed
        compare("baseline_other_seed_image", img_n, img_n2)
        compare("baseline_other_seed_latent", lat_n, lat_n2, image=False)
        save()

        # ---- 2. native text encoder into the pack's sampler --------------------------------------
        lat_x, img_x, d, v = pack(pos_n, SEED)
        log("interop_image_s", round(d + v, 3))
        compare("interop_image", img_o, img_x)
        compare("interop_latent", lat_o, lat_x, image=False)
        compare("interop_vs_native_image", img_n, img_x)
        # How much a conditioning change moves the picture at all: random weights attend almost
        # uniformly, so the caption's share of the image can be small. Another prompt, same seed.
        (pos_c,) = NODES["ZImageTextEncode"]().encode(te_o, CONTROL_PROMPT)
        lat_c, img_c, _, _ = pack(pos_c, SEED)
        log("control_cond_cosine", cosine(pos_o[0][0], pos_c[0][0]) if pos_c[0][0].shape == pos_o[0][0].shape
            else "different token counts")
        compare("control_other_prompt_image", img_o, img_c)
        compare("control_other_prompt_latent", lat_o, lat_c, image=False)
        # The prompt's own effect, native against pack: where the caption moves the picture
        # less than bf16 rounding does, these differences still show whether both
        # implementations move it the same way (cosine 1, norm ratio 1).
        (pos_nc,) = nodes.CLIPTextEncode().encode(clip_n, CONTROL_PROMPT)
        lat_nc, img_nc, _, _ = native(SEED, pos_nc)
        compare("control_native_other_prompt_image", img_n, img_nc)
        for tag, a, b, c, d_ in (("latent", lat_n, lat_nc, lat_o, lat_c), ("image", img_n, img_nc, img_o, img_c)):
            effect_n, effect_o = (a - b).double(), (c - d_).double()
            log(f"prompt_effect_{tag}_cosine", cosine(effect_n, effect_o))
            log(f"prompt_effect_{tag}_norm_ratio", round(float(effect_o.norm() / effect_n.norm().clamp_min(1e-30)), 4))

        if cuda:
            log("peak_reserved_gib", round(torch.cuda.max_memory_reserved() / 2**30, 2))
        save()
        print("wrote", os.path.join(OUT, "comfy_parity.json"), flush=True)


if __name__ == "__main__":
    try:
        main()
    except ImportError as err:
        sys.exit(f"comfy_parity: a module is missing: {err}.\nInstall the wheels in .whl (diffusers, torchsde, "
                 f"trampoline, av: ComfyUI's nodes.py imports av): pip install --no-deps --no-index --target DIR "
                 f".whl/*.whl and put DIR on PYTHONPATH (av is compiled: it cannot be imported from the .whl "
                 f"itself). ComfyUI's own requirements: {COMFY}/requirements.txt.")
