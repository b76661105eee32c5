"""load_path.py's settings (env vars) and targets, shared by the parent and the case processes: both
import them from here, so a child never has to import the entry script a second time."""
from __future__ import annotations

import os
import tempfile
import time

from full_size_files import OUT, ROOT, TOKENIZER, WORK  # noqa: F401  (also puts the repo on sys.path)

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
