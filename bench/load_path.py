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

import json
import os
import subprocess
import sys
import tempfile

# The modules beside this script, whichever directory it is started from (a case's process runs it again).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from load_path_memory import evict, proc_bytes, read_files, resident_fraction  # noqa: E402
from load_path_settings import (  # noqa: E402  (full_size_files, imported there, puts the repo on sys.path)
    BUFFER,
    CASE_TIMEOUT_S,
    COMFY,
    FIRST_FACTOR,
    GB,
    MAX_COLD_READ_S,
    OUT,
    RAM_FACTOR,
    READ_LIMIT_S,
    RELOAD_OVERHEAD_S,
    RES,
    SMOKE,
    STEPS,
    TIME_BUDGET_S,
    MiB,
    now,
)

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
    log("MemTotal_GB", round(proc_bytes("/proc/meminfo", ("MemTotal",))["MemTotal"] / GB, 1))
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
        # a case's process (run_child): the cases' modules are imported here only
        from load_path_cases import child_main

        child_main(json.loads(os.environ["LOAD_PATH_CHILD"]))
    else:
        main()
