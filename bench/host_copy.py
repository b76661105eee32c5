"""A decoded image's way to the CPU: `.cpu()` (into fresh pageable memory) against
pinned_memory.HostStage (a kept page-locked buffer, then a CPU copy), wall time, median of 20, for
1024² and 2048² float32 images.

    python bench/host_copy.py        # env: OUT (results folder)
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaders.pinned_memory import HostStage  # noqa: E402

OUT = os.environ.get("OUT", "/tmp")


def wall_ms(fn, x, reps=20) -> float:
    ts = []
    for _ in range(reps):
        y = x * 1.0  # a fresh result on the GPU, as a decode leaves it
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn(y)
        ts.append((time.perf_counter() - t) * 1e3)
        del out
    return round(statistics.median(ts), 3)


def main():
    r = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    to_host = HostStage().copy  # as the VAE's handle keeps one
    for side in (1024, 2048):
        x = torch.rand(1, side, side, 3, device="cuda")
        to_host(x)  # the kept buffer, allocated once
        r[f"{side}"] = {"cpu_ms": wall_ms(lambda t: t.cpu(), x), "to_host_ms": wall_ms(to_host, x),
                        "equal": bool(torch.equal(to_host(x), x.cpu()))}
        print(side, r[f"{side}"], flush=True)
    with open(os.path.join(OUT, "host_copy.json"), "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    main()
