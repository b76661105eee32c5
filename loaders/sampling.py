"""The denoising loop: noise, sigma schedules, Euler and res_multistep, CFG, progress, interrupt.

Latents here are in the model's space; LATENT dicts carry ComfyUI's convention (the VAE's raw
latent, `process_in`/`process_out` of the Flux latent format), converted at the edges.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch

from .errors import ZImageError

LATENT_CHANNELS = 16
# The Flux VAE's latent normalisation (diffusers' scaling_factor / shift_factor).
SCALE, SHIFT = 0.3611, 0.1159


class SamplerName(str, Enum):
    EULER = "euler"  # diffusers' FlowMatchEulerDiscreteScheduler, its schedule and timestep arithmetic
    RES_MULTISTEP = "res_multistep"  # ComfyUI's template: res_multistep with the "simple" schedule


def latent_to_model(latent: torch.Tensor) -> torch.Tensor:
    return (latent - SHIFT) * SCALE


def model_to_latent(x: torch.Tensor) -> torch.Tensor:
    """On the tensor's own device. The divisor is a tensor there: PyTorch's CUDA division by a
    Python number multiplies by its reciprocal, which can round differently from the CPU's division."""
    return x / torch.full((), SCALE, dtype=x.dtype, device=x.device) + SHIFT


def make_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """ComfyUI's and diffusers' noise: float32 normal draws from a CPU generator seeded with `seed`."""
    g = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


def _shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sigmas(sampler: SamplerName, steps: int, shift: float, denoise: float = 1.0) -> torch.Tensor:
    """steps + 1 float32 sigmas ending in 0. denoise < 1 keeps the last steps of a longer
    schedule, as ComfyUI's KSampler does."""
    total = int(steps / denoise) if denoise < 1.0 else steps
    if sampler == SamplerName.EULER:
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        # diffusers' Z-Image default: linspace(1, 1/N, N) before the shift
        sched.set_timesteps(sigmas=torch.linspace(1.0, 1 / total, total).tolist(), device="cpu")
        full = sched.sigmas.to(torch.float32)
    else:
        # ComfyUI: 1000 discrete sigmas of the shifted flow, "simple" picks every 1000/N-th.
        table = _shifted(torch.arange(1, 1001, dtype=torch.float32) / 1000, shift)
        stride = len(table) / total
        full = torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(total)] + [0.0])
    return full[-(steps + 1):].clone()


def timestep(sampler: SamplerName, sigma: torch.Tensor) -> torch.Tensor:
    """The model's time input (1 = clean) in each convention's own float arithmetic."""
    if sampler == SamplerName.EULER:
        return (1000 - sigma * 1000) / 1000
    return 1.0 - sigma


@dataclass
class StepHooks:
    """What the loop calls around each step: `check_interrupt` raises to stop; `on_step(i, total,
    denoised)` reports progress and a preview."""
    check_interrupt: Callable[[], None] = lambda: None
    on_step: Callable[[int, int, torch.Tensor], None] = lambda i, n, x0: None


Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def validate(steps: int, height: int, width: int, denoise: float) -> None:
    if steps < 1:
        raise ZImageError("steps must be at least 1", where="sampler input 'steps'", found=str(steps),
                          fix="set steps to 8 or 9 for Z-Image-Turbo.")
    if height % 16 or width % 16:
        raise ZImageError("image height and width must be multiples of 16", where="the LATENT input",
                          found=f"{width}x{height} pixels",
                          fix=f"use {width // 16 * 16 or 16}x{height // 16 * 16 or 16} "
                              "(the VAE halves 8x and the transformer patches 2x2).")
    if not 0.0 < denoise <= 1.0:
        raise ZImageError("denoise must be in (0, 1]", where="sampler input 'denoise'", found=str(denoise),
                          fix="use 1.0 for text-to-image, less for image-to-image.")


@dataclass
class Start:
    """Where a run begins: model-space `x` and the `sig`mas (on the run's device), and the sigmas
    as host floats (`levels`) to branch on without a sync."""
    x: torch.Tensor
    sig: torch.Tensor
    levels: list[float]


@torch.no_grad()
def start(latent: torch.Tensor, seed: int, steps: int, sampler: SamplerName | str, shift: float = 3.0,
          denoise: float = 1.0, device: torch.device | None = None) -> Start:
    """The noise and sigmas of a run, already on `device`. Made before the transformer's weights
    start streaming: a small host-to-device copy queued behind a block's copy waits for it (an
    H100 trace had the GPU idle for the first 13-28 ms of every image)."""
    sampler = SamplerName(sampler)
    if latent.ndim != 4 or latent.shape[1] != LATENT_CHANNELS:
        raise ZImageError("the latent is not a Z-Image (Flux VAE) latent", where="the LATENT input",
                          expected=f"[batch, {LATENT_CHANNELS}, height/8, width/8]", found=str(list(latent.shape)),
                          fix="use EmptySD3LatentImage or a Flux-VAE VAEEncode, not an SD/SDXL latent.")
    validate(steps, latent.shape[2] * 8, latent.shape[3] * 8, denoise)
    sig = sigmas(sampler, steps, shift, denoise)
    x = make_noise(tuple(latent.shape), seed)
    if denoise < 1.0:  # image-to-image; text-to-image starts from pure noise whatever the latent holds
        x = sig[0] * x + (1.0 - sig[0]) * latent_to_model(latent.to(torch.float32).cpu())
    levels = sig.tolist()
    if device is not None:
        x, sig = x.to(device), sig.to(device)
    return Start(x, sig, levels)


@torch.no_grad()
def sample(velocity: Velocity, begin: Start, sampler: SamplerName | str,
           hooks: StepHooks | None = None) -> torch.Tensor:
    """Denoise from `begin` (see start) and return a LATENT tensor (ComfyUI convention).

    `velocity(x, t)` returns the flow velocity (noise - clean) in float32 for model-space
    latents `x` [B,16,h,w] at model time `t` [B]; CFG lives inside it.
    """
    sampler = SamplerName(sampler)
    hooks = hooks or StepHooks()
    x, sig, levels = begin.x, begin.sig, begin.levels
    steps = len(levels) - 1
    old_denoised = None
    for i in range(steps):
        hooks.check_interrupt()
        s, s_next = sig[i], sig[i + 1]
        v = velocity(x, timestep(sampler, s).expand(x.shape[0]))
        denoised = x - s * v
        if sampler == SamplerName.EULER:
            x = x + (s_next - s) * v  # diffusers' scheduler.step, same float32 arithmetic
        elif old_denoised is None or levels[i + 1] == 0:
            x = x + (x - denoised) / s * (s_next - s)  # k-diffusion's Euler through to_d()
        else:
            x = _res_multistep_update(x, denoised, old_denoised, sig[i - 1], s, s_next)
        old_denoised = denoised
        hooks.on_step(i, steps, denoised)
    # converted before it leaves the GPU: a quarter-million-element add and divide on the host
    # took 11 ms of an image on the H100 machine while its GPU idled (bench/NOTES.md session 8)
    return model_to_latent(x).cpu()


def _res_multistep_update(x, denoised, old_denoised, s_prev, s, s_next):
    """Second-order exponential multistep (arXiv 2308.02157), as ComfyUI's res_multistep with eta 0."""
    t, t_prev, t_next = -torch.log(s), -torch.log(s_prev), -torch.log(s_next)
    h = t_next - t
    c2 = (t_prev - t) / h
    phi1 = torch.expm1(-h) / -h
    phi2 = (phi1 - 1.0) / -h
    b1 = torch.nan_to_num(phi1 - phi2 / c2, nan=0.0)
    b2 = torch.nan_to_num(phi2 / c2, nan=0.0)
    return torch.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)

