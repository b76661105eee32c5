"""Small functions compiled once into fused GPU kernels, eager wherever that is not possible.

Eager PyTorch runs elementwise math as one kernel per operation, each a full pass over memory;
torch.compile fuses a short function into one or two kernels. The functions here are compiled
on first use with a CUDA tensor, with dynamic shapes (one graph for every size) or static ones
(a graph per size, faster where the sizes are few). Without a compiler (no Triton, e.g. many
Windows installs), if compiling or running the compiled form fails, or on a CPU, the function
runs eagerly: same math, more passes. Hand-written Triton kernels go through `Guarded`, and are
launched inside `torch.cuda.device(<their tensors' device>)`: Triton launches on the current
device and its current stream, which is not where the tensors are when a plan spreads blocks (or
puts the VAE) over several GPUs.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


class Fused:
    """`fn` compiled for CUDA inputs on first use; eager on a CPU and once compiling has failed. The
    first argument (a tensor, or a list of them) says where the call runs."""

    def __init__(self, fn: Callable, dynamic: bool = True):
        self.fn, self.dynamic = fn, dynamic
        self._compiled: Callable | None = None
        self._failed = False

    def __call__(self, *args):
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        if first.device.type == "cuda" and not self._failed:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(self.fn, dynamic=self.dynamic, fullgraph=True)
                return self._compiled(*args)
            except torch.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001  (no compiler here: eager from now on)
                self._failed = True
        return self.fn(*args)


class Guarded:
    """`fn`, which launches hand-written Triton kernels, until it fails once (a GPU or install
    Triton cannot build for): from then on, and after it, None, and the caller runs PyTorch's
    own path. Out-of-memory errors go on to the caller."""

    def __init__(self, fn: Callable):
        self.fn, self.failed = fn, False

    def __call__(self, *args):
        if self.failed:
            return None
        try:
            return self.fn(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001  (Triton could not build or launch it here)
            self.failed = True
            return None
