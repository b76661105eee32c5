"""Regional compilation: each repeated transformer block's `forward` goes through torch.compile.

Only `forward` is compiled, not the module call, so the streamer's forward hooks (which bind a
block's weights to a device buffer before it runs and release them after) stay eager and outside
the graph: a streamed block's parameters are swapped through `.data`, which changes neither
shape, dtype nor device, so the compiled graph's guards still hold and nothing recompiles.
All blocks of one kind share one compiled graph (their parameters are graph inputs), so the 30
layers cost one compile, the noise refiners one more. A new resolution compiles once more with a
dynamic token count; later resolutions reuse that graph. The context refiner stays eager: it runs
once per caption (caption_refine).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn

from .model_sizes import transformer_block_names
from .placement import ONCE_PER_CAPTION

# Enough for the three block kinds (noise refiner, context refiner, layer), a static and a
# dynamic graph each, with room for the attention backends a user switches between.
_CACHE_SIZE = 64


def _counted_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@dataclass
class CompileReport:
    graphs: int  # graphs compiled during this run (0: all reused)
    seconds: float  # wall time of the first call in this run (compile included when graphs > 0)


@contextmanager
def compiled(transformer: nn.Module, enabled: bool, backend: str = "inductor") -> Iterator[CompileReport]:
    """Run `transformer` with its blocks compiled (enabled) or eager, for the `with` block only.

    The compiled wrappers are kept on the blocks (as `_zimage_compiled`) so the next run reuses
    them; torch's own cache keeps the graphs."""
    report = CompileReport(0, 0.0)
    blocks = [transformer.get_submodule(n) for n in transformer_block_names(transformer)
              if not n.startswith(ONCE_PER_CAPTION)]
    if not enabled:
        yield report
        return
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, _CACHE_SIZE)
    before = _counted_graphs()
    for b in blocks:
        fn = b.__dict__.get("_zimage_compiled")
        if fn is None or fn[0] != backend:
            b._zimage_compiled = (backend, torch.compile(type(b).forward, backend=backend))
        b.forward = _bound(b._zimage_compiled[1], b)
    first = _FirstCall(transformer)
    try:
        yield report
    finally:
        first.remove()
        for b in blocks:
            b.__dict__.pop("forward", None)
        report.graphs = _counted_graphs() - before
        report.seconds = first.seconds


def _bound(fn, module: nn.Module):
    def forward(*args, **kwargs):
        return fn(module, *args, **kwargs)
    return forward


class _FirstCall:
    """Wall time of the transformer's first call (where compilation happens)."""

    def __init__(self, transformer: nn.Module):
        self.seconds, self._start = 0.0, None
        self._handles = [transformer.register_forward_pre_hook(self._before),
                         transformer.register_forward_hook(self._after)]

    def _before(self, module, args):
        if self._start is None:
            self._start = time.perf_counter()

    def _after(self, module, args, output):
        if self.seconds == 0.0 and self._start is not None:
            self.seconds = time.perf_counter() - self._start
            self._handles[0].remove()
            self._handles[1].remove()

    def remove(self):
        for h in self._handles:
            h.remove()
