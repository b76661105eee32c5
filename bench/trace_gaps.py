"""Where a streamed step's time goes, read from a torch.profiler chrome trace (the trace_<label>.json.gz
that `streaming_budgets.py PROFILE=<label>` writes): each GPU stream's busy share of the window,
host-to-device copies (bytes, time, achieved rate), the idle gaps on the busiest copy stream and on
the compute stream with what ran beside them, and the synchronising runtime calls on the CPU.

    python bench/trace_gaps.py trace_8GiB_bf16.json.gz [...]   # prints a report, writes <trace>.gaps.json

Pure Python: it runs on a CPU from a trace copied back from the GPU machine.
"""
from __future__ import annotations

import bisect
import gzip
import json
import sys
from collections import Counter, defaultdict

GAP_US = 20.0  # shorter idle stretches are launch spacing, not waiting
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMalloc",
              "cudaFree", "cudaHostAlloc", "cudaHostRegister", "cudaHostUnregister", "cudaMemGetInfo",
              "cudaStreamWaitEvent", "cudaMemcpyAsync", "cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")


def load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X" and "dur" in e]


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def gaps(busy: list[tuple[float, float]], start: float, end: float) -> list[tuple[float, float]]:
    out, t = [], start
    for a, b in busy:
        if a - t > GAP_US:
            out.append((t, a))
        t = max(t, b)
    if end - t > GAP_US:
        out.append((t, end))
    return out


def covering(events: list[dict], starts: list[float], t: float) -> str:
    """Name of the event running at time t (the latest one started before t that is still running)."""
    i = bisect.bisect_right(starts, t) - 1
    while i >= 0 and i > len(starts) - 10_000:
        e = events[i]
        if e["ts"] + e["dur"] >= t:
            return e["name"][:60]
        if t - e["ts"] > 50_000:
            break
        i -= 1
    return "-"


def analyse(path: str) -> dict:
    ev = load(path)
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    cpu_rt = sorted((e for e in ev if e.get("cat") == "cuda_runtime" or e.get("cat") == "cuda_driver"),
                    key=lambda e: e["ts"])
    if not gpu:
        raise SystemExit(f"{path}: no GPU events")
    start = min(e["ts"] for e in gpu)
    end = max(e["ts"] + e["dur"] for e in gpu)
    window = end - start
    by_stream: dict = defaultdict(list)
    for e in gpu:
        by_stream[e.get("args", {}).get("stream", -1)].append(e)
    streams = {}
    for s, es in by_stream.items():
        busy = union([(e["ts"], e["ts"] + e["dur"]) for e in es])
        kinds = Counter(e["cat"] for e in es)
        streams[s] = {"events": len(es), "busy_ms": round(sum(b - a for a, b in busy) / 1e3, 3),
                      "busy_share": round(sum(b - a for a, b in busy) / window, 3), "kinds": dict(kinds)}
    h2d = [e for e in gpu if e["cat"] == "gpu_memcpy" and "HtoD" in e["name"]]
    compute_stream = max(by_stream, key=lambda s: sum(1 for e in by_stream[s] if e["cat"] == "kernel"))
    # the side stream carrying most host-to-device copies (None when everything ran on one stream)
    copy_stream = Counter(e.get("args", {}).get("stream") for e in h2d
                          if e.get("args", {}).get("stream") != compute_stream).most_common(1)
    copy_stream = copy_stream[0][0] if copy_stream else None
    nbytes = sum(e.get("args", {}).get("bytes", 0) for e in h2d)
    h2d_busy = union([(e["ts"], e["ts"] + e["dur"]) for e in h2d])
    h2d_ms = sum(b - a for a, b in h2d_busy) / 1e3
    big = [e for e in h2d if e.get("args", {}).get("bytes", 0) >= 1 << 20]
    rates = sorted(e["args"]["bytes"] / e["dur"] / 1e3 for e in big if e["dur"] > 0)  # GB/s
    report = {"trace": path, "window_ms": round(window / 1e3, 3), "streams": streams,
              "copy_stream": copy_stream, "compute_stream": compute_stream,
              "h2d": {"GB": round(nbytes / 1e9, 3), "busy_ms": round(h2d_ms, 3),
                      "GBps_while_copying": round(nbytes / 1e6 / h2d_ms, 1) if h2d_ms else None,
                      "GBps_over_window": round(nbytes / 1e3 / window, 1),
                      "median_GBps_per_copy_of_1MiB_or_more": round(rates[len(rates) // 2], 1) if rates else None,
                      "copies": len(h2d)}}
    kernels = sorted((e for e in by_stream.get(compute_stream, []) if e["cat"] == "kernel"), key=lambda e: e["ts"])
    kstarts = [e["ts"] for e in kernels]
    rstarts = [e["ts"] for e in cpu_rt]
    for name, s in (("copy", copy_stream), ("compute", compute_stream)):
        if s is None:
            continue
        busy = union([(e["ts"], e["ts"] + e["dur"]) for e in by_stream[s]])
        g = gaps(busy, start, end)
        beside = Counter()
        for a, b in g:
            mid = (a + b) / 2
            other = covering(kernels, kstarts, mid) if name == "copy" else covering(cpu_rt, rstarts, mid)
            beside[other] += b - a
        report[f"{name}_stream_idle"] = {
            "gaps": len(g), "ms": round(sum(b - a for a, b in g) / 1e3, 3),
            "longest_ms": sorted((round((b - a) / 1e3, 3) for a, b in g), reverse=True)[:8],
            "beside_ms": {k: round(v / 1e3, 3) for k, v in beside.most_common(10)}}
    calls = defaultdict(lambda: [0, 0.0])
    for e in cpu_rt:
        if e["name"] in SYNC_CALLS:
            calls[e["name"]][0] += 1
            calls[e["name"]][1] += e["dur"]
    report["runtime_calls"] = {k: {"n": n, "ms": round(t / 1e3, 3)} for k, (n, t) in sorted(calls.items())}
    return report


def main():
    for path in sys.argv[1:]:
        r = analyse(path)
        with open(path.replace(".json.gz", "").replace(".json", "") + ".gaps.json", "w") as f:
            json.dump(r, f, indent=1)
        print(json.dumps(r, indent=1), flush=True)


if __name__ == "__main__":
    main()
