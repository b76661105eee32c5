"""What nvidia-smi says of the GPU's clocks and power while a `with` block runs: whether a timed
run held its clocks or was slowed by the power cap (a GEMM-bound step at 700 W may be)."""
from __future__ import annotations

import statistics
import subprocess

from poller import Poller

# nvidia-smi's clocks_event_reasons bits (nvml.h, nvmlClocksEventReason*)
POWER_CAP = 0x4
THERMAL = 0x20 | 0x40  # software and hardware thermal slowdown
FIELDS = "clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


class SmiClocks(Poller):
    period = 0.1

    def __init__(self, gpu: int = 0):
        self.gpu = gpu

    def __enter__(self) -> "SmiClocks":
        self.samples: list[tuple[float, float, float, int]] = []
        return super().__enter__()

    def _sample(self) -> None:
        try:
            out = subprocess.run(["nvidia-smi", "-i", str(self.gpu), f"--query-gpu={FIELDS}",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5).stdout
            mhz, watts, temp, reasons = (v.strip() for v in out.strip().split(","))
            self.samples.append((float(mhz), float(watts), float(temp), int(reasons, 16)))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass  # no nvidia-smi (or a field this driver lacks): no figures

    def summary(self) -> dict:
        if not self.samples:
            return {}
        mhz, watts, temp, reasons = zip(*self.samples)
        return {"sm_clock_MHz_median": statistics.median(mhz), "sm_clock_MHz_min": min(mhz),
                "power_W_median": statistics.median(watts), "temperature_C_max": max(temp),
                "power_capped_fraction": round(sum(bool(r & POWER_CAP) for r in reasons) / len(reasons), 2),
                "thermal_slowdown_fraction": round(sum(bool(r & THERMAL) for r in reasons) / len(reasons), 2),
                "samples": len(self.samples)}
