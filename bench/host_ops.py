"""How long small host-side tensor operations take right after the GPU finished a long queue, as
they do between a run's last step and its decode: a 1024x1024 latent's divide and add, a float32
to bf16 cast of it, a caption-sized comparison and an image-sized copy, with PyTorch's thread count
as it is and with one thread. A profile of an image (bench/NOTES.md session 8) had them at 2-8 ms
each while the GPU idled.

    python bench/host_ops.py        # env: OUT (results folder)
"""
from __future__ import annotations

import json
import os
import statistics
import time

import torch

OUT = os.environ.get("OUT", ".")
CUDA = torch.cuda.is_available()


def after_gpu_work(fn, reps: int = 5) -> float:
    """Median ms of `fn` on the host, each call right after ~0.2 s of GPU work was waited for."""
    ts = []
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) if CUDA else None
    for _ in range(reps):
        if CUDA:
            for _ in range(100):
                a @ a
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return round(statistics.median(ts) * 1e3, 3)


def main():
    cpu_max = None
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            cpu_max = f.read().strip()
    except OSError:
        pass
    r: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
               "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "cgroup_cpu_max": cpu_max,
               "threads": torch.get_num_threads()}
    latent = torch.randn(1, 16, 128, 128)
    caption = torch.randn(128, 2560)
    caption2 = caption.clone()
    image = torch.rand(1, 1024, 1024, 3)
    ops = {"latent_div_add": lambda: latent / 0.3611 + 0.1159,
           "latent_to_bf16": lambda: latent.to(torch.bfloat16),
           "caption_equal": lambda: torch.equal(caption, caption2),
           "image_clone": lambda: image.clone()}
    for threads in (r["threads"], 1):
        torch.set_num_threads(threads)
        r[f"ms_with_{threads}_threads"] = {k: after_gpu_work(fn) for k, fn in ops.items()}
    torch.set_num_threads(r["threads"])
    print(json.dumps(r, indent=1), flush=True)
    with open(os.path.join(OUT, "host_ops.json"), "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
