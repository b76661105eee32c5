"""The highest memory nvidia-smi reports per GPU while a `with` block runs (MiB): what the driver
counts against the process, CUDA context included, beside PyTorch's own figures."""
from __future__ import annotations

import subprocess

from poller import Poller


class SmiPeak(Poller):
    def __enter__(self) -> "SmiPeak":
        self.peak: list[int] = []  # MiB, one entry per GPU
        return super().__enter__()

    def _sample(self) -> None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout.split()
            used = [int(v) for v in out]
            self.peak = [max(p, u) for p, u in zip(self.peak or [0] * len(used), used)]
        except (OSError, ValueError, subprocess.SubprocessError):
            pass  # no nvidia-smi here: no figure

    def gib(self, gpu: int = 0) -> float:
        return round(self.peak[gpu] / 1024, 2) if len(self.peak) > gpu else 0.0
