"""The highest memory nvidia-smi reports per GPU while a `with` block runs (MiB): what the driver
counts against the process, CUDA context included, beside PyTorch's own figures."""
from __future__ import annotations

import subprocess
import threading
import time


class SmiPeak:
    def __enter__(self) -> "SmiPeak":
        self.peak: list[int] = []  # MiB, one entry per GPU
        self._stop = False

        def poll():
            while not self._stop:
                try:
                    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                         capture_output=True, text=True, timeout=5).stdout.split()
                    used = [int(v) for v in out]
                    self.peak = [max(p, u) for p, u in zip(self.peak or [0] * len(used), used)]
                except (OSError, ValueError, subprocess.SubprocessError):
                    pass  # no nvidia-smi here: no figure
                time.sleep(0.05)
        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()

    def gib(self, gpu: int = 0) -> float:
        return round(self.peak[gpu] / 1024, 2) if len(self.peak) > gpu else 0.0
