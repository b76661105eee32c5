"""Where every part of Z-Image lives for a VRAM budget, a host-RAM budget, a resolution and a
batch: the memory plan, a printable dataclass.

Transformer: its small stem (embedders, final layer) is always on the GPU; each of its 34
repeated blocks is either resident on the GPU or streamed each step from pinned host memory
(or, when pinned RAM is short, from the memory-mapped file). Streamed blocks are spread evenly
between resident ones so their copies hide behind the resident blocks' compute. The two context
refiner blocks run once per caption (caption_refine): they are the last to be made resident, and
a streamed one is copied once per new prompt, not per step.
Text encoder: runs once per new prompt and leaves nothing on the GPU: streamed layer by layer
(from pinned RAM: 8 GB in ~0.15 s on PCIe 5; a whole copy from the mapped file took 1.7 s).
VAE: copied for the decode only. When the untiled decode would not fit beside the resident
blocks, some of them leave the GPU until the next run, or the decode is tiled (decode_plan).

All sizes are bytes; the GPU phases (encode, denoise, decode) are each checked against the
budget, so the plan's peak is what the allocator may reach.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from enum import Enum

import torch

from .errors import ZImageError
from .model_sizes import ModelSizes

GiB = 2**30
MiB = 2**20
# What nvidia-smi counts against the process beyond PyTorch's reserved memory (CUDA context,
# cuBLAS workspaces, event and stream state): measured 0.78 GiB on an H200 with torch 2.11.
CUDA_CONTEXT_BYTES = 800 * MiB
AUTO_MARGIN_BYTES = 1 * GiB  # left free under "automatic" for the desktop and other programs
# Allocator slack: reserved minus allocated, measured up to 0.42 GiB in streaming runs.
SLACK_BYTES = 512 * MiB
# Denoise working memory: a fixed part plus bytes per token per image in the batch
# (hidden states, the SwiGLU intermediate, attention inputs). At 1024x1024 with a 32-token prompt
# (4128 tokens) the allocator's peak above the resident blocks and buffers was 0.45-0.47 GiB at 8,
# 6 and 4 GiB (H100, bench/results/streaming_budgets_session13_h100.json); this plans 0.55 GiB for
# the longest prompt (4608 tokens). The fixed part was 256 MiB before: 0.2 GiB more than used,
# which kept a block off the GPU at 8 and 6 GiB.
WORK_FIXED_BYTES = 128 * MiB
WORK_BYTES_PER_TOKEN = 96 * 1024
CAPTION_TOKENS = 512  # the most a prompt can have (the pipeline's max length)
ENCODE_WORK_BYTES = 256 * MiB  # Qwen3-4B activations for a 512-token prompt
# Flux VAE decode in bf16: ~2.6 kB per output pixel untiled (a 1024x1024 decode peaks ~2.5 GiB
# above its weights on an H200); tiled decode works on 640x640 tiles (plus the output image, fp32),
# overlapping by DECODE_BLEND pixels, blended. 640 rather than 512: a 1024x1024 image is 2x2 tiles
# (1.33 Mpixels decoded) instead of 3x3 (1.64), 2048x2048 4x4 instead of 6x6.
DECODE_BYTES_PER_PIXEL = 2600
DECODE_TILE = 640
DECODE_BLEND = 128
# A decode that does not fit beside the resident blocks moves some of them out (those with a
# pinned copy) rather than tile, when that frees enough within this many bytes: they come back at
# the next run at PCIe speed (4 GiB: 0.08 s at 55 GB/s, 0.35 s at 12), hidden behind compute where
# the link has room. Tiles cost 1.7-2.5x an untiled decode (H100, 1024x1024, 640-pixel tiles:
# 0.08-0.19 s in a streaming run against 0.07-0.08; bench/streaming_budgets.py). Where the link is
# the limit (8 GiB bf16: 1.45 GB back, ~26 ms) the two come out about even; not re-tuned since the
# faster tiles.
DECODE_MOVE_OUT_MAX_BYTES = 4 * GiB
DECODE_MOVE_OUT_SLACK_BYTES = 512 * MiB
# Blocks whose output depends on the caption alone (no timestep, no image): run once per caption.
ONCE_PER_CAPTION = "context_refiner."


class Where(str, Enum):
    GPU = "gpu"  # resident on the GPU
    PINNED = "pinned"  # streamed each step from pinned host memory
    MAPPED = "mapped"  # streamed each step from the memory-mapped file (pageable copies)
    CPU = "cpu"  # no GPU: everything runs where it is


class Storage(str, Enum):
    BF16 = "bf16"
    FP8 = "fp8"  # streamed blocks kept as float8_e4m3fn with per-row scales
    PACKED = "packed"  # streamed bf16 matrices kept in 12 bits a weight, unpacked exactly (exponent_pack)


class Matmul(str, Enum):
    BF16 = "bf16"
    FP8 = "fp8"  # the blocks' linear layers multiply in fp8 (fp8_matmul.Fp8Linear): fp8 resident and streamed


# The streamer's device buffers (its prefetch depth), by what it streams. bf16 streaming is bound by
# the copies: a third buffer hides nothing there, and the block it would hold resident streams less
# (H100, one run: 8 / 6 / 4 GiB 0.128 / 0.172 / 0.201 s a step with 2, 0.132 / 0.176 / 0.205 with 3).
# fp8 blocks are half the size, so a buffer less makes no block resident, and the deeper prefetch
# hides copy jitter behind compute: 0.114 / 0.114 / 0.116 with 3, 0.115 / 0.117 / 0.117 with 2.
# Packed blocks are 3/4 of bf16's, still bound by the copies below ~10 GiB.
N_BUFFERS = {Storage.BF16: 2, Storage.FP8: 3, Storage.PACKED: 2}


def buffers_for(storage: Storage, matmul: Matmul) -> int:
    return N_BUFFERS[Storage.FP8 if matmul == Matmul.FP8 else storage]


def packs_weights(storage: Storage | str, matmul: Matmul | str) -> bool:
    """Whether streamed weights are kept packed: packed storage, unless fp8 matmuls keep them fp8."""
    return Storage(storage) == Storage.PACKED and Matmul(matmul) == Matmul.BF16


def text_encoder_pinned(sizes: ModelSizes, storage: Storage, matmul: Matmul) -> int:
    """Bytes of the text encoder's layers pinned for streaming (packed where measured)."""
    if packs_weights(storage, matmul) and sizes.text_encoder_blocks_packed:
        return sum(sizes.text_encoder_blocks_packed)
    return sum(sizes.text_encoder_blocks)


def text_encoder_streaming(sizes: ModelSizes, n_buffers: int, storage: Storage, matmul: Matmul) -> int:
    """GPU bytes of a streamed encode: stem, buffers and work. Packed layers add the shared bf16
    buffer they are unpacked into; the first prompt streams bf16 from the file, so the larger."""
    layers = n_buffers * max(sizes.text_encoder_blocks)
    if packs_weights(storage, matmul) and sizes.text_encoder_blocks_packed:
        layers = max(layers, n_buffers * max(sizes.text_encoder_blocks_packed) + max(sizes.text_encoder_blocks))
    return sizes.text_encoder_stem + layers + ENCODE_WORK_BYTES


def denoise_work_bytes(height: int, width: int, batch: int) -> int:
    tokens = (height // 16) * (width // 16) + CAPTION_TOKENS
    return WORK_FIXED_BYTES + batch * tokens * WORK_BYTES_PER_TOKEN


def decode_work_bytes(height: int, width: int, batch: int, tiled: bool) -> int:
    image = batch * height * width * 3 * 4 * 2  # the decoded batch in fp32, and its 0..1 copy
    pixels = min(height * width, DECODE_TILE**2) if tiled else height * width
    return pixels * DECODE_BYTES_PER_PIXEL * (1 if tiled else batch) + image


@dataclass(frozen=True)
class MemoryPlan:
    device: str
    budget_bytes: int
    host_budget_bytes: int
    height: int
    width: int
    batch: int  # images per model call (CFG doubles it)
    storage: Storage
    blocks: tuple[tuple[str, Where], ...]
    text_encoder: str  # "streamed" (layer by layer, nothing left after), or "cpu"
    text_encoder_host: Where  # where a streamed text encoder's layers come from
    vae_tiled: bool
    sizes: ModelSizes
    phases: dict[str, int] = field(default_factory=dict)
    matmul: Matmul = Matmul.BF16
    # Several GPUs (plan_devices): each device's own plan, blocks in call order; the text encoder
    # and the VAE run on the last device. Empty for one device.
    device_plans: tuple[MemoryPlan, ...] = ()
    # Resident blocks whose bf16 copy is also kept in pinned RAM (with what the budget leaves after
    # the streamed blocks): a reload, or a switch back to this model, copies them at PCIe speed.
    resident_pinned: tuple[str, ...] = ()
    # Resident blocks moved out of the GPU for a decode of the planned size (see decode_plan).
    decode_moved_out: tuple[str, ...] = ()
    n_buffers: int = 3  # the streamer's device buffers the plan has room for (buffers_for)

    @property
    def devices(self) -> list[str]:
        return [p.device for p in self.device_plans] or [self.device]

    def block_device(self) -> dict[str, str]:
        """Where each transformer block runs."""
        if not self.device_plans:
            return {n: self.device for n, _ in self.blocks}
        return {n: p.device for p in self.device_plans for n, _ in p.blocks}

    @property
    def text_encoder_device(self) -> str:
        return self.devices[-1]

    @property
    def vae_device(self) -> str:
        return self.devices[-1]

    def _block_bytes(self, i: int, where: Where) -> int:
        """Bytes block i takes where it lives (on the GPU, or copied per step when streamed)."""
        b = self.sizes.transformer_blocks[i][1]
        if self.matmul == Matmul.FP8 or (where == Where.PINNED and self.storage == Storage.FP8):
            return self.sizes.block_fp8(i)
        if where == Where.PINNED and self.storage == Storage.PACKED:
            return self.sizes.block_packed(i)
        return b

    @property
    def streamed(self) -> list[str]:
        return [n for n, w in self.blocks if w in (Where.PINNED, Where.MAPPED)]

    @property
    def resident_bytes(self) -> int:
        if self.device == "cpu":
            return 0
        return self.sizes.transformer_stem + sum(
            self._block_bytes(i, w) for i, (_, w) in enumerate(self.blocks) if w == Where.GPU)

    @property
    def streamed_bytes_per_step(self) -> int:
        """Bytes copied host->GPU per transformer forward (a new caption's refiner blocks aside)."""
        return sum(self._block_bytes(i, w) for i, (n, w) in enumerate(self.blocks)
                   if w in (Where.PINNED, Where.MAPPED) and not n.startswith(ONCE_PER_CAPTION))

    @property
    def pinned_bytes(self) -> int:
        cached = set(self.resident_pinned)
        total = sum(self._block_bytes(i, w) for i, (n, w) in enumerate(self.blocks)
                    if w == Where.PINNED or n in cached)
        if self.text_encoder == "streamed" and self.text_encoder_host == Where.PINNED:
            total += text_encoder_pinned(self.sizes, self.storage, self.matmul)
        if self.device != "cpu":
            total += self.sizes.vae  # its pinned copy for the decodes
        return total

    @property
    def peak_bytes(self) -> int:
        """The highest phase on any one device."""
        if self.device_plans:
            return max(p.peak_bytes for p in self.device_plans)
        return max(self.phases.values()) if self.phases else 0

    def keeps_decode_memory(self, height: int, width: int, batch: int) -> bool:
        """Whether a decode of this size may leave its freed memory in PyTorch's cache for the next
        decode instead of handing it back to the driver (the hand-back and the next decode's
        allocations took ~11 ms of a 1024x1024 image on an H100): only an untiled decode that moves
        no block out, where the budget holds its VAE and work beside the encode and denoise peaks."""
        if self.device_plans:
            return self.device_plans[-1].keeps_decode_memory(height, width, batch)
        if self.device == "cpu" or self.decode_plan(height, width, batch) != ((), False):
            return False
        kept = self.sizes.vae + decode_work_bytes(height, width, batch, tiled=False)
        return max(self.phases.get("encode", 0), self.phases.get("denoise", 0)) + kept <= self.budget_bytes

    def decode_plan(self, height: int, width: int, batch: int) -> tuple[tuple[str, ...], bool]:
        """How a decode of this size stays in the budget, decided up front (never by running out of
        memory first): (resident blocks to move out of the GPU for it, whether it is tiled). Untiled
        where it fits beside the resident blocks, or once resident blocks with a pinned copy (the
        last first) free enough within DECODE_MOVE_OUT_MAX_BYTES; tiled otherwise."""
        if self.device_plans:
            return (), self.device_plans[-1].decode_plan(height, width, batch)[1]
        if self.device == "cpu":
            return (), False
        over = CUDA_CONTEXT_BYTES + SLACK_BYTES + self.resident_bytes + self.sizes.vae \
            + decode_work_bytes(height, width, batch, tiled=False) - self.budget_bytes
        if over <= 0:
            return (), False
        # Room for the allocator's pieces left over from denoising too: decoding right after it at
        # 6 GiB, PyTorch reserved 0.4 GiB more than the decode's plan (H100, bench/).
        over += DECODE_MOVE_OUT_SLACK_BYTES
        index = {n: i for i, (n, _) in enumerate(self.blocks)}
        moved, freed = [], 0
        for name in reversed(self.resident_pinned):
            if freed >= over:
                break
            moved.append(name)
            freed += self._block_bytes(index[name], Where.GPU)
        if freed >= over and freed <= DECODE_MOVE_OUT_MAX_BYTES:
            return tuple(moved), False
        return (), True

    @property
    def packed_fraction(self) -> float | None:
        """Packed storage: the streamed blocks' packed bytes over their bf16 bytes, as measured."""
        if not packs_weights(self.storage, self.matmul) or not self.sizes.transformer_blocks_packed:
            return None
        streamed = [i for i, (_, w) in enumerate(self.blocks) if w == Where.PINNED]
        bf16 = sum(self.sizes.transformer_blocks[i][1] for i in streamed)
        return sum(self.sizes.transformer_blocks_packed[i] for i in streamed) / bf16 if bf16 else None

    def summary(self) -> str:
        if self.device == "cpu":
            return "CPU run: every part stays in system RAM (memory-mapped from its file)"
        if self.device_plans:
            return "\n".join(self._device_line(p) for p in self.device_plans) + \
                f"\npinned host RAM {self.pinned_bytes / GiB:.1f} GB; activations hop between devices, weights never do"
        n_stream = len(self.streamed)
        once = sum(1 for n in self.streamed if n.startswith(ONCE_PER_CAPTION))
        mapped = sum(1 for _, w in self.blocks if w == Where.MAPPED)
        lines = [
            f"budget {self.budget_bytes / GiB:.1f} GB on {self.device}, planned for {self.width}x{self.height} "
            f"x{self.batch}",
            f"transformer: {self.resident_bytes / GiB:.1f} GB resident ({len(self.blocks) - n_stream}/"
            f"{len(self.blocks)} blocks), {self.streamed_bytes_per_step / GiB:.1f} GB streamed per step "
            f"({n_stream - once} blocks, {'fp8' if self.matmul == Matmul.FP8 else self.storage.value}"
            + (f" to {self.packed_fraction:.0%} of bf16" if self.packed_fraction else "")
            + (f", {mapped} from the mapped file" if mapped else "") + ")"
            + (f", {once} more once per new prompt" if once else "")
            + ("; fp8 matmuls" if self.matmul == Matmul.FP8 else ""),
            f"text encoder: {self.text_encoder}" + (f" from {self.text_encoder_host.value} RAM"
                                                    if self.text_encoder == "streamed" else "")
            + "; VAE: copied for decode" + (", tiled" if self.vae_tiled else f" ({len(self.decode_moved_out)} resident "
                                            "blocks moved out for it)" if self.decode_moved_out else ""),
            f"pinned host RAM {self.pinned_bytes / GiB:.1f} GB"
            + (f" ({len(self.resident_pinned)} resident blocks kept for fast reloads)" if self.resident_pinned else "")
            + f"; expected peak {self.peak_bytes / GiB:.1f} GB "
            f"(encode {self.phases['encode'] / GiB:.1f}, denoise {self.phases['denoise'] / GiB:.1f}, "
            f"decode {self.phases['decode'] / GiB:.1f})",
        ]
        return "\n".join(lines)


    def _device_line(self, p: MemoryPlan) -> str:
        names = [n for n, _ in p.blocks]
        span = f"{names[0]}..{names[-1]}" if len(names) > 1 else (names[0] if names else "no blocks")
        extra = [] if p.device != self.devices[0] else ["the transformer's stem"]
        if p.device == self.text_encoder_device:
            extra += ["text encoder (streamed)", "VAE" + (" (tiled)" if p.vae_tiled else "")]
        return (f"{p.device} ({p.budget_bytes / GiB:.1f} GB): blocks {span}: {p.resident_bytes / GiB:.1f} GB "
                f"resident ({len(p.blocks) - len(p.streamed)}/{len(p.blocks)}), "
                f"{p.streamed_bytes_per_step / GiB:.1f} GB streamed per step"
                + (f"; {', '.join(extra)}" if extra else "") + f"; peak {p.peak_bytes / GiB:.1f} GB")


def _spread(n_total: int, n_resident: int) -> list[bool]:
    """Which of n_total blocks are resident, n_resident of them spread evenly."""
    return [(i + 1) * n_resident // n_total - i * n_resident // n_total == 1 for i in range(n_total)]


def _resident_set(names: list[str], k: int) -> list[bool]:
    """k resident blocks spread evenly over those every step calls; the context refiner's only once
    all of those are (it runs once per caption: streamed, it costs one copy per new prompt)."""
    once = [i for i, n in enumerate(names) if n.startswith(ONCE_PER_CAPTION)]
    per_step = [i for i in range(len(names)) if i not in once]
    chosen = {i for i, r in zip(per_step, _spread(len(per_step), min(k, len(per_step)))) if r}
    chosen |= set(once[:max(0, k - len(per_step))])
    return [i in chosen for i in range(len(names))]


def available_host_bytes() -> int:
    """Memory the OS can give us now (Linux MemAvailable; psutil elsewhere, as ComfyUI has it)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _not_negative(value: float, name: str) -> None:
    if value < 0:
        raise ZImageError("a memory budget cannot be negative", where=f"loader input '{name}'", found=str(value),
                          fix="use 0 for automatic, or the GB the model may use.")


def vram_budget_bytes(budget_gb: float, device: torch.device | str, free_bytes: int | None = None) -> int:
    """`budget_gb`, or for 0 the device's free memory (`free_bytes` if given) minus a margin."""
    _not_negative(budget_gb, "vram_budget_gb")
    if budget_gb > 0:
        return int(budget_gb * GiB)
    if free_bytes is None:
        free_bytes, _ = torch.cuda.mem_get_info(torch.device(device))
    # free_bytes is measured with our CUDA context already created; the plan counts it.
    return free_bytes - AUTO_MARGIN_BYTES + CUDA_CONTEXT_BYTES


def host_budget_bytes(host_budget_gb: float, free_host_bytes: int | None = None) -> int:
    """`host_budget_gb`, or for 0 three quarters of the RAM available now (`free_host_bytes` if given)."""
    _not_negative(host_budget_gb, "ram_budget_gb")
    if host_budget_gb > 0:
        return int(host_budget_gb * GiB)
    return (free_host_bytes if free_host_bytes is not None else available_host_bytes()) * 3 // 4


def plan_memory(sizes: ModelSizes, device: torch.device | str, budget_gb: float = 0.0, host_budget_gb: float = 0.0,
                height: int = 1024, width: int = 1024, batch: int = 1, storage: Storage | str = Storage.BF16,
                free_bytes: int | None = None, free_host_bytes: int | None = None,
                matmul: Matmul | str = Matmul.BF16, encodes: bool = True, decodes: bool = True,
                cache_resident: bool = True) -> MemoryPlan:
    """The plan for one device. `budget_gb` 0 = free VRAM minus a margin; `host_budget_gb` 0 = 3/4 of
    the RAM available now. `free_bytes`/`free_host_bytes` override what is asked of the machine.
    `encodes`/`decodes`: whether the text encoder / the VAE run on this device (several GPUs)."""
    device = torch.device(device)
    storage, matmul = Storage(storage), Matmul(matmul)
    n = len(sizes.transformer_blocks)
    if device.type == "cpu":
        return MemoryPlan("cpu", 0, 0, height, width, batch, storage,
                          tuple((name, Where.CPU) for name, _ in sizes.transformer_blocks), "cpu", Where.CPU, False,
                          sizes, {"encode": 0, "denoise": 0, "decode": 0}, matmul)
    budget = vram_budget_bytes(budget_gb, device, free_bytes)
    host_budget = host_budget_bytes(host_budget_gb, free_host_bytes)

    work = denoise_work_bytes(height, width, batch)
    base = CUDA_CONTEXT_BYTES + SLACK_BYTES
    blocks = [b for _, b in sizes.transformer_blocks]
    # Bytes of block i where it lives: mapped blocks are copied straight from the file, so they stay
    # in the compute dtype, unless fp8 matmuls need them quantised anyway.
    probe = MemoryPlan(str(device), 0, 0, height, width, batch, storage, (), "", Where.CPU, False, sizes, {}, matmul)
    stage = probe._block_bytes
    dequantised = storage in (Storage.FP8, Storage.PACKED) and matmul == Matmul.BF16
    n_buffers = buffers_for(storage, matmul)

    def place(resident: list[bool]) -> tuple[list[Where], int]:
        """Streamed blocks pinned in call order while the host budget lasts, the rest mapped."""
        out, pinned = [], 0
        for i, r in enumerate(resident):
            if r:
                out.append(Where.GPU)
            elif pinned + stage(i, Where.PINNED) <= host_budget:
                out.append(Where.PINNED)
                pinned += stage(i, Where.PINNED)
            else:
                out.append(Where.MAPPED)
        return out, pinned

    def buffers(where: list[Where]) -> int:
        streamed = [(i, w) for i, w in enumerate(where) if w != Where.GPU]
        if not streamed:
            return 0
        staging = min(n_buffers, len(streamed)) * max(stage(i, w) for i, w in streamed)
        # fp8 and packed blocks are dequantised into one shared bf16 buffer right before they run
        fp8_compute = max(blocks[i] for i, w in streamed if w == Where.PINNED) \
            if dequantised and any(w == Where.PINNED for _, w in streamed) else 0
        return staging + fp8_compute

    te_stream = text_encoder_streaming(sizes, min(n_buffers, len(sizes.text_encoder_blocks)), storage, matmul)

    def phases(where: list[Where], tiled: bool) -> dict[str, int]:
        res = sizes.transformer_stem + sum(stage(i, w) for i, w in enumerate(where) if w == Where.GPU)
        return {"encode": base + res + (te_stream if encodes else 0),
                "denoise": base + res + buffers(where) + work,
                "decode": base + res + (sizes.vae + decode_work_bytes(height, width, batch, tiled) if decodes else 0)}

    chosen = None
    for k in range(n, -1, -1):  # most resident blocks first
        where, pinned = place(_resident_set([name for name, _ in sizes.transformer_blocks], k))
        for tiled in (False, True):
            ph = phases(where, tiled)
            if max(ph.values()) <= budget:
                chosen = (where, pinned, tiled, ph)
                break
        if chosen:
            break
    if chosen is None:
        least = phases(place([False] * n)[0], True)
        streaming = "fp8" if matmul == Matmul.FP8 else storage.value
        need = max(least.values())
        raise ZImageError(
            "the VRAM budget is too small for Z-Image even with every block streamed",
            where="loader input 'vram_budget_gb'",
            expected=f"at least {need / GiB:.1f} GB at {width}x{height} x{batch} ({streaming} "
                     f"streaming: CUDA context, the transformer's stem, {n_buffers} block buffers and the working "
                     "memory)",
            found=f"{budget / GiB:.1f} GB" + (" free" if budget_gb == 0 else ""),
            fix=f"raise vram_budget_gb to {need / GiB:.1f} or more, lower the resolution or batch, or close "
                "other GPU programs.")
    where, pinned, tiled, ph = chosen
    placed = tuple((name, w) for (name, _), w in zip(sizes.transformer_blocks, where))
    te_host = Where.PINNED if not encodes or pinned + text_encoder_pinned(sizes, storage, matmul) <= host_budget \
        else Where.MAPPED
    plan = MemoryPlan(str(device), budget, host_budget, height, width, batch, storage, placed, "streamed",
                      te_host, tiled, sizes, ph, matmul, n_buffers=n_buffers)
    if not cache_resident:
        return plan
    plan = with_resident_cache(plan)
    moved = plan.decode_plan(height, width, batch)[0]
    if not moved:
        return plan
    out = [Where.PINNED if name in moved else w for (name, _), w in zip(sizes.transformer_blocks, where)]
    decode = phases(out, False)["decode"] + DECODE_MOVE_OUT_SLACK_BYTES
    return dataclasses.replace(plan, vae_tiled=False, decode_moved_out=moved, phases={**ph, "decode": decode})


def with_resident_cache(plan: MemoryPlan) -> MemoryPlan:
    """`plan` with as many resident blocks cached in pinned RAM as its host budget has room for
    after everything that must be pinned. fp8 matmul blocks are quantised on the GPU instead."""
    if plan.matmul == Matmul.FP8 or plan.device == "cpu":
        return plan
    spare = plan.host_budget_bytes - plan.pinned_bytes
    cached = []
    for i, (name, w) in enumerate(plan.blocks):
        b = plan._block_bytes(i, w)
        if w == Where.GPU and b <= spare:
            cached.append(name)
            spare -= b
    return dataclasses.replace(plan, resident_pinned=tuple(cached))


def plan_devices(sizes: ModelSizes, devices: list[str], budgets_gb: list[float], host_budget_gb: float = 0.0,
                 height: int = 1024, width: int = 1024, batch: int = 1, storage: Storage | str = Storage.BF16,
                 matmul: Matmul | str = Matmul.BF16, free_bytes: dict[str, int] | None = None,
                 free_host_bytes: int | None = None) -> MemoryPlan:
    """The plan over the GPUs in `devices` (plan_memory's plan for one): the transformer's blocks
    split in call order into one contiguous run per device, sized by what each device can hold,
    each device streaming what it cannot (every GPU has its own PCIe link, so streaming spread
    over several copies in parallel).
    The stem runs on the first device (so do the refiners: the caption and image streams they
    make are joined there), the text encoder and the VAE on the last. Activations hop between
    devices at the block boundaries; weights never move."""
    if len(devices) == 1:
        return plan_memory(sizes, devices[0], budgets_gb[0], host_budget_gb, height, width, batch, storage,
                           (free_bytes or {}).get(devices[0]), free_host_bytes, matmul)
    if len(set(devices)) != len(devices) or any(torch.device(d).type != "cuda" for d in devices):
        raise ZImageError("several devices must be distinct GPUs", where="loader input 'devices'",
                          found=", ".join(devices), fix="list each GPU once, e.g. 'cuda:0, cuda:1'.")
    storage, matmul = Storage(storage), Matmul(matmul)
    host_budget = host_budget_bytes(host_budget_gb, free_host_bytes)
    names = [n for n, _ in sizes.transformer_blocks]
    probe = MemoryPlan("cuda", 0, 0, height, width, batch, storage, (), "", Where.CPU, False, sizes, {}, matmul)
    block = [probe._block_bytes(i, Where.GPU) for i in range(len(names))]
    n_buffers = buffers_for(storage, matmul)
    te_stream = text_encoder_streaming(sizes, n_buffers, storage, matmul)
    fixed = CUDA_CONTEXT_BYTES + SLACK_BYTES + denoise_work_bytes(height, width, batch) + n_buffers * max(block)
    room = []
    for i, (d, b) in enumerate(zip(devices, budgets_gb)):
        budget = vram_budget_bytes(b, d, (free_bytes or {}).get(d))
        own = fixed + (sizes.transformer_stem if i == 0 else 0) + (
            max(te_stream, sizes.vae + decode_work_bytes(height, width, batch, True)) if i == len(devices) - 1 else 0)
        room.append((budget, max(0, budget - own)))
    # Contiguous runs of blocks, first sized in proportion to each device's room (the refiners stay on
    # the first device), then boundaries moved one block at a time while that streams less: the most
    # any one device streams per step first (the devices copy in parallel), then the total.
    total_room = sum(r for _, r in room) or len(room)
    refiners = sum(1 for n in names if not n.startswith("layers."))
    cuts, acc, i, run_bytes = [], 0.0, 0, 0
    for _, r in room[:-1]:
        acc += (r or 1) / total_room * sum(block)
        while i < len(names) and (i < refiners or run_bytes + block[i] / 2 <= acc):
            run_bytes += block[i]
            i += 1
        cuts.append(i)

    def split(cuts: list[int]) -> list[MemoryPlan] | None:
        bounds = [0] + cuts + [len(names)]
        if any(lo >= hi for lo, hi in zip(bounds, bounds[1:])) or bounds[1] < refiners:
            return None
        plans, host_left = [], host_budget / GiB
        for k, d in enumerate(devices):
            lo, hi = bounds[k], bounds[k + 1]
            sub = sizes.blocks_from(lo, hi, sizes.transformer_stem if k == 0 else 0)
            last = k == len(devices) - 1
            try:
                p = plan_memory(sub, d, room[k][0] / GiB, max(host_left, 1e-9), height, width, batch, storage,
                                matmul=matmul, encodes=last, decodes=last, cache_resident=False)
            except ZImageError:
                return None
            host_left -= p.pinned_bytes / GiB
            plans.append(p)
        return plans

    def cost(plans: list[MemoryPlan] | None) -> tuple:
        if plans is None:
            return (float("inf"),)
        streamed = [p.streamed_bytes_per_step for p in plans]
        return max(streamed), sum(streamed), max(p.peak_bytes for p in plans)

    best = split(cuts)
    for _ in range(4 * len(names)):
        moves = [cuts[:k] + [cuts[k] + step] + cuts[k + 1:] for k in range(len(cuts)) for step in (-1, 1)]
        candidate = min(moves, key=lambda c: cost(split(c)))
        if cost(split(candidate)) >= cost(best):
            break
        cuts, best = candidate, split(candidate)
    if best is None:
        need = [f"{d}: {b} GB" for d, b in zip(devices, budgets_gb)]
        raise ZImageError("the VRAM budgets are too small to split Z-Image over these GPUs",
                          where="loader input 'devices'", found=", ".join(need),
                          expected=f"room on each GPU for its CUDA context, {n_buffers} block buffers and the working "
                                   "memory, plus the stem on the first and the text encoder and VAE on the last",
                          fix="raise the budgets, use fewer GPUs, or one GPU with streaming.")
    plans = best
    first = plans[0]
    return with_resident_cache(MemoryPlan(
        first.device, first.budget_bytes, host_budget, height, width, batch, storage,
        tuple(b for p in plans for b in p.blocks), "streamed", plans[-1].text_encoder_host, plans[-1].vae_tiled, sizes,
        first.phases, matmul, tuple(plans), n_buffers=n_buffers))
