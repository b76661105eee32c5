"""Running blocks whose weights live in host memory through a small fixed pool of device buffers.

Each streamed block's weights are copied into one of `n_buffers` preallocated device buffers on a
side CUDA stream, `n_buffers` blocks ahead of compute, and the block's parameters are pointed at
views of that buffer for its forward pass only. Events order the two streams: compute waits for
a block's copy, a copy into a buffer waits for the block that used it last. Nothing is allocated
per step, and no module is moved with `.to()`.

On a CPU device the same engine runs with synchronous copies, so its logic is testable anywhere.

Storage: "bf16" copies weights as they are; "fp8" keeps each streamed matrix in float8_e4m3fn
with one float32 scale per output row (per-row absmax / 448): half the bytes over PCIe. It is
dequantised on the compute stream, right before its block runs, into one bf16 buffer that every
streamed block shares: the copy stream then only copies (kernels queued there waited for SMs the
blocks were using and held up the next copy), and one buffer instead of one per slot leaves room
for more resident blocks. When the blocks multiply in fp8 themselves (`fp8_matmul.Fp8Linear`),
the fp8 weights and their scales are bound as they arrived. "packed" keeps each bf16 matrix in 12
bits a weight (exponent_pack): 3/4 of the bytes over PCIe, unpacked the same way into that shared
buffer, to the same bits.
"""
from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import exponent_pack
from .block_dequant import ChunkTable, dequantize_block
from .file_reads import Prefetch, cached, copy_to_device, file_range, read_into
from .fp8_matmul import FP8, dequantize_into, fp8_quantize
from .pinned_memory import host_buffer, pin
from .readahead import will_need

READ_AHEAD = 768 * 2**20  # bytes of mapped blocks the disk is asked to read ahead of their copies
_ALIGN = 256  # byte alignment of every tensor inside a buffer (CUDA kernels like aligned rows)


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


@dataclass
class _Entry:
    name: str  # parameter or buffer name inside the block
    shape: torch.Size
    dtype: torch.dtype  # compute dtype
    stage_off: int  # offset in the staging buffer (what is copied)
    stage_dtype: torch.dtype
    compute_off: int  # offset in the compute buffer (fp8 and packed only; else == stage_off)
    scale_off: int = -1  # fp8: offset of the float32 per-row scales in the staging buffer
    code_off: int = -1  # packed: offset of the exponent codes in the staging buffer (its low bytes: stage_off)
    base: int = -1  # packed: the exponent window's base (exponent_pack)

    @property
    def packed(self) -> bool:
        return self.code_off >= 0

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Layout:
    """A block's buffers: its entries, the staging buffer's bytes (what is copied) and the compute
    buffer's (what fp8 and packed matrices become). Packed matrices' values listed apart (`listed`
    of them) end the staging buffer: their places (int64) at `listed_at_off`, their bits (int16) at
    `listed_bits_off`."""
    entries: list[_Entry]
    stage_bytes: int
    compute_bytes: int
    listed: int
    listed_at_off: int
    listed_bits_off: int


def stage_layout(tensors: dict[str, torch.Tensor], storage: str, compute_dtype: torch.dtype,
                 fp8_matmul: bool = False, work_device: torch.device | None = None) -> Layout:
    """Where each of a block's `tensors` goes (see Layout). A matrix that would not shrink packed
    stays bf16. `work_device`: where packed matrices' exponents are counted (None: where they are)."""
    entries: list[_Entry] = []
    stage = compute = listed = 0
    for n, t in tensors.items():
        dtype = compute_dtype if t.is_floating_point() else t.dtype
        nbytes = t.numel() * dtype.itemsize
        quant = storage == "fp8" and t.ndim == 2 and t.is_floating_point()
        window = exponent_pack.window_of(t, work_device) if storage == "packed" and compute_dtype == torch.bfloat16 \
            and exponent_pack.packs(t) else None
        if window is not None and not exponent_pack.worth_packing(t.numel(), window[1]):
            window = None
        if quant:
            e = _Entry(n, t.shape, dtype, stage, FP8, compute)
            stage = _align(stage + t.numel())
            e.scale_off = stage
            stage = _align(stage + t.shape[0] * 4)
        elif window is not None:
            e = _Entry(n, t.shape, dtype, stage, torch.uint8, compute, base=window[0])
            stage = _align(stage + t.numel())
            e.code_off = stage
            stage = _align(stage + t.numel() // 2)
            listed += window[1]
        else:
            e = _Entry(n, t.shape, dtype, stage, dtype, compute)
            stage = _align(stage + nbytes)
        if not (quant and fp8_matmul):
            compute = _align(compute + nbytes)
        entries.append(e)
    listed_at = stage
    listed_bits = listed_at + _align(8 * listed)
    return Layout(entries, listed_bits + _align(2 * listed), compute, listed, listed_at, listed_bits)


class HostBlock:
    """One block's weights in host memory, laid out as the device buffer will hold them."""

    def __init__(self, name: str, module: nn.Module, storage: str, pinned: bool, compute_dtype: torch.dtype,
                 fp8_matmul: bool = False, work_device: torch.device | None = None):
        """`fp8_matmul`: the block's linears are Fp8Linear on the device; their weights are stored (and
        bound) as fp8 with `<weight>_scale`, whatever `storage` says. `work_device`: where packed
        storage packs (a GPU: much faster than the CPU)."""
        if fp8_matmul:
            storage = "fp8"
        if storage == "packed" and (compute_dtype != torch.bfloat16 or not pinned):
            storage = "bf16"  # 12-bit packing is of bf16 bits, made when the host copy is built
        self.name, self.storage, self.pinned, self.fp8_matmul = name, storage, pinned, fp8_matmul
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        layout = stage_layout(tensors, storage, compute_dtype, fp8_matmul, work_device)
        self.entries, self.stage_bytes, self.compute_bytes = layout.entries, layout.stage_bytes, layout.compute_bytes
        # packed: how many values are listed apart, and where their places and bits are
        self.listed, self.listed_at_off = layout.listed, layout.listed_at_off
        self.listed_bits_off = layout.listed_bits_off
        self.quantized = storage == "fp8"
        self.packed = any(e.packed for e in self.entries)
        self.dequantized = (self.quantized and not fp8_matmul) or self.packed  # fp8 or packed in RAM, bf16 for compute
        self.chunks = ChunkTable.of([
            (e.stage_off, e.scale_off, e.compute_off // 2, e.shape[0], e.numel // e.shape[0])
            for e in self.entries if e.stage_dtype == FP8]) \
            if self.quantized and not fp8_matmul and compute_dtype == torch.bfloat16 else None
        self.packs = exponent_pack.PackTable.of([(e.stage_off, e.code_off, e.compute_off, e.numel, e.base)
                                                 for e in self.entries if e.packed])
        self.host_bytes = 0  # bytes this copy holds in host RAM (0 when it reads the mapped file)
        self.spans: list[tuple[str, int, int]] = []
        if pinned or self.quantized:
            # One contiguous host buffer: a single copy per block, at full PCIe speed when pinned.
            # Filled first (tensors as they are in the file read straight from it by several
            # threads), page-locked after.
            raw, buf = host_buffer(self.stage_bytes)
            reads, done = [], 0
            for e in self.entries:
                src = tensors[e.name].detach()
                # as stored: read from the file; fp8 entries need their scales computed, so never
                where = file_range(src) if e.stage_dtype == src.dtype != FP8 else None
                if where is not None:
                    reads.append((buf[e.stage_off:e.stage_off + e.numel * e.dtype.itemsize], *where))
                    continue
                will_need(src)
                if e.stage_dtype == FP8:
                    q, s = fp8_quantize(src)
                    buf[e.stage_off:e.stage_off + q.numel()].view(q.dtype).copy_(q.reshape(-1))
                    buf[e.scale_off:e.scale_off + s.numel() * 4].view(torch.float32).copy_(s)
                elif e.packed:
                    at, bits = exponent_pack.pack_into(src, e.base, buf[e.stage_off:e.stage_off + e.numel],
                                                       buf[e.code_off:e.code_off + e.numel // 2], work_device)
                    k = at.numel()
                    places = buf[self.listed_at_off + 8 * done:self.listed_at_off + 8 * (done + k)].view(torch.int64)
                    places.copy_(at + e.compute_off // 2)  # places in the compute buffer, in bf16 units
                    buf[self.listed_bits_off + 2 * done:self.listed_bits_off + 2 * (done + k)].view(
                        torch.int16).copy_(bits)
                    done += k
                else:
                    buf[e.stage_off:e.stage_off + e.numel * e.dtype.itemsize].view(e.dtype).view(
                        e.shape).copy_(src)
            read_into(reads)
            self.host = pin(raw, buf, self) if pinned else buf
            self.sources = None
            self.host_bytes = self.stage_bytes
        else:
            # Memory-mapped: read from the file through the pinned ring (file_reads) where the
            # bytes are as stored, else copied tensor by tensor out of the file mapping.
            self.host = None
            self.sources = [tensors[e.name].detach() for e in self.entries]
            ranges = [file_range(src) for src in self.sources]
            self.file_ranges = [r if src.dtype == e.dtype else None
                                for e, src, r in zip(self.entries, self.sources, ranges)]
            self.spans = [(*r, src.numel() * src.element_size()) for src, r in zip(self.sources, ranges)
                          if r is not None]  # what a Prefetch reads for this block

    def copy_into(self, stage: torch.Tensor, non_blocking: bool) -> None:
        if self.host is not None:
            stage[: self.stage_bytes].copy_(self.host, non_blocking=non_blocking)
            return
        reads = []
        for e, src, where in zip(self.entries, self.sources, self.file_ranges):
            view = stage[e.stage_off:e.stage_off + e.numel * e.dtype.itemsize]
            if where is not None and cached(src):
                reads.append((view, *where))
                continue
            will_need(src)  # one large read of the tensor instead of page-by-page faults
            view.view(e.dtype).view(e.shape).copy_(src.to(e.dtype) if src.dtype != e.dtype else src,
                                                   non_blocking=non_blocking)
        copy_to_device(reads)

    def advise(self) -> None:
        """Start the disk reading this block, if it is copied out of the file mapping."""
        for src in self.sources or ():
            will_need(src)

    def dequantize(self, stage: torch.Tensor, compute: torch.Tensor, tables: dict[bytes, torch.Tensor]) -> None:
        """fp8 entries of `stage` -> bf16 in `compute` (on the current stream): one kernel launch for
        the block where block_dequant can, else a compiled kernel per matrix. `tables`: the
        caller's device copies of chunk tables, by layout."""
        if self.packed:
            self._unpack(stage, compute, tables)
            return
        if self.chunks is not None:
            table = tables.get(self.chunks.key)
            if table is None:
                table = tables[self.chunks.key] = self.chunks.rows.to(stage.device)
            if dequantize_block(stage, compute, table):
                return
        w8s, scales, outs = [], [], []
        for e in self.entries:
            if e.stage_dtype == FP8:
                w8s.append(stage[e.stage_off:e.stage_off + e.numel].view(FP8).view(e.shape))
                scales.append(stage[e.scale_off:e.scale_off + e.shape[0] * 4].view(torch.float32))
                nbytes = e.numel * e.dtype.itemsize
                outs.append(compute[e.compute_off:e.compute_off + nbytes].view(e.dtype).view(e.shape))
        dequantize_into(w8s, scales, outs)

    def _unpack(self, stage: torch.Tensor, compute: torch.Tensor, tables: dict[bytes, torch.Tensor]) -> None:
        out16 = compute.view(torch.int16)
        table = None
        if self.packs is not None:
            table = tables.get(self.packs.key)
            if table is None:
                table = tables[self.packs.key] = self.packs.rows.to(stage.device)
        if table is None or not exponent_pack.unpack_block(stage, compute, table):
            for e in self.entries:
                if e.packed:
                    exponent_pack.unpack_into(stage[e.stage_off:e.stage_off + e.numel],
                                              stage[e.code_off:e.code_off + e.numel // 2], e.base,
                                              out16[e.compute_off // 2:e.compute_off // 2 + e.numel])
        k = self.listed
        exponent_pack.patch(out16, stage[self.listed_at_off:self.listed_at_off + 8 * k].view(torch.int64),
                            stage[self.listed_bits_off:self.listed_bits_off + 2 * k].view(torch.int16))

    def bound_names(self) -> list[tuple[str, torch.dtype]]:
        """(name, dtype) of every tensor `views` binds into the block."""
        out = []
        for e in self.entries:
            if self.fp8_matmul and e.stage_dtype == FP8:
                out += [(e.name, FP8), (e.name + "_scale", torch.float32)]
            else:
                out.append((e.name, e.dtype))
        return out

    def views(self, stage: torch.Tensor, compute: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The block's tensors on the device (fp8 entries from `compute`, once dequantised; as they
        are, with their scales, for fp8 matmuls)."""
        out = {}
        for e in self.entries:
            nbytes = e.numel * e.dtype.itemsize
            if self.fp8_matmul and e.stage_dtype == FP8:
                out[e.name] = stage[e.stage_off:e.stage_off + e.numel].view(FP8).view(e.shape)
                out[e.name + "_scale"] = stage[e.scale_off:e.scale_off + e.shape[0] * 4].view(torch.float32)
                continue
            if e.stage_dtype == FP8 or e.packed:
                t = compute[e.compute_off:e.compute_off + nbytes].view(e.dtype).view(e.shape)
            else:
                t = stage[e.stage_off:e.stage_off + nbytes].view(e.dtype).view(e.shape)
            out[e.name] = t
        return out


class Slots:
    """Named tensors of a module, each resolved once to its owner module and leaf: pointing them at
    other tensors (a parameter through `.data`, a buffer by assignment) is then a plain loop,
    cheap enough for every block of every step."""

    def __init__(self, module: nn.Module, names: list[str]):
        self.names = tuple(names)
        self._slots = []
        for name in names:
            owner, _, leaf = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            self._slots.append((name, mod, leaf, leaf in mod._parameters))

    def current(self) -> dict[str, torch.Tensor]:
        return {name: (mod._parameters[leaf].data if param else mod._buffers[leaf])
                for name, mod, leaf, param in self._slots}

    def bind(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, mod, leaf, param in self._slots:
            if param:
                mod._parameters[leaf].data = tensors[name]
            else:
                mod._buffers[leaf] = tensors[name]


_SLOTS: "weakref.WeakKeyDictionary[nn.Module, Slots]" = weakref.WeakKeyDictionary()


def slots_of(module: nn.Module, names: list[str]) -> Slots:
    """`Slots(module, names)`, kept with the module: each run's streamer binds the same blocks, and
    resolving ~20 names for each of 30 blocks took milliseconds of every image's start."""
    slots = _SLOTS.get(module)
    if slots is None or slots.names != tuple(names):
        slots = _SLOTS[module] = Slots(module, names)
    return slots


class BlockStreamer:
    """Streams `blocks` (in the order the model calls them, every forward) through `n_buffers`
    device buffers. `attach()` hooks the blocks, `close()` unhooks them and frees every buffer."""

    def __init__(self, blocks: Sequence[tuple[nn.Module, HostBlock]], device: torch.device,
                 n_buffers: int = 3, passes: int | None = None, once: Sequence[int] = ()):
        """`passes`: how many times the run calls every block (a denoise: its steps), so that the
        last pass does not copy the first blocks again for a pass that never comes (at 8 GiB on an
        H100 the end of each image waited 11 ms for them). None: unknown, copies wrap around.
        `once`: positions of blocks called in the first pass only (the context refiner, whose output
        later passes replay: caption_refine); their hooks come off after that call."""
        if not blocks:
            raise ValueError("nothing to stream")
        self.device = torch.device(device)
        self.blocks = list(blocks)
        self.n = min(n_buffers, len(self.blocks))
        self.cuda = self.device.type == "cuda"
        stage_bytes = max(h.stage_bytes for _, h in self.blocks)
        self.stage = [torch.empty(stage_bytes, dtype=torch.uint8, device=self.device) for _ in range(self.n)]
        fp8 = any(h.dequantized for _, h in self.blocks)
        compute_bytes = max(h.compute_bytes for _, h in self.blocks)
        # one dequantisation buffer: blocks run one after another on the compute stream
        self.compute = torch.empty(compute_bytes, dtype=torch.uint8, device=self.device) if fp8 else None
        self._tables: dict[bytes, torch.Tensor] = {}  # dequantisation chunk tables on the device
        self.index = {id(m): i for i, (m, _) in enumerate(self.blocks)}
        # Blocks copied out of the file mapping have the disk read them this many blocks ahead of
        # their copy (about READ_AHEAD bytes): one long read instead of one per block.
        per_block = max(h.stage_bytes for _, h in self.blocks)
        self.read_ahead = max(1, READ_AHEAD // per_block) if any(h.sources for _, h in self.blocks) else 0
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(self.device)
            self.extra_stream = torch.cuda.Stream(self.device)  # interleave's copies, beside the streamer's
            self.copied = [torch.cuda.Event() for _ in range(self.n)]
            self.freed = [torch.cuda.Event() for _ in range(self.n)]
        # What an unbound block's tensors point at: one empty tensor per dtype, shared.
        empty = {dt: torch.empty(0, dtype=dt, device=self.device) for _, h in self.blocks
                 for dt in {dt for _, dt in h.bound_names()}}
        self._placeholders: dict[int, dict[str, torch.Tensor]] = {}
        self._slots: dict[int, Slots] = {}
        for m, h in self.blocks:
            names = h.bound_names()
            self._placeholders[id(m)] = {n: empty[dt] for n, dt in names}
            self._slots[id(m)] = slots_of(m, [n for n, _ in names])
        self._handles: dict[int, list] = {}
        self._prefetch: Prefetch | None = None
        self._prefetch_left = 0
        # The calls the run makes, numbered 0, 1, ...: the first pass calls every block, the later
        # ones all but the `once` blocks (call_pos maps a call to its block).
        self.once = frozenset(once)
        self.cycle = [i for i in range(len(self.blocks)) if i not in self.once]
        self.total_calls = len(self.blocks) + (passes - 1) * len(self.cycle) if passes is not None \
            else None if self.cycle else len(self.blocks)
        self._pending: dict[int, int] = {}  # call number -> buffer slot holding (or receiving) its block
        self._call = 0  # the call expected next
        self.copies = 0  # blocks copied since attach (for tests)
        self._extra: list = []  # other copies to slip in between this streamer's (see interleave)
        self.interleaved = 0  # how many of them it issued (for tests and reports)

    def attach(self) -> "BlockStreamer":
        self._restart(0)  # the first copies first: the hooks are set up while they run
        for m, _ in self.blocks:
            self._unbind(m)
            self._handles[id(m)] = [m.register_forward_pre_hook(self._before), m.register_forward_hook(self._after)]
        return self

    @property
    def _next(self) -> int:
        """Position of the block expected to run next."""
        return self._pos(self._call)

    def _pos(self, call: int) -> int:
        n = len(self.blocks)
        return call if call < n or not self.cycle else self.cycle[(call - n) % len(self.cycle)]

    def _will_call(self, call: int) -> bool:
        return self.total_calls is None or call < self.total_calls

    def interleave(self, copies: list) -> None:
        """Other copies for this link, each `(d, c)`: `c.issue(stream)` starts it, and the model
        calls its block after the streamed block at position d - 1. Each starts, on a stream beside
        this streamer's, right after one of its own copies: when the link was idle (the copies run
        ahead of compute), or once its block is `n_buffers` streamed blocks away. So they neither
        take the link from the blocks needed first nor come late. H100, one run: at 12 GiB 0.116 s
        a step against 0.120 with every copy issued at the start, 8 GiB fp8 0.1205 against 0.1214;
        at the copy limit (8 and 6 GiB bf16) the same within 2%. Queued on the streamer's own
        stream instead, they cost 2.7% at 8 GiB bf16. Whatever is left when a block is called is
        the block's own business (runtime.DeferredCopy)."""
        self._extra = sorted(copies, key=lambda dc: dc[0])
        self._slip_in(-1, idle=False)

    def _slip_in(self, call: int, idle: bool) -> None:
        while self._extra:
            d, c = self._extra[0]
            if not (idle or d - 1 - self.n <= call):
                return
            self._extra.pop(0)
            c.issue(self.extra_stream if self.cuda else None)
            self.interleaved += 1
            idle = False  # one per idle link: the next streamed copy comes first

    def close(self) -> None:
        for hs in self._handles.values():
            for h in hs:
                h.remove()
        self._handles.clear()
        self._end_prefetch()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        for m, _ in self.blocks:  # a block that failed mid-forward still points into a buffer
            self._unbind(m)
        self._pending.clear()
        self._extra = []  # copies not slipped in: their blocks issue them when called
        self.stage, self.compute, self._tables = [], None, {}

    # -- internals -------------------------------------------------------------------------
    def _issue(self, call: int, slot: int) -> None:
        pos = self._pos(call)
        _, host = self.blocks[pos]
        if self._prefetch is not None:
            self._prefetch.done(sum(n for _, _, n in host.spans))
            self._prefetch_left -= 1
            if self._prefetch_left == 0:
                self._end_prefetch()
        elif self.read_ahead:
            self.blocks[self._pos(call + self.read_ahead)][1].advise()
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[slot])
                host.copy_into(self.stage[slot], non_blocking=True)
                self.copied[slot].record(self.copy_stream)
        else:
            host.copy_into(self.stage[slot], non_blocking=False)
        self._pending[call] = slot
        self.copies += 1

    def _restart(self, call: int) -> None:
        """(Re)fill the pipeline so that `call` is the next one; used at attach and whenever the
        call order is not the expected one (an interrupted step, a different code path)."""
        if self.cuda:
            torch.cuda.current_stream(self.device).synchronize()
            self.copy_stream.synchronize()
            for ev in self.freed:
                ev.record(torch.cuda.current_stream(self.device))
        self._pending.clear()
        self._end_prefetch()
        order = [self.blocks[self._pos(call + k)][1] for k in range(len(self.blocks)) if self._will_call(call + k)]
        if order and order[0].sources and not cached(order[0].sources[0]):
            # a cold file: one cycle of the blocks read in call order by a background thread
            self._prefetch = Prefetch([span for h in order for span in h.spans], lead=2 * READ_AHEAD)
            self._prefetch_left = len(order)
        else:
            for h in order[:self.read_ahead]:
                h.advise()
        for k in range(self.n):
            if k == 0 or self._will_call(call + k):
                self._issue(call + k, k)
        self._call = call

    def _find(self, pos: int) -> int:
        """The next call of the block at `pos` from the expected one on (a block called out of turn)."""
        for call in range(self._call, self._call + len(self.blocks) + len(self.cycle)):
            if self._pos(call) == pos:
                return call
        return pos

    def _end_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def _unbind(self, module: nn.Module) -> None:
        self._slots[id(module)].bind(self._placeholders[id(module)])

    def _before(self, module: nn.Module, args) -> None:
        pos = self.index[id(module)]
        if self._pos(self._call) != pos or self._call not in self._pending:
            self._restart(self._find(pos))
        slot = self._pending[self._call]
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        _, host = self.blocks[pos]
        if host.dequantized:
            host.dequantize(self.stage[slot], self.compute, self._tables)
        self._slots[id(module)].bind(host.views(self.stage[slot], self.compute))

    def _after(self, module: nn.Module, args, output) -> None:
        call = self._call
        slot = self._pending.pop(call)
        self._unbind(module)
        if self.index[id(module)] in self.once:
            for h in self._handles.pop(id(module), ()):
                h.remove()
        if self.cuda:
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        idle = bool(self._extra) and self.cuda and self.copy_stream.query()
        if self._will_call(call + self.n):
            self._issue(call + self.n, slot)
        self._slip_in(call, idle)
        self._call = call + 1
