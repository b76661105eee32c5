"""Load path: seconds from "load" to the first image, cold and warm, against what the weights' disk
and the page cache can deliver, and host RAM while loading. Full-size random weights, saved as real
safetensors files in ComfyUI's layout (full_size_files.py), one GPU, one run.

1. Read rate of the disk holding the weights: sequential reads of the three files in 64 MiB
   buffers, cold (evicted with posix_fadvise DONTNEED, checked with mincore; /proc/sys/vm/drop_caches
   only if that left pages behind) and warm (from the page cache), GB/s.
2. The pack at VRAM budgets unlimited and 8 GiB: load_parts seconds, time to first image (load +
   text encode + 9 steps at 1024x1024 + decode), a steady image (a new prompt: encode, denoise,
   decode), host RAM; started cold (evicted files, fresh process, empty HOST_CACHE) and from the page
   cache (fresh process); then a reload in the cold case's process: the parts released, load_parts
   again on the same files, one image (streamed blocks' pinned copies come from HOST_CACHE).
3. diffusers: transformer and VAE with from_single_file on the same files (config: the pack's
   scaffold), the text encoder with Qwen3Model.from_pretrained on a folder that hard-links
   qwen_3_4b.safetensors (a diffusers-layout transformer would be another 12 GB to write), moved
   with .to("cuda"), one ZImagePipeline image; cold, then reloaded in the same process.
4. ComfyUI (env COMFY, default .comfy/ComfyUI): load_diffusion_model + load_clip (lumina2) + VAE,
   load_models_gpu, one native image (res_multistep/simple, cfg 1); cold, then reloaded.
5. Targets: first image <= 1.5 x (weights bytes / read rate) + steady image, the rate of the case's
   start (cold disk or page cache); reload overhead (first image after the reload - steady image)
   <= 0.5 s; host RAM peak while loading and making the first image <= 1.1 x the weights' bytes.

Every case runs in its own process (this script again, with LOAD_PATH_CHILD set): a cold case starts
with nothing cached in the process, ComfyUI stays apart from the pack, and RSS is the case's own.
Host RAM is sampled from /proc/self/status every 20 ms: RssAnon counts copies of weights (mapped file
pages are page cache, not copies: RssFile, recorded for information); PyTorch's pinned host memory is
added where this kernel leaves it out of RssAnon (probed at the start of each process). The RAM target
is judged on that peak as it is, the process's own ~1-2 GB (Python, CUDA) included; the part added
while loading is reported beside it.

    python3 bench/load_path.py        # env: OUT, WORK, TOKENIZER (see full_size_files.py), COMFY,
                                      # CASES (comma list of case names), RES, STEPS, TIME_BUDGET_S
    SMOKE=1 OUT=/tmp/lp python3 bench/load_path.py   # CPU: tiny models, 256x256, 2 steps, no ComfyUI

Results: $OUT/load_path.json, written after every case.
"""
from __future__ import annotations

import ctypes
import gc
import json
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from full_size_files import OUT, ROOT, TOKENIZER, WORK  # noqa: E402  (also puts the repo on sys.path)

SMOKE = os.environ.get("SMOKE") == "1"
RES = int(os.environ.get("RES", 256 if SMOKE else 1024))
STEPS = int(os.environ.get("STEPS", 2 if SMOKE else 9))
COMFY = os.path.abspath(os.environ.get("COMFY", os.path.join(ROOT, ".comfy", "ComfyUI")))
SMOKE_DIR = os.path.join(tempfile.gettempdir(), "zimage_load_path_smoke")
# Seconds the cases may take together once the files exist (the whole run should stay near 7 min).
TIME_BUDGET_S = float(os.environ.get("TIME_BUDGET_S", 330))
CASE_TIMEOUT_S = float(os.environ.get("CASE_TIMEOUT_S", 300))
# A cold case reads every weight from the disk once; past this many seconds per read only the
# pack's unlimited case starts cold, the rest start from the page cache.
MAX_COLD_READ_S = 40.0
READ_LIMIT_S = 60.0  # the cold read-rate measurement stops here on a very slow disk
BUFFER = 64 * 2**20
GB, GiB, MiB = 1e9, 2**30, 2**20
FIRST_FACTOR, RELOAD_OVERHEAD_S, RAM_FACTOR = 1.5, 0.5, 1.1
PROMPTS = [f"a red fox in the snow, photograph {i}" for i in range(8)]


def now() -> float:
    return time.perf_counter()


def _proc_bytes(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0]) * 1024
    return out


def rss_anon() -> int:
    return _proc_bytes("/proc/self/status", ("RssAnon",)).get("RssAnon", 0)


# ---------------------------------------------------------------------------------------------
# page cache: residency, eviction, read rate


def resident_fraction(paths: list[str]) -> float | None:
    """Fraction of the files' pages in the page cache (mincore on a fresh shared mapping, which
    faults nothing in); None where mincore cannot be called."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)
    except (OSError, AttributeError):
        return None
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        finally:
            os.close(fd)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            return None
        try:
            vec = ctypes.create_string_buffer(pages)
            if libc.mincore(addr, size, vec) != 0:
                return None
            resident += pages - vec.raw.count(0)
        finally:
            libc.munmap(addr, size)
        total += pages
    return resident / total if total else 0.0


def evict(paths: list[str]) -> dict:
    """Drop the files from the page cache. DONTNEED skips dirty pages (a file just written), hence
    the fsync first; drop_caches (root only) is the fallback, since it also drops the libraries'
    pages that a cold case would then read again."""
    t, how = now(), "posix_fadvise"
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            how = f"posix_fadvise failed ({e.strerror})"
        finally:
            os.close(fd)
    left = resident_fraction(paths)
    if left is not None and left > 0.05:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            how = "posix_fadvise, then drop_caches"
        except OSError as e:
            how = f"posix_fadvise (drop_caches: {e.strerror})"
        left = resident_fraction(paths)
    return {"how": how, "resident_after": None if left is None else round(left, 4), "seconds": round(now() - t, 2)}


def read_files(paths: list[str], max_bytes: int | None = None, limit_s: float | None = None) -> tuple[int, float]:
    """Bytes read and seconds: sequential reads into one reused buffer (no allocation per read)."""
    view = memoryview(bytearray(BUFFER))
    n, t = 0, now()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while max_bytes is None or n < max_bytes:
                k = f.readinto(view)
                if not k:
                    break
                n += k
                if limit_s is not None and now() - t > limit_s:
                    return n, now() - t
    return n, now() - t


# ---------------------------------------------------------------------------------------------
# host memory while a block runs


class HostMemory:
    """Peaks of this process's host memory while the block runs, sampled every 20 ms.

    `copies` is RssAnon, plus PyTorch's pinned host memory where this kernel does not count it in
    RssAnon (driver mappings of cudaHostAlloc may not be); `available` is the machine's MemAvailable,
    whose drop is a cross-check that counts no page cache."""

    STATUS = ("RssAnon", "RssFile", "RssShmem", "VmRSS")

    def __init__(self, pinned=None, pinned_in_anon: bool = True, period: float = 0.02):
        self.pinned, self.pinned_in_anon, self.period = pinned, pinned_in_anon, period

    def _read(self) -> dict[str, int]:
        s = _proc_bytes("/proc/self/status", self.STATUS)
        s["available"] = _proc_bytes("/proc/meminfo", ("MemAvailable",)).get("MemAvailable", 0)
        s["pinned"] = self.pinned() if self.pinned else 0
        s["copies"] = s.get("RssAnon", 0) + (0 if self.pinned_in_anon else s["pinned"])
        return s

    def _sample(self) -> None:
        s = self._read()
        for k, v in s.items():
            self.peak[k] = max(self.peak.get(k, 0), v)
        self.min_available = min(self.min_available, s["available"])

    def __enter__(self) -> "HostMemory":
        self.base = self._read()
        self.peak, self.min_available, self._stop = dict(self.base), self.base["available"], False

        def poll():
            while not self._stop:
                self._sample()
                time.sleep(self.period)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        self._sample()

    def report(self, weights: int) -> dict:
        peak, base = self.peak["copies"], self.base["copies"]
        return {"peak_copies_GB": round(peak / GB, 2), "before_GB": round(base / GB, 2),
                "added_GB": round((peak - base) / GB, 2),
                "ratio_to_weights": round(peak / weights, 3),
                "added_ratio_to_weights": round((peak - base) / weights, 3),
                "pass": peak <= RAM_FACTOR * weights,
                "peak_RssAnon_GB": round(self.peak.get("RssAnon", 0) / GB, 2),
                "peak_pinned_GB": round(self.peak["pinned"] / GB, 2),
                "peak_RssFile_GB": round(self.peak.get("RssFile", 0) / GB, 2),
                "peak_VmRSS_GB": round(self.peak.get("VmRSS", 0) / GB, 2),
                "machine_MemAvailable_drop_GB": round((self.base["available"] - self.min_available) / GB, 2)}


# ---------------------------------------------------------------------------------------------
# child processes: one case each


class Case:
    """A child's results: printed as they come and written to the file the parent reads."""

    def __init__(self, spec: dict):
        self.spec, self.r = spec, {"case": spec["name"]}

    def say(self, key: str, value, into: dict | None = None) -> None:
        (self.r if into is None else into)[key] = value
        print(f"  [{self.spec['name']}] {key} {value}", flush=True)
        self.save()

    def save(self) -> None:
        with open(self.spec["result"], "w") as f:
            json.dump(self.r, f, indent=1)


def prepare_device(torch, device, c: Case) -> dict:
    """CUDA context and cuBLAS before any timer (ComfyUI has them from its start), and whether
    pinned host memory shows in RssAnon here. Returns what HostMemory needs."""
    if device.type != "cuda":
        c.say("pinned_memory", "not measured: CPU run (HOST_CACHE copies are plain host memory)")
        return {"pinned": None, "pinned_in_anon": True, "context": 0}
    a = torch.ones(256, 256, device=device, dtype=torch.bfloat16)
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info()
    c.say("gpu", torch.cuda.get_device_name())
    before = rss_anon()
    probe = torch.empty(256 * MiB, dtype=torch.uint8, pin_memory=True)
    grown = rss_anon() - before
    del probe  # stays in PyTorch's host cache, where a later 256 MiB block reuses it
    c.say("pinned_memory_in_RssAnon", grown > 128 * MiB)

    def pinned() -> int:
        try:
            s = torch.cuda.host_memory_stats()
        except (AttributeError, RuntimeError):
            return 0
        return max([v for k, v in s.items() if k in ("allocated_bytes.current", "reserved_bytes.current",
                                                     "allocated_bytes.all.current", "reserved_bytes.all.current")]
                   or [0])
    return {"pinned": pinned, "pinned_in_anon": grown > 128 * MiB,
            "context": total - free - torch.cuda.memory_reserved(), "total": total}


def pinned_stats(torch) -> dict:
    if not torch.cuda.is_available():
        return {}
    try:
        s = torch.cuda.host_memory_stats()
    except (AttributeError, RuntimeError):
        return {}
    return {k: round(v / GB, 3) for k, v in s.items() if "bytes" in k and k.endswith((".current", ".peak"))}


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
    budget, weights = spec["budget_gb"], spec["weights_bytes"]
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

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def load():
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

    def first(into: dict):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        built = HOST_CACHE.built
        with HostMemory(dev["pinned"], dev["pinned_in_anon"]) as mem:
            t0 = now()
            parts = load()
            c.say("load_s", round(now() - t0, 3), into)
            phases: dict = {}
            image(parts, 0, phases)
            c.say("first_image_s", round(now() - t0, 3), into)
            c.say("first_image_phases", phases, into)
        c.say("host", mem.report(weights), into)
        c.say("host_cache", {"GB": round(HOST_CACHE.nbytes / GB, 3), "copies_made": HOST_CACHE.built - built}, into)
        if cuda:
            c.say("gpu_peak_reserved_GiB", round(torch.cuda.max_memory_reserved() / GiB, 2), into)
            c.say("pinned_allocator_GB", pinned_stats(torch), into)
            if HOST_CACHE.nbytes:
                # PyTorch's pinned allocator rounds every block up to a power of two
                c.say("pinned_over_host_cache", round(dev["pinned"]() / HOST_CACHE.nbytes, 3), into)
        return parts

    parts = first(c.r)
    plan = parts.runtime.plan
    if SMOKE:
        where = [w.value for _, w in plan.blocks]
        c.say("plan", "smoke, hand-made: transformer blocks " + ", ".join(
            f"{where.count(k)} {k}" for k in sorted(set(where))) + f"; text encoder {plan.text_encoder_host.value}")
    else:
        c.say("plan", plan.summary())
    # three new prompts: the second one also pins the text encoder's layers (once per process)
    steady = [image(parts, i) for i in (1, 2, 3)]
    c.say("steady_images_s", [round(x, 3) for x in steady])
    c.say("steady_image_s", round(statistics.median(steady), 3))
    if not spec["reload"]:
        return
    # A re-run that loads the same files again (a changed loader input, a switch back to this
    # model): the first parts go as ComfyUI drops a node's old output.
    parts.release()
    del parts
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    reload = c.r["reload"] = {}
    parts = first(reload)
    c.say("overhead_s", round(reload["first_image_s"] - c.r["steady_image_s"], 3), reload)
    c.say("steady_image_s", round(image(parts, 4), 3), reload)


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

    def sync():
        if cuda:
            torch.cuda.synchronize()

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

    def first(into: dict):
        with HostMemory(dev["pinned"], dev["pinned_in_anon"]) as mem:
            t0 = now()
            pipe = load(into)
            c.say("load_s", round(now() - t0, 3), into)
            image(pipe, 0)
            c.say("first_image_s", round(now() - t0, 3), into)
        c.say("host", mem.report(spec["weights_bytes"]), into)
        return pipe

    pipe = first(c.r)
    c.say("steady_image_s", round(statistics.median([image(pipe, i) for i in (1, 2)]), 3))
    if not spec["reload"]:
        return
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    reload = c.r["reload"] = {}
    pipe = first(reload)
    c.say("overhead_s", round(reload["first_image_s"] - c.r["steady_image_s"], 3), reload)
    c.say("steady_image_s", round(image(pipe, 3), 3), reload)


def child_comfy(c: Case) -> None:
    spec, paths = c.spec, c.spec["paths"]
    # ComfyUI's own nodes.py must win over this pack's nodes/ package, hence the front of the path.
    sys.path.insert(0, spec["comfy"])
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
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

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

    def first(into: dict):
        with HostMemory(dev["pinned"], dev["pinned_in_anon"]) as mem:
            t0 = now()
            loaded = load(into)
            c.say("load_s", round(now() - t0, 3), into)
            image(loaded, 0)
            c.say("first_image_s", round(now() - t0, 3), into)
        c.say("host", mem.report(spec["weights_bytes"]), into)
        return loaded

    loaded = first(c.r)
    c.say("steady_image_s", round(statistics.median([image(loaded, i) for i in (1, 2)]), 3))
    if not spec["reload"]:
        return
    # switching back to this model: ComfyUI unloads it and reads the files again
    del loaded
    mm.unload_all_models()
    gc.collect()
    mm.soft_empty_cache()
    reload = c.r["reload"] = {}
    loaded = first(reload)
    c.say("overhead_s", round(reload["first_image_s"] - c.r["steady_image_s"], 3), reload)
    c.say("steady_image_s", round(image(loaded, 3), 3), reload)


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


# ---------------------------------------------------------------------------------------------
# the parent: files, read rates, cases, targets


def run_child(spec: dict, timeout: float) -> dict:
    fd, result = tempfile.mkstemp(prefix="load_path_", suffix=".json")
    os.close(fd)
    spec = dict(spec, result=result)
    t = now()
    try:
        rc = subprocess.run([sys.executable, os.path.abspath(__file__)], timeout=timeout,
                            env=dict(os.environ, LOAD_PATH_CHILD=json.dumps(spec))).returncode
    except subprocess.TimeoutExpired:
        rc = f"killed after {timeout:.0f} s"
    try:
        with open(result) as f:
            out = json.load(f)
    except (OSError, ValueError):
        out = {}
    finally:
        os.remove(result)
    out["process_wall_s"] = round(now() - t, 1)
    if rc != 0:
        out.setdefault("error", f"exit status {rc}")
    return out


def filesystem_of(path: str) -> dict:
    path, best = os.path.realpath(path), ("", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    st = os.statvfs(path)
    return {"mount": best[0], "type": best[1], "device": best[2], "free_GB": round(st.f_bavail * st.f_frsize / GB, 1)}


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def check(case: dict, rates: dict, weights: int) -> dict:
    """The issue's targets for one case (None where a figure is missing)."""
    rate = rates["cold_GBps"] if case.get("start") == "cold" else rates["warm_GBps"]
    steady, first = case.get("steady_image_s"), case.get("first_image_s")
    t = {"read_rate_GBps": rate}
    if rate:
        floor = weights / GB / rate
        t["read_floor_s"] = round(floor, 3)
        if case.get("load_s") is not None:
            t["load_over_read_floor"] = round(case["load_s"] / floor, 2)
        if steady is not None and first is not None:
            target = FIRST_FACTOR * floor + steady
            t["first_image_target_s"] = round(target, 3)
            t["first_image_pass"] = first <= target
    reload = case.get("reload") or {}
    if "overhead_s" in reload:
        t["reload_overhead_s"] = reload["overhead_s"]
        t["reload_pass"] = reload["overhead_s"] <= RELOAD_OVERHEAD_S
    if "host" in case:
        t["host_ratio"] = case["host"]["ratio_to_weights"]
        t["host_pass"] = case["host"]["pass"]
    return t


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    out_path = os.path.join(OUT, "load_path.json")
    R: dict = {"smoke": SMOKE, "res": RES, "steps": STEPS, "python": sys.version.split()[0], "cases": {}}

    def log(key, value, into=None):
        (R if into is None else into)[key] = value
        print(key, value, flush=True)
        save()

    def save():
        with open(out_path, "w") as f:
            json.dump(R, f, indent=1)

    t_start = now()
    log("gpu", "none: smoke run on the CPU (nvidia-smi not asked)" if SMOKE else gpu_name())
    log("cpus", os.cpu_count())
    log("MemTotal_GB", round(_proc_bytes("/proc/meminfo", ("MemTotal",))["MemTotal"] / GB, 1))
    files = run_child({"kind": "write", "name": "write"}, timeout=1200)
    if "error" in files:
        log("error", f"writing the weight files failed: {files['error']}")
        sys.exit(1)
    paths = files["paths"]
    weights_files = [paths["transformer"], paths["text_encoder"], paths["vae"]]
    weights = sum(os.path.getsize(p) for p in weights_files)
    log("files", {k: f"{p} ({os.path.getsize(p) / GB:.3f} GB)" for k, p in paths.items()})
    log("weights_GB", round(weights / GB, 3))
    log("filesystem", filesystem_of(weights_files[0]))
    log("files_ready_s", round(now() - t_start, 1))

    # 1. read rates
    ev = evict(weights_files)
    log("eviction", ev)
    evicted = ev["resident_after"] is not None and ev["resident_after"] <= 0.05
    if ev["resident_after"] is None:
        log("eviction_check", "mincore unavailable: eviction judged by the cold read rate below")
    n, s = read_files(weights_files, limit_s=READ_LIMIT_S)
    cold = n / s / GB
    if n < weights:
        log("cold_read_note", f"disk very slow: stopped after {READ_LIMIT_S:.0f} s, "
                              f"{n / GB:.1f} of {weights / GB:.1f} GB read")
    n2, s2 = read_files(weights_files, max_bytes=n)
    warm = n2 / s2 / GB
    if ev["resident_after"] is None:
        evicted = cold < 0.5 * warm
    rates = {"cold_GBps": round(cold, 3), "warm_GBps": round(warm, 3), "cold_bytes_GB": round(n / GB, 2),
             "evicted": evicted, "buffer_MiB": BUFFER // MiB}
    log("read_rates", rates)
    if not evicted:
        log("cold_note", f"the files stayed in RAM after eviction ({ev['how']}; filesystem "
                         f"{R['filesystem']['type']}): no cold case can run, every case starts from the page cache")
        rates["cold_GBps_not_cold"], rates["cold_GBps"] = rates["cold_GBps"], None
        save()
    # In a VM the host's own page cache may still hold evicted files: "cold" is cold for this machine.

    cold_read_s = weights / GB / cold if evicted else 0.0
    slow = cold_read_s > MAX_COLD_READ_S
    if evicted and slow:
        log("slow_disk", f"one cold read of the weights takes {cold_read_s:.0f} s: only pack_unlimited starts cold")

    comfy_ok = os.path.isfile(os.path.join(COMFY, "comfy", "sd.py"))
    base = {"paths": paths, "weights_bytes": weights, "tokenizer": files["tokenizer"],
            "diffusers_config": files["diffusers_config"], "text_encoder_config": files["text_encoder_config"],
            "comfy": COMFY}
    plan = [("pack_unlimited", {"kind": "pack", "budget_gb": 0}, True),
            ("pack_unlimited", {"kind": "pack", "budget_gb": 0}, False),
            ("pack_8GiB", {"kind": "pack", "budget_gb": 8}, True),
            ("pack_8GiB", {"kind": "pack", "budget_gb": 8}, False),
            ("diffusers", {"kind": "diffusers"}, True),
            ("comfyui", {"kind": "comfy"}, True)]
    wanted = {s.strip() for s in os.environ.get("CASES", "").split(",") if s.strip()}
    t_cases = now()
    for name, spec, cold_start in plan:
        start = "cold" if cold_start and evicted and not (slow and name != "pack_unlimited") else "page_cache"
        key = f"{name}_{start}"
        if key in R["cases"] or (wanted and name not in wanted and key not in wanted):
            continue  # a cold case that could not start cold already ran from the page cache
        if spec["kind"] == "comfy" and (SMOKE or not comfy_ok):
            R["cases"][key] = {"skipped": "smoke: ComfyUI's loaders take only full-size Z-Image files" if SMOKE
                               else f"no ComfyUI checkout at COMFY={COMFY}"}
            log(key, R["cases"][key])
            continue
        left = TIME_BUDGET_S - (now() - t_cases)
        need = (cold_read_s if start == "cold" else weights / GB / warm) + (10 if SMOKE else 30)
        if need > left:
            R["cases"][key] = {"skipped": f"time budget: {left:.0f} s left of TIME_BUDGET_S={TIME_BUDGET_S:.0f}, "
                                          f"the case needs about {need:.0f} s"}
            log(key, R["cases"][key])
            continue
        print(f"\n=== {key}", flush=True)
        spec = dict(base, **spec, name=key, reload=cold_start)
        if start == "cold":
            evict_info = evict(weights_files)
        else:
            # a page-cache start has every page resident (a cold case before it may have read only part)
            evict_info = {"resident_found": resident_fraction(weights_files)}
            if evict_info["resident_found"] is None or evict_info["resident_found"] < 0.99:
                read_files(weights_files)
                evict_info["resident_before"] = resident_fraction(weights_files)
        res = run_child(spec, timeout=min(CASE_TIMEOUT_S, max(left, 60)))
        res.update(start=start, page_cache=evict_info)
        if "skipped" not in res:
            res["targets"] = check(res, rates, weights)
        R["cases"][key] = res
        log(f"{key}_targets", res.get("targets", res.get("skipped")))
    log("total_s", round(now() - t_start, 1))
    summary(R, weights)
    save()
    print(f"\nwrote {out_path}")


def summary(R: dict, weights: int) -> None:
    def f(v, fmt="{:.2f}"):
        return "-" if v is None else (("pass" if v else "FAIL") if isinstance(v, bool) else fmt.format(v))

    rr = R["read_rates"]
    print(f"\nweights {weights / GB:.2f} GB; read rate cold {f(rr['cold_GBps'])} GB/s, page cache "
          f"{f(rr['warm_GBps'])} GB/s; {R['res']}x{R['res']}, {R['steps']} steps; targets: first image <= "
          f"{FIRST_FACTOR} x read floor + steady image, reload overhead <= {RELOAD_OVERHEAD_S} s, host RAM <= "
          f"{RAM_FACTOR} x weights")
    head = (f"{'case':28s} {'load':>7s} {'first':>7s} {'steady':>7s} {'floor':>6s} {'target':>7s} {'ok':>4s} "
            f"{'rl load':>7s} {'rl 1st':>7s} {'ovh':>6s} {'ok':>4s} {'RAM GB':>7s} {'xW':>5s} {'ok':>4s}")
    print(head)
    for key, c in R["cases"].items():
        if "skipped" in c or ("error" in c and "first_image_s" not in c):
            print(f"{key:28s} {('skipped: ' + c['skipped']) if 'skipped' in c else 'ERROR ' + c['error'][:90]}")
            continue
        t, rl = c.get("targets", {}), c.get("reload", {})
        print(f"{key:28s} {f(c.get('load_s')):>7s} {f(c.get('first_image_s')):>7s} {f(c.get('steady_image_s')):>7s} "
              f"{f(t.get('read_floor_s')):>6s} {f(t.get('first_image_target_s')):>7s} "
              f"{f(t.get('first_image_pass')):>4s} "
              f"{f(rl.get('load_s')):>7s} {f(rl.get('first_image_s')):>7s} {f(t.get('reload_overhead_s')):>6s} "
              f"{f(t.get('reload_pass')):>4s} {f(c.get('host', {}).get('peak_copies_GB')):>7s} "
              f"{f(t.get('host_ratio')):>5s} {f(t.get('host_pass')):>4s}"
              + (f"  ERROR {c['error'][:60]}" if "error" in c else ""))


if __name__ == "__main__":
    if os.environ.get("LOAD_PATH_CHILD"):
        child_main(json.loads(os.environ["LOAD_PATH_CHILD"]))
    else:
        main()
