"""The loaded model as the nodes pass it around: three handles sharing one device and plan.

Each handle keeps its component memory-mapped on the CPU and hands out a module on the run's
device for the duration of a `with` block, as the memory plan says: the transformer with its
resident blocks on the GPU and the rest streamed, the text encoder copied whole or streamed
and then freed, the VAE copied for the decode and freed.
"""
from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .caption_refine import RefinedCaptions, once_per_caption
from .component_loading import LoadedComponent
from .device_copy import Copy, device_copy
from .device_hops import DeviceHops
from .fp8_matmul import linear_names, to_fp8_linears
from .host_cache import HOST_CACHE, source_key
from .model_sizes import ModelSizes
from .pinned_memory import HostStage
from .placement import ONCE_PER_CAPTION, Matmul, MemoryPlan, Storage, Where, packs_weights, plan_devices
from .streaming import BlockStreamer, HostBlock, Slots

PACKING_THREADS = 4  # packed host copies built at once (on a GPU each holds ~100 MB of work memory)


@dataclass
class Runtime:
    device: torch.device  # the first (or only) GPU: the transformer's stem, the sampler's tensors
    dtype: torch.dtype  # compute dtype of transformer and text encoder
    vae_dtype: torch.dtype
    sizes: ModelSizes
    vram_budget_gb: float
    ram_budget_gb: float
    storage: Storage
    plan: MemoryPlan  # the plan of the last (or the loader's default) shape
    fixed_plan: bool = False  # tests and benchmarks may pin a hand-made plan
    matmul: Matmul = Matmul.BF16
    # Several GPUs: each device and its budget (GB); empty for one device (`device`, `vram_budget_gb`).
    devices: tuple[str, ...] = ()
    vram_budgets_gb: tuple[float, ...] = ()
    # Frees the named resident transformer blocks' GPU memory until the next run (set by the
    # transformer's handle; the decode calls it when its plan moves blocks out).
    move_out: Callable[[tuple[str, ...]], bool] | None = None

    def plan_for(self, height: int, width: int, batch: int) -> MemoryPlan:
        if not self.fixed_plan and (self.plan.height, self.plan.width, self.plan.batch) != (height, width, batch):
            self.plan = plan_devices(self.sizes, list(self.devices) or [str(self.device)],
                                     list(self.vram_budgets_gb) or [self.vram_budget_gb], self.ram_budget_gb, height,
                                     width, batch, self.storage, self.matmul)
        return self.plan


def free_device_cache(device: torch.device, collect: bool = False) -> None:
    """Give cached GPU blocks back to the driver. `collect` also runs the garbage collector, which
    costs 0.1-0.3 s in a large process: only for releases and failures, never per image."""
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _block_of(name: str, blocks: list[str]) -> str | None:
    for b in blocks:
        if name.startswith(b + "."):
            return b
    return None


def _bound_buffer(block: nn.Module, host: HostBlock, device: torch.device) -> torch.Tensor:
    """A new device buffer laid out as `host`, with `block`'s tensors bound to views of it (the bytes
    are not copied yet)."""
    buf = torch.empty(host.stage_bytes, dtype=torch.uint8, device=device)
    views = host.views(buf, None)
    Slots(block, list(views)).bind(views)
    return buf


def _issue_all(copies, device: torch.device) -> torch.cuda.Stream | None:
    """Start DeferredCopy objects now, on one stream of their own (None on a CPU); returns it."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    for c in copies:
        c.issue(side)
    return side


class DeferredCopy:
    """A block's way back to the GPU after a decode moved it out: its buffer is allocated and bound
    now, its copy issued later on a copy stream - by a streamer between its own copies
    (BlockStreamer.interleave), or at the latest by the block's own call - and the compute stream
    waits for it only at that call. Issued all at once when a run starts, they take the link from
    its first streamed blocks: 12 GiB, 0.120 s a step against 0.116 slipped in (H100, one run of
    bench/streaming_budgets.py with MOVEBACK_AB=1)."""

    def __init__(self, block: nn.Module, host: HostBlock, device: torch.device):
        self.host, self.device = host, device
        self.buf = _bound_buffer(block, host, device)
        cuda = device.type == "cuda"
        # where the buffer's memory is free: a copy stream waits for this, not for all compute so far
        self._free = torch.cuda.current_stream(device).record_event() if cuda else None
        self.copied: torch.cuda.Event | None = None
        self.issued = False
        self._hook = block.register_forward_pre_hook(self._before_call)

    def issue(self, stream: torch.cuda.Stream | None) -> None:
        """Start the copy on `stream` (None: a CPU, synchronous)."""
        if self.issued:
            return
        self.issued = True
        if stream is None:
            self.host.copy_into(self.buf, non_blocking=False)
            return
        stream.wait_event(self._free)
        with torch.cuda.stream(stream):
            self.host.copy_into(self.buf, non_blocking=True)
        self.buf.record_stream(stream)  # not reused before the copy lands, whatever happens
        self.copied = stream.record_event()

    def _before_call(self, module, args) -> None:
        self._hook.remove()
        if not self.issued:  # nobody slipped it in earlier: now, on a stream of its own
            _issue_all([self], self.device)
        if self.copied is not None:
            self.copied.wait()  # the current (compute) stream waits; the CPU does not


def host_block(component: LoadedComponent, part: str, name: str, where: Where, storage: str,
               dtype: torch.dtype, host_budget_bytes: int, work_device: torch.device | None = None) -> HostBlock:
    """A streamed block's host copy. Pinned copies come from the process's cache (another run,
    resolution or loader of the same file may have made them already); mapped ones are views of
    the file mapping, with nothing to keep (unless fp8 matmuls need them quantised).
    `storage`: "bf16", "fp8", "packed" or "fp8_matmul"; `work_device`: where packing runs."""
    module = component.module
    fp8_matmul = storage == "fp8_matmul"
    if where != Where.PINNED:
        return HostBlock(name, module.get_submodule(name), "bf16", False, dtype, fp8_matmul)
    HOST_CACHE.raise_limit(host_budget_bytes)
    return HOST_CACHE.get(host_key(component, part, name, storage, dtype),
                          lambda: HostBlock(name, module.get_submodule(name), storage, True, dtype, fp8_matmul,
                                            work_device))


def host_key(component: LoadedComponent, part: str, name: str, storage: str, dtype: torch.dtype) -> tuple:
    return source_key(component.path), part, name, storage, str(dtype)


class TransformerHandle:
    """Z-Image's transformer: resident blocks copied once, streamed blocks in host memory."""

    def __init__(self, component: LoadedComponent, runtime: Runtime):
        self.component, self.runtime = component, runtime
        self._replica: nn.Module | None = None
        self._layout: tuple | None = None  # (blocks placement, storage, matmul) the replica was built for
        self._host: dict[str, HostBlock] = {}
        self.streamers: list[BlockStreamer] = []  # the last run's, one per GPU that streams (for reports)
        self.last_hops: DeviceHops | None = None
        self._plan: MemoryPlan | None = None  # the plan the GPU copy was built for
        self._moved_out: set[str] = set()  # resident blocks a decode moved out, back at the next run
        self._deferred: dict[str, DeferredCopy] = {}  # their copies back, until the blocks run
        self.refined = RefinedCaptions()  # the context refiner's last output (caption_refine)
        runtime.move_out = self.move_out

    @contextmanager
    def on_device(self, plan: MemoryPlan, passes: int | None = None,
                  captions: list[torch.Tensor] | None = None) -> Iterator[nn.Module]:
        """The transformer on its devices for one run; `passes`: how many forwards the run makes
        (BlockStreamer). `captions`: the caption features of the batch every forward of the run is
        called with, in order (as given, before any move to the GPU): the context refiner then runs
        at the first forward only, or not at all when the last run had the same (caption_refine).
        Without them it runs, and streams, at every forward."""
        module = self.component.module
        fp8 = plan.matmul == Matmul.FP8
        if all(w == Where.CPU for _, w in plan.blocks) and not fp8:
            with once_per_caption(module, captions, self.refined, ("cpu",)):
                yield module
            return
        block_device = plan.block_device()
        layout = (plan.blocks, plan.storage, plan.matmul, tuple(block_device.values()))
        if self._layout != layout:
            self._replica, self._layout, self._moved_out = None, None, set()
            free_device_cache(self.runtime.device)
            try:
                self._build(plan, block_device)
            except BaseException:
                self._replica, self._host = None, {}  # nothing half-built stays on the GPU
                free_device_cache(self.runtime.device, collect=True)
                raise
            self._layout = layout
        self._deferred = {b: c for b, c in self._deferred.items() if not c.issued}
        returning = self._move_back(plan) if self._moved_out else []
        # refiner blocks a run with these captions never calls (replayed) are not streamed at all
        replayed = captions is not None and self.refined.find(captions, layout) is not None
        streamers, hops = [], None
        try:
            for sub in plan.device_plans or (plan,):  # each GPU streams its own blocks over its own link
                names = [n for n, _ in sub.blocks if n in self._host
                         and not (replayed and n.startswith(ONCE_PER_CAPTION))]
                if names:
                    once = [i for i, n in enumerate(names) if captions is not None and n.startswith(ONCE_PER_CAPTION)]
                    streamers.append(BlockStreamer(
                        [(self._replica.get_submodule(n), self._host[n]) for n in names],
                        torch.device(block_device[names[0]]), n_buffers=sub.n_buffers, passes=passes,
                        once=once).attach())
            if returning and len(streamers) == 1 and not plan.device_plans:
                # slipped in between the streamed blocks' copies: each after the streamed blocks
                # called before it
                order = {n: i for i, (n, _) in enumerate(plan.blocks)}
                streamed = [order[b.name] for _, b in streamers[0].blocks]
                streamers[0].interleave([(sum(1 for i in streamed if i < order[name]), copy)
                                         for name, copy in returning])
            elif returning:  # nothing streamed, or several GPUs: all now, on a stream of their own
                _issue_all([copy for _, copy in returning], self.runtime.device)
            if len(plan.devices) > 1:
                final = {f"all_final_layer.{k}": self.runtime.device for k in self._replica.all_final_layer.keys()}
                hops = DeviceHops(self._replica, {**block_device, **final})
            self.streamers, self.last_hops = streamers, hops
            with once_per_caption(self._replica, captions, self.refined, layout):
                yield self._replica
        finally:
            for st in streamers:
                st.close()
            if hops is not None:
                hops.remove()

    def _build(self, plan: MemoryPlan, block_device: dict[str, str]) -> None:
        """The GPU copy for `plan`: resident blocks copied (from their pinned copy when the plan keeps
        one, else from the mapped file), streamed blocks as placeholders with their host copies."""
        module, where, dtype = self.component.module, dict(plan.blocks), self.runtime.dtype
        fp8 = plan.matmul == Matmul.FP8
        names = list(where)
        resident = {b for b, w in where.items() if w in (Where.GPU, Where.CPU)}
        # resident blocks a release kept in pinned RAM (see release) come back from there
        cached = {b: h for b in set(plan.resident_pinned) & resident
                  if (h := HOST_CACHE.find(host_key(self.component, "transformer", b, "bf16", dtype))) is not None}
        quantised = {f"{b}.{lin}.weight" for b in names for lin in linear_names(module.get_submodule(b))} \
            if fp8 else set()

        def how(name: str) -> Copy:
            b = _block_of(name, names)
            if b is None:
                return Copy.DEVICE
            # fp8 weights of resident blocks are quantised one layer at a time, below
            return Copy.DEVICE if b in resident and b not in cached and name not in quantised else Copy.PLACEHOLDER

        def device_of(name: str) -> torch.device:
            b = _block_of(name, names)
            return torch.device(block_device[b]) if b is not None else self.runtime.device
        self._replica = device_copy(module, self.runtime.device, dtype, how, device_of)
        for b in names:
            if b in cached:
                host = cached[b]
                host.copy_into(_bound_buffer(self._replica.get_submodule(b), host, torch.device(block_device[b])),
                               non_blocking=True)
            elif fp8:
                block = module.get_submodule(b)
                to_fp8_linears(self._replica.get_submodule(b), {
                    lin: block.get_submodule(lin).weight for lin in linear_names(block)} if b in resident else None)
        storage = "fp8_matmul" if fp8 else plan.storage.value
        streamed = [(n, w) for n, w in plan.blocks if w in (Where.PINNED, Where.MAPPED)]
        # Packing runs on the GPU, several blocks at once so that reading the file overlaps it. An
        # 8 GiB plan's 16 streamed blocks took ~6.5 s to build that way against ~7.7 on 16 CPU cores
        # (H100 host, file cached): what remains is reading and pinning. Other host copies are bound
        # by file reads, already threaded.
        packing, work = storage == Storage.PACKED.value, self.runtime.device
        with ThreadPoolExecutor(PACKING_THREADS if packing else 1) as pool:
            hosts = list(pool.map(lambda nw: host_block(self.component, "transformer", *nw, storage, dtype,
                                                        plan.host_budget_bytes, work), streamed))
        if packing:
            free_device_cache(work)  # the packing's work memory, before the streamer's buffers
        self._host = {n: h for (n, _), h in zip(streamed, hosts)}
        self._plan = plan

    def move_out(self, names: tuple[str, ...]) -> bool:
        """Free these resident blocks' GPU memory for a decode that needs it (MemoryPlan.decode_plan):
        each keeps its pinned host copy (made now from the GPU if the cache has none), and the next
        run copies it back. False when a host copy could not be made (out of pinned memory): the
        blocks moved until then stay out, and the decode must tile."""
        if self._replica is None or self._plan is None:
            return True
        self._settle()
        dtype, where = self.runtime.dtype, dict(self._plan.blocks)
        HOST_CACHE.raise_limit(self._plan.host_budget_bytes)
        try:
            for b in names:
                if b in self._moved_out or where.get(b) != Where.GPU:
                    continue
                block = self._replica.get_submodule(b)
                host = HOST_CACHE.get(host_key(self.component, "transformer", b, "bf16", dtype),
                                      lambda b=b, block=block: HostBlock(b, block, "bf16", True, dtype))
                slots = Slots(block, [n for n, _ in host.bound_names()])
                slots.bind({n: t.new_empty(0) for n, t in slots.current().items()})
                self._moved_out.add(b)
        except (RuntimeError, MemoryError, OSError):
            return False
        finally:
            free_device_cache(self.runtime.device)
        return True

    def _settle(self) -> None:
        """Finish the copies back that never ran (a run stopped before those blocks), so that the
        GPU copies hold the weights before they are read back to host memory."""
        pending = [c for c in self._deferred.values() if not c.issued]
        side = _issue_all(pending, self.runtime.device) if pending else None
        if side is not None:
            side.synchronize()
        self._deferred = {}

    def _move_back(self, plan: MemoryPlan) -> list[tuple[str, DeferredCopy]]:
        """The moved-out blocks back on the GPU, from their pinned copy or from the mapped file when
        the host cache has dropped it: each block's name with its deferred copy."""
        dtype, device = self.runtime.dtype, self.runtime.device
        out = []
        try:
            for b, w in plan.blocks:
                if b not in self._moved_out:
                    continue
                host = HOST_CACHE.find(host_key(self.component, "transformer", b, "bf16", dtype)) or HostBlock(
                    b, self.component.module.get_submodule(b), "bf16", False, dtype)
                copy = self._deferred[b] = DeferredCopy(self._replica.get_submodule(b), host, device)
                out.append((b, copy))
                self._moved_out.discard(b)
        except BaseException:
            self.release()  # a replica missing blocks must not run: rebuilt whole next time
            raise
        return out

    def _keep_resident_blocks_in_ram(self) -> None:
        """Before the GPU copy goes: copy the resident blocks the plan has pinned RAM for back to the
        host cache (at PCIe speed, from the GPU), so the next build of this model - a switch back to
        it, another loader of the same file - skips the disk and the page cache. Doing it here rather
        than at the first load keeps the first image as fast as the disk allows."""
        plan, dtype = self._plan, self.runtime.dtype
        if self._replica is None or plan is None:
            return
        HOST_CACHE.raise_limit(plan.host_budget_bytes)
        for b in set(plan.resident_pinned) - self._moved_out:  # moved-out ones have their copy already
            HOST_CACHE.get(host_key(self.component, "transformer", b, "bf16", dtype),
                           lambda b=b: HostBlock(b, self._replica.get_submodule(b), "bf16", True, dtype))

    def release(self) -> None:
        """Free the GPU copy (ComfyUI's 'free memory' and failures); pinned host copies stay in the
        process's bounded cache for the next run."""
        try:
            self._settle()
            self._keep_resident_blocks_in_ram()
        except Exception:  # out of host memory, say: the blocks are read from the file next time
            pass
        self._plan = None
        self._replica, self._layout, self._host, self.streamers = None, None, {}, []
        self.refined.clear()
        self._moved_out, self._deferred = set(), {}
        free_device_cache(self.runtime.device, collect=True)

    @property
    def last_streamer(self) -> BlockStreamer | None:
        return self.streamers[0] if self.streamers else None

    @property
    def gpu_bytes(self) -> int:
        if self._replica is None:
            return 0
        return sum(t.numel() * t.element_size() for t in self._replica.state_dict().values() if t.is_cuda)


class TextEncoderHandle:
    """The text encoder plus its tokenizer and a small cache: an unchanged prompt is not encoded again.
    Leaves nothing on the GPU once a prompt is encoded."""

    CACHE_SIZE = 16

    def __init__(self, component: LoadedComponent, runtime: Runtime, tokenizer):
        self.component, self.runtime, self.tokenizer = component, runtime, tokenizer
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pinned: dict[str, HostBlock] | None = None  # the layers' pinned host copies, once made
        self.encodes = 0  # how many prompts really ran through the encoder

    def encode(self, prompt: str) -> torch.Tensor:
        """[tokens, hidden] caption features on the CPU, in the compute dtype."""
        from .text_encoding import encode_prompt

        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        plan, module = self.runtime.plan, self.component.module
        if plan.text_encoder == "cpu":
            feats = encode_prompt(module, self.tokenizer, prompt)
        else:
            feats = self._encode_streamed(prompt, plan)
        self.encodes += 1
        self._cache[prompt] = feats
        while len(self._cache) > self.CACHE_SIZE:
            self._cache.popitem(last=False)
        return feats

    def _encode_streamed(self, prompt: str, plan: MemoryPlan) -> torch.Tensor:
        from .text_encoding import encode_prompt

        module, device = self.component.module, torch.device(plan.text_encoder_device)
        te = device_copy(module, device, self.runtime.dtype, lambda name: (
            Copy.HOST if name.startswith("embed_tokens.")  # looked up on the CPU: 0.7 GB of table for a few rows
            else Copy.PLACEHOLDER if _block_of(name, self._names) else Copy.DEVICE))
        streamer = BlockStreamer([(te.get_submodule(n), h) for n, h in self._layers(plan).items()], device,
                                 n_buffers=plan.n_buffers, passes=1).attach()
        try:
            return encode_prompt(te, self.tokenizer, prompt).to("cpu")
        finally:
            streamer.close()
            del te, streamer
            free_device_cache(device)

    @property
    def _names(self) -> list[str]:
        return [f"layers.{i}" for i in range(len(self.component.module.layers))]

    def _layers(self, plan: MemoryPlan) -> dict[str, HostBlock]:
        """The layers' host copies for this encode: pinned ones from the second prompt on (or when
        another loader of the file pinned them already); the first prompt streams straight from
        the mapped file. Pinning 8 GB costs seconds; doing it for the first prompt held up the
        first image, and doing it in a background thread slowed the sampling it overlapped (the
        page-locking contends with the kernel launches)."""
        storage = Storage.PACKED.value if packs_weights(plan.storage, plan.matmul) else "bf16"
        work = torch.device(plan.text_encoder_device)  # where packing runs

        def make(where: Where) -> dict[str, HostBlock]:
            return {n: host_block(self.component, "text_encoder", n, where, storage, self.runtime.dtype,
                                  plan.host_budget_bytes, work) for n in self._names}
        if plan.text_encoder_host != Where.PINNED:
            return make(Where.MAPPED)
        if self._pinned is None and (self.encodes > 0 or all(
                HOST_CACHE.find(host_key(self.component, "text_encoder", n, storage, self.runtime.dtype))
                for n in self._names)):
            self._pinned = make(Where.PINNED)
        return self._pinned if self._pinned is not None else make(Where.MAPPED)

    def release(self) -> None:
        self._pinned = None


class VAEHandle:
    """The VAE: off the GPU until a decode, copied there for it from one pinned host copy in the
    decode dtype, and freed after. The module's structure on the device (with empty tensors) is kept
    between decodes, so a decode costs one copy and a rebinding of the weights, no module building."""

    def __init__(self, component: LoadedComponent, runtime: Runtime):
        self.component, self.runtime = component, runtime
        self._shell: tuple[torch.device, nn.Module, Slots, dict[str, torch.Tensor]] | None = None
        self.images = HostStage()  # the decoded images' way to the CPU, kept with the VAE

    @contextmanager
    def on_device(self, keep_memory: bool = False) -> Iterator[nn.Module]:
        """The VAE on its device for the `with` block; its weights and work memory are freed after,
        and handed back to the driver unless `keep_memory` (MemoryPlan.keeps_decode_memory)."""
        device = torch.device(self.runtime.plan.vae_device)
        if device == torch.device("cpu"):
            yield self.component.module
            return
        # One pinned host copy in the decode dtype (kept in the host cache): the copy to the GPU is
        # one transfer at PCIe speed instead of a conversion from the mapped float32 file per decode.
        host = host_block(self.component, "vae", "", Where.PINNED, "bf16", self.runtime.vae_dtype,
                          self.runtime.plan.host_budget_bytes)
        if self._shell is None or self._shell[0] != device:
            shell = device_copy(self.component.module, device, self.runtime.vae_dtype, lambda name: Copy.PLACEHOLDER)
            slots = Slots(shell, [n for n, _ in host.bound_names()])
            self._shell = (device, shell, slots, slots.current())
        _, vae, slots, empty = self._shell
        stage = None
        try:
            stage = torch.empty(host.stage_bytes, dtype=torch.uint8, device=device)
            host.copy_into(stage, non_blocking=True)
            slots.bind(host.views(stage, None))
            yield vae
        finally:
            slots.bind(empty)
            del stage
            if not keep_memory:
                free_device_cache(device)

    def release(self) -> None:
        self._shell = None
        self.images = HostStage()  # its page-locked buffer goes back to the system
        free_device_cache(self.runtime.device, collect=True)


@dataclass(eq=False)  # identity semantics: hashable, usable as a weak key
class ZImagePipelineParts:
    transformer: TransformerHandle
    text_encoder: TextEncoderHandle
    vae: VAEHandle
    runtime: Runtime

    def release(self) -> None:
        for h in (self.transformer, self.text_encoder, self.vae):
            h.release()
