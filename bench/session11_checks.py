"""GPU checks of what session 11 changed and could not run on a GPU before its device time ran out:

- norm_rope's kernel under torch.compile (its `triton_op`, which gained arguments) against eager;
- the fp8 q/k path: its scale (the bound sqrt(head_dim) x max|weight| / 448), the largest value it
  writes, its error against the bf16 result;
- v's fp8 quantiser against PyTorch's arithmetic, bit for bit;
- the residual-then-norm kernel (modulation.gated_residual_norm_scale) against the two kernels it
  stands for, bit for bit, and GPU ms of each, in bf16 and fp8 rows.

    python3 bench/session11_checks.py     # env: OUT; one GPU, no weight files, ~1 min
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from attention_shapes import run_parts, timed  # noqa: E402  (timed: n calls back to back, CUDA events)

from loaders import fp8_attention as fa  # noqa: E402
from loaders import modulation, norm_rope  # noqa: E402
from loaders.real_rope import norm_rotate  # noqa: E402

DEV, BF16 = "cuda", torch.bfloat16
R: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def rms_norm(dim: int, eps: float, spread: float) -> torch.nn.RMSNorm:
    norm = torch.nn.RMSNorm(dim, eps=eps, device=DEV, dtype=BF16)
    norm.weight.data = (1 + spread * torch.randn(dim, device=DEV)).to(BF16)
    return norm


def norm_rope_checks():
    x = torch.randn(1, 4128, 30, 128, device=DEV, dtype=BF16) * 2
    norm = rms_norm(128, 1e-6, 0.3)
    freqs = torch.polar(torch.ones(1, 4128, 64, device=DEV), torch.randn(1, 4128, 64, device=DEV))
    eager = norm_rotate(x, norm, freqs)
    R["norm_rope_kernel_ran"] = norm_rope.launched
    R["compiled_equal_eager"] = bool(torch.equal(torch.compile(lambda t: norm_rotate(t, norm, freqs))(x), eager))
    q8 = norm_rotate(x, norm, freqs, fp8=True)
    R["fp8_q_descale"] = q8.descale.item()
    R["fp8_q_descale_expected"] = (128 ** 0.5 * norm.weight.float().abs().max() / 448).item()
    R["fp8_q_largest_value"] = q8.values.float().abs().max().item()
    deq = q8.values.float() * q8.descale
    R["fp8_q_rel_error_vs_bf16"] = round(((deq - eager.float()).norm() / eager.float().norm()).item(), 5)
    v = torch.randn(1, 4128, 30, 128, device=DEV, dtype=BF16) * 3
    v8 = fa.quantize(v)
    want = v.float().abs().max() * (1 / 448)
    R["v_descale_equal"] = bool(torch.equal(v8.descale.reshape(()), want))
    R["v_values_equal"] = bool(torch.equal(v8.values.view(torch.uint8),
                                           (v.float() / want).clamp(-448, 448).to(fa.FP8).view(torch.uint8)))


def residual_then_norm_checks():
    dim = 3840
    x, y = (torch.randn(1, 4128, dim, device=DEV, dtype=BF16) for _ in range(2))
    norm2, norm1 = rms_norm(dim, 1e-5, 0.1), rms_norm(dim, 1e-6, 0.1)
    gate, scale = ((0.3 * torch.randn(1, 1, dim, device=DEV)).to(BF16) for _ in range(2))
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "bf16"

        def two(fp8=fp8):
            r = modulation.gated_residual(x, gate, y, norm2)
            return r, modulation.norm_scale(r, norm1, scale, raw=True, fp8=fp8)

        def one(fp8=fp8):
            return modulation.gated_residual_norm_scale(x, gate, y, norm2, norm1, scale, fp8=fp8)

        (a, ha), (b, hb) = two(), one()
        same = torch.equal(a, b) and (torch.equal(ha.q.view(torch.uint8), hb.q.view(torch.uint8))
                                      and torch.equal(ha.scale, hb.scale) if fp8 else torch.equal(ha, hb))
        R[f"residual_then_norm_{tag}_same_bits"] = bool(same)
        R[f"residual_then_norm_{tag}_ms"], R[f"two_kernels_{tag}_ms"] = timed(one), timed(two)
    R["modulation_kernels_failed"] = modulation.launch.failed


def main():
    with torch.no_grad():
        run_parts((norm_rope_checks, residual_then_norm_checks), R, "session11_checks.json")


if __name__ == "__main__":
    main()
