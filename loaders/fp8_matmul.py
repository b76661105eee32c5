"""fp8 matmuls for the transformer's repeated blocks (Hopper and Ada GPUs; any CPU).

Every linear layer of a block keeps its weight as float8_e4m3fn with one float32 scale per output
row (the same per-row layout the streamer's fp8 storage uses), and multiplies with
`torch._scaled_mm`: the activations are quantised per token (row) on the fly (fp8_rows; or arrive
quantised, as `Fp8Rows`), the product comes out in bf16. Half the weight memory and half the bytes
streamed, and on Hopper the fp8 tensor cores. The adaLN projections see one row per image: too few
rows for fp8 GEMMs, so they dequantise their (small) weight and multiply in bf16.

The GEMMs accumulate with Hopper's fast fp8 accumulation: at a 1024x1024 step's shapes on an H100
a layer's products took 1.09 ms against 1.28 with cuBLAS's extra float32 promotion, and their
error against float32 products stayed 0.0375 either way (the fp8 rounding of the inputs is what
costs; bench/NOTES.md).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8_rows
from .errors import ZImageError
from .fp8_rows import FP8, FP8_MAX, Fp8Rows
from .gpu_kernels import Fused

_MIN_ROWS = 16  # fp8 GEMMs want every dimension a multiple of 16


def fp8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weights, float32 per-row scales) for a 2-D weight."""
    w32 = w.float()
    scale = (w32.abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w32 / scale[:, None]).to(FP8), scale


def _dequantize(w8s: list[torch.Tensor], scales: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
    # float32 products rounded once to the output dtype: the same bits however it is run
    for w8, scale, out in zip(w8s, scales, outs):
        out.copy_(w8.to(torch.float32) * scale[:, None])


# Each `out` (bf16) = fp8 `w8` x its per-row `scale`: a block's matrices in one call, one fused
# kernel per matrix on a GPU. Eager PyTorch takes two passes over each bf16 result, 3x the memory
# traffic. Static shapes (a graph for the layers, one for the context refiners): with dynamic
# ones the kernels divide by a runtime row length for every element and ran at half the speed
# (H100: 0.58 against 0.28 ms a block, bench/kernel_options.py).
dequantize_into = Fused(_dequantize, dynamic=False)


class Fp8Linear(nn.Module):
    """A bias-optional linear layer with an fp8 per-row-scaled weight (`weight`, `weight_scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 weight: torch.Tensor, weight_scale: torch.Tensor):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor | Fp8Rows) -> torch.Tensor:
        """`x`: the activation, or its rows already quantised (see takes_rows)."""
        rows = x.shape.numel() // self.in_features
        if isinstance(x, Fp8Rows):
            xq = x
        elif not self.takes_rows(rows):
            w = self.weight.to(x.dtype) * self.weight_scale[:, None].to(x.dtype)
            return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        else:
            xq = fp8_rows.quantize(x.reshape(rows, self.in_features))
        out = torch._scaled_mm(xq.q.reshape(rows, self.in_features), self.weight.t(), scale_a=xq.scale,
                               scale_b=self.weight_scale[None, :],
                               bias=None if self.bias is None else self.bias.to(xq.dtype), out_dtype=xq.dtype,
                               use_fast_accum=True)
        return out.reshape(*x.shape[:-1], self.out_features)

    def takes_rows(self, rows: int) -> bool:
        """Whether `rows` activation rows go through an fp8 GEMM (else: a bf16 product with the weight
        dequantised), so that a caller may hand them over as `Fp8Rows`."""
        return rows >= _MIN_ROWS and not rows % _MIN_ROWS and not self.in_features % _MIN_ROWS \
            and not self.out_features % _MIN_ROWS


def take_fp8_rows(x: torch.Tensor, *linears: nn.Module) -> bool:
    """Whether these linear layers, all fed x, multiply its rows in fp8: a kernel making x may hand
    them its rows quantised (`Fp8Rows`)."""
    rows = x.numel() // x.shape[-1]
    return all(isinstance(m, Fp8Linear) and m.takes_rows(rows) for m in linears)


def check_supported(device: torch.device) -> None:
    """fp8 GEMMs need compute capability 8.9 (Ada) or 9.0 (Hopper) on NVIDIA GPUs."""
    if device.type != "cuda":
        return
    cc = torch.cuda.get_device_capability(device)
    if cc < (8, 9):
        raise ZImageError("fp8 matmuls need an Ada or Hopper GPU", where="loader input 'matmul'",
                          expected="compute capability 8.9 or newer (RTX 40xx, L4, L40, H100, H200, RTX 50xx)",
                          found=f"{torch.cuda.get_device_name(device)} (compute capability {cc[0]}.{cc[1]})",
                          fix="set matmul to bf16 (streamed_weights fp8 still halves the bytes streamed on this "
                              "GPU).")


def linear_names(block: nn.Module) -> list[str]:
    """The block's linear layers: the ones fp8 matmuls replace (every 2-D weight of a block)."""
    return [n for n, m in block.named_modules() if isinstance(m, (nn.Linear, Fp8Linear))]


def to_fp8_linears(block: nn.Module, weights: dict[str, torch.Tensor] | None) -> None:
    """Replace `block`'s linear layers by Fp8Linear, in place. `weights` maps each linear's name to
    its bf16 weight to quantise (on the block's device, one layer at a time, so the peak is one
    layer's bf16 copy); None leaves empty fp8 placeholders for a streamer to bind."""
    for name in linear_names(block):
        lin = block.get_submodule(name)
        if isinstance(lin, Fp8Linear):
            continue
        device = lin.bias.device if lin.bias is not None else lin.weight.device
        if weights is None:
            q = torch.empty(0, dtype=FP8, device=device)
            s = torch.empty(0, dtype=torch.float32, device=device)
        else:
            q, s = fp8_quantize(weights[name].to(device))
        new = Fp8Linear(lin.in_features, lin.out_features, lin.bias, q, s)
        owner, _, leaf = name.rpartition(".")
        setattr(block.get_submodule(owner) if owner else block, leaf, new)
