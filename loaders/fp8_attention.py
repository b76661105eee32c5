"""Attention in fp8 on Hopper GPUs: cuDNN's fp8 attention, the `cudnn_fp8` attention backend.

PyTorch's SDPA has no fp8 attention (2.11); cuDNN has one, reached through NVIDIA's cuDNN frontend
package (`pip install nvidia-cudnn-frontend`), which builds a graph per shape (under a second,
once per process and shape) and runs it on PyTorch's tensors and stream. At a 1024x1024 step
(4128 tokens, 30 heads of 128) on an H100 it took 0.314 ms a layer against 0.493 for PyTorch's
cuDNN bf16 attention, and an eager fp8 image 0.594 s against 0.640 with bf16 attention (39.4 dB
against eager bf16; bench/NOTES.md, session 12). The graph takes each image's token count (a
padding mask) even when nothing is masked: it ran faster so (0.314 against 0.354 ms); padding
the tokens to 4160 or 4224 did not (0.321, 0.323).

q, k and v go in as float8_e4m3fn with one float32 scale each; the probabilities are scaled by
448 inside; the output comes out in fp8 (Hopper has no other), scaled as v. Where the scales come
from:
- q and k: RMS-normalised per head, then scaled by the norm's weight and rotated, so no value can
  exceed sqrt(head_dim) x max|weight|: a scale known before the data, applied in the norm's own
  kernel (norm_rope, `fp8=True`);
- v: its absolute maximum, one reduction, then one pass that writes v in fp8 (`quantize`);
- the output: v's scale, since each output row is a weighted mean of v's rows. It goes to an fp8
  out-projection as it is (`Fp8Rows`, the scale repeated per row), or is dequantised for a bf16 one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .fp8_rows import FP8, FP8_MAX, MIN_SCALE, Fp8Rows
from .gpu_kernels import Guarded
from .packages import why_missing

try:  # Triton ships with PyTorch's CUDA wheels on Linux; not on CPU builds, often not on Windows
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

PACKAGE, PIP_NAME, LOWEST = "cudnn", "nvidia-cudnn-frontend", "1.32.0"  # the version measured
MIN_TOKENS = 256  # shorter sequences (the caption refiner's) stay in bf16: too little work to gain
_BLOCK, _WARPS = 4096, 8  # fp8 quantiser: values a program, warps


def why_unavailable(device: torch.device) -> str | None:
    """None if fp8 attention can run on `device`; else why, and the fix."""
    if device.type != "cuda":
        return f"cudnn_fp8 runs on NVIDIA Hopper GPUs only and this run is on {device.type}; pick sdpa"
    cc = torch.cuda.get_device_capability(device)
    if cc < (9, 0):
        return f"cudnn_fp8 needs a Hopper GPU (compute capability 9.0; {torch.cuda.get_device_name(device)} has " \
               f"{cc[0]}.{cc[1]}); pick sdpa"
    if not torch.backends.cudnn.is_available():
        return "this torch build has no cuDNN; install PyTorch's CUDA build"
    return why_missing(PACKAGE, PIP_NAME, LOWEST)


def fits(q: torch.Tensor) -> bool:
    """Whether a [batch, tokens, heads, head_dim] attention goes to fp8 here: on a GPU, eagerly,
    long enough, head_dim a multiple of 16 (fp8 tensor cores)."""
    return (triton is not None and q.is_cuda and q.ndim == 4 and q.shape[1] >= MIN_TOKENS and q.shape[3] % 16 == 0
            and q.shape[3] <= 256 and not torch.compiler.is_compiling())


class Fp8Tensor(NamedTuple):
    """A tensor as float8_e4m3fn `values` and one float32 `descale` [1, 1, 1, 1] (values x descale
    = the tensor); `dtype`: the tensor's own. v's quantiser also writes what the attention's output
    needs of its scale: `scale` (1 / descale) and `row_descales` (descale per token row,
    [batch * tokens, 1]), on a GPU in its own kernel; q and k (norm_rope's kernel) have None."""
    values: torch.Tensor
    descale: torch.Tensor
    dtype: torch.dtype
    scale: torch.Tensor | None = None
    row_descales: torch.Tensor | None = None


if triton is not None:
    @triton.jit
    def _per_tensor(x_ptr, amax_ptr, q_ptr, descale_ptr, scale_ptr, rows_ptr, n, rows, BLOCK: tl.constexpr):
        """x / (amax / 448) in fp8, rounded to nearest; program 0 writes the descale and its inverse,
        the first programs the descale once per row (two small PyTorch launches fewer a layer)."""
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        m = i < n
        s = tl.maximum(tl.load(amax_ptr).to(tl.float32) * (1.0 / 448.0), 1e-12)
        x = tl.load(x_ptr + i, mask=m, other=0.0).to(tl.float32)
        tl.store(q_ptr + i, tl.clamp(tl.math.div_rn(x, s), -448.0, 448.0).to(q_ptr.dtype.element_ty), mask=m)
        tl.store(rows_ptr + i, tl.zeros([BLOCK], dtype=tl.float32) + s, mask=i < rows)
        if tl.program_id(0) == 0:
            tl.store(descale_ptr, s)
            tl.store(scale_ptr, tl.math.div_rn(1.0, s))


def _quantize(x: torch.Tensor) -> Fp8Tensor:
    amax = torch.linalg.vector_norm(x, ord=math.inf)  # one reduction, no |x| written out
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    descale, scale = torch.empty(2, 1, 1, 1, 1, dtype=torch.float32, device=x.device)
    rows = torch.empty(x.shape[:2].numel(), 1, dtype=torch.float32, device=x.device)  # x [batch, tokens, ...]
    with torch.cuda.device(x.device):  # Triton launches on the current device (gpu_kernels)
        _per_tensor[(triton.cdiv(x.numel(), _BLOCK),)](x, amax, q, descale, scale, rows, x.numel(), rows.shape[0],
                                                       BLOCK=_BLOCK, num_warps=_WARPS)
    return Fp8Tensor(q, descale, x.dtype, scale, rows)


_launch = Guarded(_quantize)


def quantize(x: torch.Tensor) -> Fp8Tensor:
    """x [batch, tokens, ...] to fp8 with one scale, max|x| / 448: two kernels on a GPU (v, whose
    values no bound limits), else PyTorch's operations."""
    if triton is not None and x.is_cuda and x.is_contiguous() and not torch.compiler.is_compiling():
        out = _launch(x)
        if out is not None:
            return out
    descale = (x.abs().amax().float() * (1.0 / FP8_MAX)).clamp(min=MIN_SCALE).reshape(1, 1, 1, 1)
    rows = descale.reshape(1, 1).expand(x.shape[:2].numel(), 1).contiguous()
    return Fp8Tensor((x.float() / descale).clamp(-FP8_MAX, FP8_MAX).to(FP8), descale, x.dtype, 1.0 / descale, rows)


class _Graph:
    """cuDNN's fp8 attention for one shape, built once: [batch, heads, tokens, head_dim] views of
    [batch, tokens, heads, head_dim] tensors (the layout the model makes them in), each batch
    item's own token count (a padding mask), no causal mask."""

    def __init__(self, device: torch.device, batch: int, tokens: int, heads: int, head_dim: int):
        import cudnn

        with torch.cuda.device(device):
            self.handle = cudnn.create_handle()
        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        g = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32, handle=self.handle)
        shape = (batch, heads, tokens, head_dim)
        strides = (tokens * heads * head_dim, head_dim, heads * head_dim, 1)
        self.q, self.k, self.v = (g.tensor(name=n, dim=shape, stride=strides, data_type=e4m3) for n in "qkv")
        one = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
        self.scales = [g.tensor(name=n, **one) for n in ("dq", "dk", "dv", "ds", "ss", "so")]
        lengths = dict(dim=(batch, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.INT32)
        self.len_q, self.len_kv = g.tensor(name="len_q", **lengths), g.tensor(name="len_kv", **lengths)
        self.o, _, amax_s, amax_o = g.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.scales[0], descale_k=self.scales[1],
            descale_v=self.scales[2], descale_s=self.scales[3], scale_s=self.scales[4], scale_o=self.scales[5],
            attn_scale=1.0 / math.sqrt(head_dim), use_causal_mask=False, generate_stats=False,
            use_padding_mask=True, seq_len_q=self.len_q, seq_len_kv=self.len_kv, name="zimage_fp8_attention")
        self.o.set_output(True).set_dim(shape).set_stride(strides).set_data_type(e4m3)
        for a in (amax_s, amax_o):  # the maxima cuDNN measures (for delayed scaling): unused, but outputs
            a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
        self.amax_s, self.amax_o = amax_s, amax_o
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        self.graph, self.cudnn = g, cudnn
        self.workspace = torch.empty(g.get_workspace_size(), dtype=torch.uint8, device=device)
        # the probabilities (at most 1) scaled onto fp8's range, and back
        self.s_scale = torch.full((1, 1, 1, 1), FP8_MAX, dtype=torch.float32, device=device)
        self.s_descale = torch.full((1, 1, 1, 1), 1.0 / FP8_MAX, dtype=torch.float32, device=device)
        self.maxima = torch.empty(2, 1, 1, 1, 1, dtype=torch.float32, device=device)
        self.batch, self.tokens = batch, tokens
        self._mask, self._lengths = None, None

    def lengths(self, mask: torch.Tensor | None) -> torch.Tensor:
        """Each item's token count [batch, 1, 1, 1] int32: counted once per mask (every layer of a
        step gets the same mask tensor; holding it keeps its identity from being reused)."""
        if mask is not self._mask or self._lengths is None:
            b = self.batch
            self._lengths = (torch.full((b, 1, 1, 1), self.tokens, dtype=torch.int32, device=self.workspace.device)
                             if mask is None else mask.reshape(b, -1).sum(dim=1, dtype=torch.int32).reshape(b, 1, 1, 1))
            self._mask = mask
        return self._lengths

    def __call__(self, q8, k8, v8, descale_q, descale_k, descale_v, scale_o, lengths) -> torch.Tensor:
        o8 = torch.empty_like(q8)
        self.cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q8.device).cuda_stream)
        dq, dk, dv, ds, ss, so = self.scales
        self.graph.execute({self.q: q8, self.k: k8, self.v: v8, dq: descale_q, dk: descale_k, dv: descale_v,
                            ds: self.s_descale, ss: self.s_scale, so: scale_o, self.len_q: lengths,
                            self.len_kv: lengths, self.o: o8, self.amax_s: self.maxima[0],
                            self.amax_o: self.maxima[1]}, self.workspace, handle=self.handle)
        return o8


_GRAPHS: dict[tuple, _Graph] = {}


def attend(q: Fp8Tensor, k: Fp8Tensor, v: Fp8Tensor, mask: torch.Tensor | None) -> Fp8Rows:
    """softmax(q k^T / sqrt(d)) v in fp8; q, k, v [batch, tokens, heads, head_dim]. mask: None, or
    [batch, tokens] True for each item's tokens (a prefix: Z-Image pads a batch's shorter
    sequences at the end). The output as fp8 rows [batch, tokens, heads * head_dim] with their
    descale (v's, repeated per token), as an fp8 out-projection takes them."""
    b, s, h, d = q.values.shape
    key = (q.values.device, b, s, h, d)
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = _GRAPHS[key] = _Graph(q.values.device, b, s, h, d)
    o8 = graph(q.values, k.values, v.values, q.descale, k.descale, v.descale, v.scale, graph.lengths(mask))
    return Fp8Rows(o8.reshape(b, s, h * d), v.row_descales, q.dtype)


def dequantize(o: Fp8Rows) -> torch.Tensor:
    """fp8 rows back to their dtype (for a bf16 out-projection)."""
    return (o.q.float() * o.scale.reshape(*o.q.shape[:-1], 1)).to(o.dtype)
