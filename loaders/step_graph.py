"""Denoising steps replayed from a CUDA graph.

With every block resident on one GPU, each step of a run launches the same ~700 kernels and
memsets on tensors of the same shapes and addresses. Launched one by one, the GPU waits a few
microseconds between each and longer wherever the host falls behind (an H100 trace of an eager
1024x1024 image: busy 96% of the time). A CUDA graph launches them as one unit.

The run's first step runs eagerly: it warms what a capture cannot do (the caption refiner's first
call, cuDNN plans, Triton compilation, torch.compile's graphs). The second step is captured on a
side stream, without the device-wide synchronisation `torch.cuda.graph` does first: the GPU is
still working through the first step's queue while the host records, so the capture costs
little. Every later step copies its inputs into the graph's and replays it. The graph and the
memory it holds (a step's activations, in a pool of its own) go when the run ends.

A capture that fails (a kernel library that cannot be captured, say) leaves the run eager and
says why (`StepGraph.failed`). Streamed blocks never replay a graph: their hooks change which
buffer each block reads at every call.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepGraph:
    """`velocity(x, t)` with the first call eager, the second captured and every later one replayed
    (see the module's note). The same shapes at every call: one denoise run."""

    def __init__(self, velocity: Velocity, device: torch.device):
        self.velocity, self.device = velocity, torch.device(device)
        self.calls = 0
        self.replays = 0
        self.failed: str | None = None
        self._graph = None
        self._x = self._t = self._out = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self._graph is None:
            if self.calls == 1 or self.failed is not None:
                return self.velocity(x, t)
            self._capture(x, t)
            if self._graph is None:
                return self.velocity(x, t)
        self._x.copy_(x)
        self._t.copy_(t)
        self._graph.replay()
        self.replays += 1
        # the caller may keep it past the next replay, which overwrites the graph's output
        return self._out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> None:
        try:
            self._x, self._t = x.clone(), t.clone()  # the graph's inputs, outside its pool
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                # thread-local: a ComfyUI server thread touching CUDA must not break the capture
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = self.velocity(self._x, self._t)
                finally:
                    try:
                        graph.capture_end()
                    except RuntimeError:
                        pass  # the capture already failed: that error is the one to report
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._graph, self._out = graph, out
        except Exception as e:  # noqa: BLE001 - any failure to capture means: stay eager
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self.close()

    def close(self) -> None:
        """Free the graph and its memory pool (the end of the run)."""
        self._graph = self._x = self._t = self._out = None

    def summary(self) -> str:
        if self.failed is not None:
            return f"CUDA graph failed, steps ran eager ({self.failed})"
        if self.replays:
            return f"CUDA graph: {self.replays} of {self.calls} steps replayed"
        return "CUDA graph: not used (fewer than 2 steps)"
