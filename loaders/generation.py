"""Text-to-image steps over the loaded parts: denoise a LATENT, decode it to an IMAGE."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from . import attention, compiled_blocks, sampling
from .errors import ZImageError
from .placement import DECODE_BLEND, DECODE_TILE
from .runtime import VAEHandle, ZImagePipelineParts, free_device_cache


def batch_captions(positive: torch.Tensor, negative: torch.Tensor | None, batch: int) -> list[torch.Tensor]:
    """The caption of each image in a model call: the positive one per image, then with CFG the
    negative one per image."""
    return [positive] * batch + ([negative] * batch if negative is not None else [])


class Velocity:
    """The transformer as the sampler sees it: flow velocity in float32, CFG applied when `captions`
    (batch_captions) hold negative ones too. They come already on the device in the model's dtype
    (denoise moves them before the weights start streaming)."""

    def __init__(self, transformer: nn.Module, captions: list[torch.Tensor], cfg: float, dtype: torch.dtype):
        self.transformer, self.captions, self.cfg, self.dtype = transformer, captions, cfg, dtype

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        guided = len(self.captions) == 2 * b
        frames = list(x.to(self.dtype).unsqueeze(2).unbind(0))
        if guided:
            frames, t = frames + frames, t.repeat(2)
        out = self.transformer(frames, t, self.captions, return_dict=False)[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)
        if guided:
            pos, neg = out[:b], out[b:]
            out = pos + (self.cfg - 1.0) * (pos - neg)  # diffusers' guidance g = cfg - 1
        return -out


@dataclass
class DenoiseReport:
    attention: str
    seconds_per_step: float  # after the first step when this run compiled graphs
    steps: int
    plan: str
    compiled: bool = False
    compile_graphs: int = 0  # graphs compiled in this run (0: reused from an earlier run)
    first_step_s: float = 0.0  # with compiled blocks: the first step, compilation included

    def summary(self) -> str:
        out = f"attention {self.attention}, {self.seconds_per_step:.3f} s/step"
        if self.compiled:
            out += (f", compiled blocks (compiled {self.compile_graphs} graphs: first step {self.first_step_s:.1f} s)"
                    if self.compile_graphs else ", compiled blocks (reused)")
        return out


def check_features(feats: torch.Tensor, width: int, what: str) -> None:
    if feats.ndim != 2 or feats.shape[-1] != width:
        raise ZImageError(f"the {what} conditioning does not fit this model", where=f"sampler input '{what}'",
                          expected=f"Qwen3-4B caption features of width {width}",
                          found=f"features of shape {list(feats.shape)}",
                          fix="encode the prompt with Z-Image Text Encode (or CLIPLoader type lumina2 with "
                              "qwen_3_4b.safetensors).")


def denoise(parts: ZImagePipelineParts, positive: torch.Tensor, negative: torch.Tensor | None,
            latent: torch.Tensor, seed: int, steps: int = 9, cfg: float = 1.0, shift: float = 3.0,
            sampler: str = "euler", denoise: float = 1.0, attention_backend: str = "auto",
            hooks: sampling.StepHooks | None = None, compile_blocks: bool = False,
            compile_backend: str = "inductor") -> tuple[torch.Tensor, DenoiseReport]:
    """Sample a LATENT (ComfyUI convention) from caption features `positive` [tokens, width].
    `compile_blocks`: the repeated blocks run through torch.compile (see compiled_blocks)."""
    rt = parts.runtime
    backend = attention.resolve(attention_backend, rt.device)
    if backend == attention.AttentionBackend.CUDNN_FP8 and compile_blocks:
        # its cuDNN graph is not an operator torch.compile can trace: it would run bf16 attention
        raise ZImageError("the cudnn_fp8 attention backend does not run inside compiled blocks",
                          where="sampler inputs 'attention' and 'compile'",
                          found="attention cudnn_fp8 with compile on",
                          fix="turn compile off (eager fp8 attention and fp8 matmuls ran as fast as "
                              "compiled ones), or pick another attention backend.")
    sampling.validate(steps, latent.shape[-2] * 8, latent.shape[-1] * 8, denoise)
    width = parts.transformer.component.config["cap_feat_dim"]
    check_features(positive, width, "positive")
    if cfg > 1.0 and negative is None:
        negative = parts.text_encoder.encode("")  # the pipeline's default negative prompt
    if negative is not None:
        check_features(negative, width, "negative")
    negative = negative if cfg > 1.0 else None  # without CFG it plays no part
    hooks = hooks or sampling.StepHooks()
    try:
        plan = rt.plan_for(latent.shape[-2] * 8, latent.shape[-1] * 8,
                           latent.shape[0] * (2 if negative is not None else 1))
        # The inputs reach the GPU before the weights start streaming (sampling.start).
        begin = sampling.start(latent, seed, steps, sampler, shift, denoise, rt.device)
        given = batch_captions(positive, negative, latent.shape[0])  # what the refiner's cache compares
        moved = {id(c): c.to(rt.device, rt.dtype) for c in given}
        captions = [moved[id(c)] for c in given]
        with parts.transformer.on_device(plan, passes=steps, captions=given) as tr, \
                attention.attention_backend(tr, backend), \
                compiled_blocks.compiled(tr, compile_blocks, compile_backend) as compile_report:
            v = Velocity(tr, captions, cfg, rt.dtype)
            start = time.perf_counter()
            # No synchronisation per step: the GPU keeps its queue and the streamer its prefetch
            # across step boundaries; sample() returns a CPU tensor, which waits for the end.
            out = sampling.sample(v, begin, sampler, hooks)
            total = time.perf_counter() - start
    except BaseException:
        free_device_cache(rt.device, collect=True)  # activations of the failed step
        raise
    first = compile_report.seconds
    if compile_report.graphs and steps > 1:
        per_step = (total - first) / (steps - 1)  # the first step paid for compiling
    else:
        per_step = total / steps
    return out, DenoiseReport(backend.value, per_step, steps, plan.summary(), compile_blocks, compile_report.graphs,
                              first)


@torch.no_grad()
def decode(vae: VAEHandle, latent: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
    """LATENT [B,16,h,w] -> IMAGE float32 [B,H,W,3] in 0..1, on the CPU. `tiled` None = as the
    memory plan needs for this size, which may move resident transformer blocks out of the GPU
    until its next run."""
    if latent.ndim != 4 or latent.shape[1] != sampling.LATENT_CHANNELS:
        raise ZImageError("the latent is not a Flux-VAE latent", where="decode input 'samples'",
                          expected=f"[batch, {sampling.LATENT_CHANNELS}, height/8, width/8]",
                          found=str(list(latent.shape)), fix="decode SD/SDXL latents with their own VAE.")
    b, _, h, w = latent.shape
    moved, needs_tiles = vae.runtime.plan.decode_plan(h * 8, w * 8, b)
    tiled = needs_tiles if tiled is None else tiled
    if moved and not tiled and vae.runtime.move_out is not None and not vae.runtime.move_out(moved):
        tiled = True  # no pinned memory left for the blocks' copies: tiles fit beside them
    # (keeps_decode_memory itself refuses a plan that moves blocks out or tiles; `tiled` may be the caller's)
    keep = not tiled and vae.runtime.plan.keeps_decode_memory(h * 8, w * 8, b)
    with vae.on_device(keep_memory=keep) as m, _tiling(m, tiled):
        w = next(m.parameters())
        z = latent.to(w.device).to(w.dtype)  # cast on the GPU: on the host it took 7 ms (bench/NOTES.md)
        if z.is_cuda:  # cuDNN's convolutions run channels-last: in that layout they need no conversions
            z = z.contiguous(memory_format=torch.channels_last)
        img = m.decode(z, return_dict=False)[0]
        img = (img.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        img = img if img.device.type == "cpu" else vae.images.copy(img)
    return img


@contextmanager
def _tiling(vae: nn.Module, tiled: bool):
    """diffusers' tiled decode on DECODE_TILE-pixel tiles overlapping by DECODE_BLEND pixels, blended
    (no seams), for this decode only."""
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor)
    vae.use_tiling = tiled
    vae.tile_sample_min_size = DECODE_TILE
    vae.tile_latent_min_size = DECODE_TILE // 8
    vae.tile_overlap_factor = DECODE_BLEND / DECODE_TILE  # diffusers multiplies it back: exactly 128
    try:
        yield
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = saved
