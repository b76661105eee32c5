"""The cases of load_path.py, each run in its own process (child_main): the weight files written
(child_write), and one engine loading them and making images: the pack, diffusers, ComfyUI. Their
measurements follow one skeleton (load_path_measure.first_steady_reload); each engine brings its own
load, image and release."""
from __future__ import annotations

import contextlib
import gc
import os
import shutil
import sys
import traceback

from load_path_measure import Case, device_sync, first_steady_reload, free_memory, pinned_stats, prepare_device
from load_path_settings import GB, PROMPTS, RES, SMOKE, SMOKE_DIR, STEPS, TOKENIZER, WORK, GiB, now


def smoke_plan(parts, budget_gb: float) -> None:
    """On a CPU the planner leaves every part mapped; this hand-made plan sends the smoke run down
    the GPU's code path instead: device copies of resident blocks, and streamed blocks and
    text-encoder layers from HOST_CACHE ("pinned" is plain memory without CUDA)."""
    import dataclasses

    from loaders.placement import Where

    rt = parts.runtime
    blocks = tuple((n, Where.GPU if budget_gb == 0 or i % 2 else Where.PINNED)
                   for i, (n, _) in enumerate(rt.plan.blocks))
    rt.plan = dataclasses.replace(rt.plan, blocks=blocks, text_encoder="streamed", text_encoder_host=Where.PINNED,
                                  host_budget_bytes=GiB)
    rt.fixed_plan = True


def child_pack(c: Case) -> None:
    import torch

    from loaders.generation import decode, denoise
    from loaders.host_cache import HOST_CACHE
    from loaders.pipeline_loading import load_parts

    spec, paths = c.spec, c.spec["paths"]
    budget = spec["budget_gb"]
    # The loaders import diffusers and transformers on first use (seconds); diffusers' and ComfyUI's
    # cases import theirs before the clock too, so every load_s is the loading alone.
    t = now()
    import diffusers  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, ZImageTransformer2DModel  # noqa: F401
    from transformers import AutoTokenizer, Qwen3Model  # noqa: F401
    c.say("imports_s", round(now() - t, 2))
    device = torch.device("cpu" if SMOKE else "cuda")
    dev = prepare_device(torch, device, c)
    cuda = device.type == "cuda"
    if cuda and budget:
        # the allocator's cap makes the budget real: a plan that under-counts fails here
        torch.cuda.set_per_process_memory_fraction((budget * GiB - dev["context"]) / dev["total"])
    elif budget:
        c.say("vram_cap", "not set: CPU run")
    latent = torch.zeros(1, 16, RES // 8, RES // 8)
    sync = device_sync(torch, cuda)

    def load(into: dict):
        parts = load_parts(paths["transformer"], paths["text_encoder"], paths["vae"], budget, device=device,
                           comfy_tokenizer=spec["tokenizer"])
        if SMOKE:
            smoke_plan(parts, budget)
        return parts

    def image(parts, i: int, phases: dict | None = None) -> float:
        t = now()
        pos = parts.text_encoder.encode(PROMPTS[i])
        if phases is not None:  # where a first image's time goes (syncs only there)
            sync()
            phases["encode_s"] = round(now() - t, 3)
        out, _ = denoise(parts, pos, None, latent, seed=i, steps=STEPS)
        if phases is not None:
            sync()
            phases["denoise_incl_placement_s"] = round(now() - t - phases["encode_s"], 3)
        decode(parts.vae, out)
        sync()
        if phases is not None:
            phases["decode_s"] = round(now() - t - phases["encode_s"] - phases["denoise_incl_placement_s"], 3)
        return now() - t

    @contextlib.contextmanager
    def host_cache_and_gpu(into: dict):
        """What the pack's first image adds to the host figures: HOST_CACHE's copies, the GPU's peak."""
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        built = HOST_CACHE.built
        yield
        c.say("host_cache", {"GB": round(HOST_CACHE.nbytes / GB, 3), "copies_made": HOST_CACHE.built - built}, into)
        if cuda:
            c.say("gpu_peak_reserved_GiB", round(torch.cuda.max_memory_reserved() / GiB, 2), into)
            c.say("pinned_allocator_GB", pinned_stats(torch), into)
            if HOST_CACHE.nbytes:
                # PyTorch's pinned allocator rounds every block up to a power of two
                c.say("pinned_over_host_cache", round(dev["pinned"]() / HOST_CACHE.nbytes, 3), into)

    def say_plan(parts) -> None:
        plan = parts.runtime.plan
        if SMOKE:
            where = [w.value for _, w in plan.blocks]
            c.say("plan", "smoke, hand-made: transformer blocks " + ", ".join(
                f"{where.count(k)} {k}" for k in sorted(set(where))) + f"; text encoder {plan.text_encoder_host.value}")
        else:
            c.say("plan", plan.summary())

    # Three steady prompts: the second one also pins the text encoder's layers (once per process).
    # The reload is a re-run that loads the same files again (a changed loader input, a switch back
    # to this model): the first parts go as ComfyUI drops a node's old output.
    first_steady_reload(c, dev, load, image, lambda: free_memory(torch, cuda), release=lambda parts: parts.release(),
                        steady=(1, 2, 3), list_steady=True, phases=True, around_first=host_cache_and_gpu,
                        on_first=say_plan)


def child_diffusers(c: Case) -> None:
    import torch

    try:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
        from transformers import AutoTokenizer, Qwen3Model
    except ImportError as e:
        c.say("skipped", f"diffusers/transformers not importable: {e}")
        return
    spec, paths = c.spec, c.spec["paths"]
    device = torch.device("cpu" if SMOKE else "cuda")
    dev = prepare_device(torch, device, c)
    cuda = device.type == "cuda"
    vae_dtype = torch.bfloat16 if cuda else torch.float32
    # Qwen3Model.from_pretrained wants a folder: config.json beside a hard link to the ComfyUI file,
    # whose "model." prefix transformers strips as it does for a base model in a with-head checkpoint.
    te_dir = os.path.join(os.path.dirname(paths["text_encoder"]), "diffusers_text_encoder")
    os.makedirs(te_dir, exist_ok=True)
    shutil.copy(spec["text_encoder_config"], os.path.join(te_dir, "config.json"))
    link = os.path.join(te_dir, "model.safetensors")
    if not (os.path.exists(link) and os.path.samefile(link, paths["text_encoder"])):
        if os.path.lexists(link):
            os.remove(link)
        try:
            os.link(paths["text_encoder"], link)
        except OSError:
            os.symlink(paths["text_encoder"], link)
    sigmas = torch.linspace(1.0, 1 / STEPS, STEPS).tolist()
    sync = device_sync(torch, cuda)

    def load(into: dict):
        t = now()
        tr = ZImageTransformer2DModel.from_single_file(paths["transformer"], config=spec["diffusers_config"],
                                                       subfolder="transformer", local_files_only=True,
                                                       torch_dtype=torch.bfloat16)
        c.say("transformer_from_single_file_s", round(now() - t, 3), into)
        t1 = now()
        te, info = Qwen3Model.from_pretrained(te_dir, torch_dtype=torch.bfloat16, local_files_only=True,
                                              output_loading_info=True)
        c.say("text_encoder_from_pretrained_s", round(now() - t1, 3), into)
        if info.get("missing_keys"):
            c.say("text_encoder_missing_keys", len(info["missing_keys"]), into)
        t1 = now()
        vae = AutoencoderKL.from_single_file(paths["vae"], config=spec["diffusers_config"], subfolder="vae",
                                             local_files_only=True, torch_dtype=vae_dtype)
        tok = AutoTokenizer.from_pretrained(spec["tokenizer"])
        pipe = ZImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
                              vae=vae, text_encoder=te, tokenizer=tok, transformer=tr)
        pipe.set_progress_bar_config(disable=True)
        c.say("vae_tokenizer_s", round(now() - t1, 3), into)
        t1 = now()
        pipe.to(device)
        sync()
        c.say("to_device_s", round(now() - t1, 3), into)
        return pipe

    def image(pipe, i: int) -> float:
        t = now()
        pipe(prompt=PROMPTS[i], height=RES, width=RES, num_inference_steps=STEPS, sigmas=sigmas, guidance_scale=0.0,
             generator=torch.Generator(device).manual_seed(i), output_type="pt")
        sync()
        return now() - t

    first_steady_reload(c, dev, load, image, lambda: free_memory(torch, cuda))


def child_comfy(c: Case) -> None:
    paths = c.spec["paths"]
    # ComfyUI's own nodes.py must win over this pack's nodes/ package, hence the front of the path.
    sys.path.insert(0, c.spec["comfy"])
    sys.argv = ["main.py"] + (["--cpu"] if SMOKE else [])
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import torch

    device = torch.device("cpu" if SMOKE else "cuda")
    dev = prepare_device(torch, device, c)
    sync = device_sync(torch, device.type == "cuda")

    def load(into: dict):
        t = now()
        model = comfy.sd.load_diffusion_model(paths["transformer"])
        c.say("load_diffusion_model_s", round(now() - t, 3), into)
        t1 = now()
        clip = comfy.sd.load_clip(ckpt_paths=[paths["text_encoder"]], clip_type=comfy.sd.CLIPType.LUMINA2)
        c.say("load_clip_s", round(now() - t1, 3), into)
        t1 = now()
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(paths["vae"]))
        c.say("vae_s", round(now() - t1, 3), into)
        t1 = now()
        mm.load_models_gpu([model])
        sync()
        c.say("load_models_gpu_s", round(now() - t1, 3), into)
        return model, clip, vae

    def image(loaded, i: int) -> float:
        model, clip, vae = loaded
        t = now()
        pos = clip.encode_from_tokens_scheduled(clip.tokenize(PROMPTS[i]))
        neg = [[torch.zeros_like(pos[0][0]), dict(pos[0][1])]]  # ConditioningZeroOut, as the template
        latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros([1, 16, RES // 8, RES // 8]))
        noise = comfy.sample.prepare_noise(latent, i)
        samples = comfy.sample.sample(model, noise, STEPS, 1.0, "res_multistep", "simple", pos, neg, latent,
                                      denoise=1.0, seed=i, disable_pbar=True)
        vae.decode(samples)
        sync()
        return now() - t

    def free() -> None:
        # switching back to this model: ComfyUI unloads it and reads the files again
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()

    first_steady_reload(c, dev, load, image, free)


def child_write(c: Case) -> None:
    """The weight files, written once (a later run finds them)."""
    from loaders.model_detection import SCAFFOLD

    if SMOKE:
        from loaders.tiny_models import COMFY_NAMES, write_tiny_models

        done = os.path.join(SMOKE_DIR, "complete")
        tok = TOKENIZER if os.path.isfile(os.path.join(TOKENIZER, "vocab.json")) else None
        if not os.path.exists(done):
            shutil.rmtree(SMOKE_DIR, ignore_errors=True)
            write_tiny_models(SMOKE_DIR, tokenizer_dir=tok)
            open(done, "w").close()
        comfy, diffusers = os.path.join(SMOKE_DIR, "comfy"), os.path.join(SMOKE_DIR, "diffusers")
        c.r["paths"] = {k: os.path.join(comfy, COMFY_NAMES[k]) for k in ("transformer", "text_encoder", "vae")}
        c.r["diffusers_config"] = diffusers
        c.r["text_encoder_config"] = os.path.join(diffusers, "text_encoder", "config.json")
        c.r["tokenizer"] = tok or os.path.join(diffusers, "tokenizer")
    else:
        from full_size_files import write

        c.r["paths"] = write(WORK)
        c.r["diffusers_config"] = SCAFFOLD
        c.r["text_encoder_config"] = os.path.join(SCAFFOLD, "text_encoder", "config.json")
        c.r["tokenizer"] = TOKENIZER
    c.save()


def child_main(spec: dict) -> None:
    c = Case(spec)
    try:
        {"write": child_write, "pack": child_pack, "diffusers": child_diffusers, "comfy": child_comfy}[spec["kind"]](c)
    except BaseException as e:
        c.r["error"] = f"{type(e).__name__}: {e}"[:600]
        c.r["traceback"] = traceback.format_exc()[-4000:]
        print(f"  [{spec['name']}] FAILED {c.r['error']}\n{c.r['traceback']}", flush=True)
        c.save()
        sys.exit(1)
    c.save()
