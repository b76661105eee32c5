"""Where each component lives for a VRAM budget, as a printable plan.

This is the whole-component planner: each of the transformer, text encoder and VAE is either
resident on the GPU or swapped in for its own step and freed after it. A budget that cannot
hold the transformer and its working memory is an error that states the minimum.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from .errors import ZImageError

GiB = 2**30
# Working memory of one 1024x1024 image: diffusers' all-on-GPU run peaks 2.5 GiB above its
# weights on an H100 (shared/FACTS.md); scaled with pixels x batch.
WORK_BYTES_1024 = int(2.5 * GiB)
ENCODE_WORK_BYTES = int(0.25 * GiB)  # Qwen3-4B activations for a 512-token prompt
CUDA_CONTEXT_BYTES = int(0.5 * GiB)  # what nvidia-smi counts before the first allocation
AUTO_MARGIN_BYTES = 1 * GiB  # left free under "automatic" for the desktop and other apps


COMPONENTS = ("transformer", "text_encoder", "vae")


class Placement(str, Enum):
    RESIDENT = "resident"  # on the GPU from load until the model is released
    SWAPPED = "swapped"  # copied to the GPU for its step, freed right after
    CPU = "cpu"  # no GPU: runs where it is


@dataclass(frozen=True)
class ComponentPlan:
    device: str
    budget_bytes: int
    transformer: Placement
    text_encoder: Placement
    vae: Placement
    sizes: dict[str, int] = field(default_factory=dict)
    work_bytes: int = WORK_BYTES_1024

    def phase_bytes(self) -> dict[str, int]:
        """GPU bytes in use during each phase: what is resident plus the phase's own component
        (if swapped in) and working memory."""
        resident = sum(self.sizes.get(n, 0) for n in COMPONENTS if getattr(self, n) == Placement.RESIDENT)
        def own(n: str) -> int:
            return self.sizes.get(n, 0) if getattr(self, n) == Placement.SWAPPED else 0
        base = CUDA_CONTEXT_BYTES + resident
        return {"encode": base + own("text_encoder") + ENCODE_WORK_BYTES,
                "denoise": base + own("transformer") + self.work_bytes,
                "decode": base + own("vae") + self.work_bytes}

    @property
    def peak_bytes(self) -> int:
        return max(self.phase_bytes().values())

    def summary(self) -> str:
        if self.device == "cpu":
            return "CPU run: every component stays in system RAM (memory-mapped from its file)"
        parts = [f"{n.replace('_', ' ')} {getattr(self, n).value} ({self.sizes.get(n, 0) / GiB:.1f} GB)"
                 for n in COMPONENTS]
        return (f"budget {self.budget_bytes / GiB:.1f} GB on {self.device}: " + ", ".join(parts)
                + f"; expected peak {self.peak_bytes / GiB:.1f} GB")


def plan_components(sizes: dict[str, int], device: torch.device | str, budget_gb: float = 0.0,
                    free_bytes: int | None = None) -> ComponentPlan:
    """Choose resident or swapped per component. `budget_gb` 0 means free VRAM minus a margin;
    `free_bytes` is what the GPU has free now (asked of the GPU when None)."""
    device = torch.device(device)
    if device.type == "cpu":
        return ComponentPlan("cpu", 0, Placement.CPU, Placement.CPU, Placement.CPU, dict(sizes))
    if budget_gb < 0:
        raise ZImageError("the VRAM budget cannot be negative", where="loader input 'vram_budget_gb'",
                          found=str(budget_gb), fix="use 0 for automatic, or the GB the model may use.")
    if budget_gb > 0:
        budget = int(budget_gb * GiB)
    else:
        if free_bytes is None:
            free_bytes, _ = torch.cuda.mem_get_info(device)
        budget = free_bytes - AUTO_MARGIN_BYTES + CUDA_CONTEXT_BYTES
    t, te, v = sizes["transformer"], sizes["text_encoder"], sizes["vae"]
    R, S = Placement.RESIDENT, Placement.SWAPPED
    # Most resident first: the transformer runs every step, the text encoder once per new prompt.
    for choice in ((R, R, R), (R, S, R), (R, S, S), (S, S, S)):
        plan = ComponentPlan(str(device), budget, *choice, sizes=dict(sizes))
        if plan.peak_bytes <= budget:
            return plan
    raise ZImageError(
        "the VRAM budget is too small to hold the transformer", where="loader input 'vram_budget_gb'",
        expected=f"at least {plan.peak_bytes / GiB:.1f} GB (transformer {t / GiB:.1f} GB + working memory "
                 f"{WORK_BYTES_1024 / GiB:.1f} GB + CUDA context)",
        found=f"{budget / GiB:.1f} GB" + (" free" if budget_gb == 0 else ""),
        fix=f"raise vram_budget_gb to {plan.peak_bytes / GiB:.1f} or more, or close other GPU programs "
            f"(the text encoder, {te / GiB:.1f} GB, and the VAE, {v / GiB:.1f} GB, are already swapped in one at "
            "a time).")


def device_copy(module: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """A copy of `module` whose tensors live on `device`; the original (memory-mapped) stays as it is.

    If copying fails half-way (out of memory), what was already copied is freed before the
    error goes on, so nothing is left behind on the GPU.
    """
    memo: dict[int, object] = {}
    try:
        for t in list(module.parameters()) + list(module.buffers()):
            if id(t) in memo:
                continue
            moved = t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else t.dtype,
                         non_blocking=False)
            memo[id(t)] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
        return copy.deepcopy(module, memo)
    except BaseException:
        memo.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise
