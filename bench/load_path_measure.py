"""What every case process of load_path.py shares: its results (Case), the device made ready before any
timer, and the measurements all three engines make in the same order (first_steady_reload)."""
from __future__ import annotations

import contextlib
import gc
import json
import statistics
from typing import Any, Callable

from load_path_memory import HostMemory, rss_anon
from load_path_settings import GB, MiB, now


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


def device_sync(torch, cuda: bool) -> Callable[[], None]:
    """Waits for the GPU's queued work, so that a timer read after it counts that work."""
    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()
    return sync


def free_memory(torch, cuda: bool) -> None:
    """After a model is dropped: its reference cycles collected, the CUDA allocator's freed blocks
    given back, so that the reload starts from what a fresh load would find."""
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def first_steady_reload(c: Case, dev: dict, load: Callable[[dict], Any], image: Callable[..., float],
                        free: Callable[[], None], *, release: Callable[[Any], None] | None = None,
                        steady: tuple[int, ...] = (1, 2), list_steady: bool = False, phases: bool = False,
                        around_first: Callable[[dict], Any] | None = None,
                        on_first: Callable[[Any], None] | None = None) -> None:
    """The measurements of every engine, in one process: the first image (load + an image of
    PROMPTS[0], host memory sampled), steady images (one new prompt each, median), then, where the
    spec asks for a reload, the parts dropped and a first image again from the same files
    (overhead: its seconds beyond the steady image) and one more steady image.

    load(into) returns the loaded parts and says its own steps into `into`; image(loaded, i) returns
    the seconds of an image of PROMPTS[i] and, given a dict as third argument (phases=True), fills
    it with where those seconds went. release(loaded) runs while the parts are still referenced,
    free() once they are not. around_first(into), a context manager, wraps each first image with
    its host report (figures taken before and after it); on_first(loaded) runs after the first one
    only."""

    def first(into: dict):
        with around_first(into) if around_first else contextlib.nullcontext():
            with HostMemory(dev["pinned"], dev["pinned_in_anon"]) as mem:
                t0 = now()
                loaded = load(into)
                c.say("load_s", round(now() - t0, 3), into)
                split: dict = {}
                if phases:
                    image(loaded, 0, split)
                else:
                    image(loaded, 0)
                c.say("first_image_s", round(now() - t0, 3), into)
                if phases:
                    c.say("first_image_phases", split, into)
            c.say("host", mem.report(c.spec["weights_bytes"]), into)
        return loaded

    loaded = first(c.r)
    if on_first:
        on_first(loaded)
    times = [image(loaded, i) for i in steady]
    if list_steady:
        c.say("steady_images_s", [round(x, 3) for x in times])
    c.say("steady_image_s", round(statistics.median(times), 3))
    if not c.spec["reload"]:
        return
    if release:
        release(loaded)
    del loaded  # this frame's reference would otherwise keep the first parts through the reload
    free()
    reload = c.r["reload"] = {}
    loaded = first(reload)
    c.say("overhead_s", round(reload["first_image_s"] - c.r["steady_image_s"], 3), reload)
    c.say("steady_image_s", round(image(loaded, steady[-1] + 1), 3), reload)
