"""Denoising steps replayed from a CUDA graph, kept from one run to the next.

With every block resident on one GPU, each step launches the same ~500-800 kernels on tensors of
the same shapes and addresses. A CUDA graph launches them as one unit, with no host work between
them.

Capturing costs about as much host time as an eager step and leaves the GPU idle meanwhile:
captured anew in every run, a graph cost an eager fp8 image on an H100 60 ms more than it saved
(bench/NOTES.md). So the graph is kept (on the transformer's handle) and replayed by every later
run with the same key: the same model build, latent shape, CFG scale, attention backend, compile
setting and caption features. A run whose captions are new (the context refiner computes their
features at its first step, caption_refine) runs eagerly: a new prompt each image would pay for a
capture every time. A run with the last run's captions and no graph for its key runs its first
step eagerly, which also warms what a capture cannot do (cuDNN plans, Triton and torch.compile
builds), and captures at its second. The graph holds a step's activations in a memory pool of its own until it
is closed: MemoryPlan.replays_steps allows it only where the budget has room for that beside every
phase's peak. A capture that fails (a kernel library that cannot be captured, say) leaves the runs
eager and says why.
"""
from __future__ import annotations

from collections.abc import Callable, Hashable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StepGraph:
    """The captured step of the last key (see the module's note). `start` before each run, then
    call it as the velocity."""

    def __init__(self):
        self.failed: str | None = None  # why the capture for `_failed_key` failed: not tried again
        self._failed_key: Hashable = None
        self.calls = self.replays = 0  # this run's
        self.captures = 0  # captures tried (for tests and reports)
        self._velocity: Velocity | None = None
        self._device = torch.device("cpu")
        self._key: Hashable = None
        self._next_key: Hashable = None  # this run's
        self._may_capture = False  # this run's
        self._graph = None
        self._x = self._t = self._out = None
        self._kept: Velocity | None = None  # the captured one: its model and captions outlive the graph

    def start(self, velocity: Velocity, device: torch.device, key: Hashable, fresh: bool = False) -> StepGraph:
        """A run: `velocity` and everything it depends on besides x and t named by `key`; `fresh`:
        its first step computes what later steps reuse (new captions' refined features), so it may
        not replay an earlier graph, and does not capture one."""
        if fresh or key != self._key:
            self.close()
        self._may_capture = not fresh
        if key != self._failed_key:
            self.failed = None
        self._velocity, self._device, self._next_key = velocity, torch.device(device), key
        self.calls = self.replays = 0
        return self

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self._graph is None:
            if self.failed is None and self._may_capture and self.calls > 1:
                self._capture(x, t)
            if self._graph is None:
                return self._velocity(x, t)
        self._x.copy_(x)
        self._t.copy_(t)
        self._graph.replay()
        self.replays += 1
        # the caller may keep it past the next replay, which overwrites the graph's output
        return self._out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor) -> None:
        self.captures += 1
        try:
            self._x, self._t = x.clone(), t.clone()  # the graph's inputs, outside its pool
            graph = torch.cuda.CUDAGraph()
            side = torch.cuda.Stream(self._device)
            # no device-wide synchronisation (torch.cuda.graph does one): the GPU goes on with the
            # first step's queue while the host records
            side.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(side):
                # thread-local: a ComfyUI server thread touching CUDA must not break the capture
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    out = self._velocity(self._x, self._t)
                finally:
                    try:
                        graph.capture_end()
                    except RuntimeError:
                        pass  # the capture already failed: that error is the one to report
            torch.cuda.current_stream(self._device).wait_stream(side)
            self._graph, self._out = graph, out
            self._key, self._kept = self._next_key, self._velocity
        except Exception as e:  # noqa: BLE001 - any failure to capture means: stay eager
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            self._failed_key = self._next_key
            self.close()

    def close(self) -> None:
        """Free the graph and its memory pool (a new key, a rebuilt or released model)."""
        self._graph = self._x = self._t = self._out = self._kept = None
        self._key = None

    def summary(self) -> str:
        if self.failed is not None:
            return f"CUDA graph failed, steps ran eager ({self.failed})"
        if self.replays:
            return f"CUDA graph: {self.replays} of {self.calls} steps replayed"
        return "CUDA graph: none yet (captured in the next run with this prompt)"
