"""Attention and q/k/v product shapes at a 1024x1024 step, GPU only (session 11's probes):

- cuDNN attention through NVIDIA's cuDNN frontend graphs, bf16 and fp8 (per-tensor scales), at
  the step's 4128 tokens as they are, padded to 4160 / 4224 with a padding mask, and at 4096;
  PyTorch's SDPA (cuDNN, memory-efficient) with the keys padded and masked by a boolean mask;
  each against float32 attention (relative error);
- q, k and v as one stacked product ([3840, 11520]) against three, in bf16 and fp8 (branch
  `qkv-stacked` has the code that stacked them); w1 and w3 stacked;
- the cost of quantising v to fp8 with PyTorch's operations.

    python3 bench/attention_shapes.py     # env: OUT; needs nvidia-cudnn-frontend
Results: bench/results/attention_shapes_*.json (bench/NOTES.md, session 11).
"""
from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV = torch.device("cuda")
H, D, S = 30, 128, 4128
R: dict = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__}


def timed(fn, n: int = 50, warm: int = 10) -> float:
    """Median GPU ms per call over five rounds of `n` calls (CUDA events)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    rounds = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        rounds.append(start.elapsed_time(end) / n)
    return round(sorted(rounds)[2], 4)


def rel_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return round(((got.float() - exact).norm() / exact.norm()).item(), 5)


def frontend_graph(handle, tokens: int, fp8: bool, masked: bool, q, k, v, exact):
    """A cuDNN frontend attention graph over [1, tokens, H, D] buffers holding the S real tokens
    (the rest zero, masked off when `masked`): (ms, relative error)."""
    import cudnn

    io = cudnn.data_type.FP8_E4M3 if fp8 else cudnn.data_type.BFLOAT16
    f32 = cudnn.data_type.FLOAT
    g = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    shape, strides = (1, H, tokens, D), (tokens * H * D, D, H * D, 1)
    tq, tk, tv = (g.tensor(name=n, dim=shape, stride=strides, data_type=io) for n in "qkv")
    kw: dict = dict(attn_scale=1 / math.sqrt(D), generate_stats=False)
    pack: dict = {}
    if masked:
        one_int = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.INT32)
        sq, skv = g.tensor(name="sq", **one_int), g.tensor(name="skv", **one_int)
        kw.update(use_padding_mask=True, seq_len_q=sq, seq_len_kv=skv)
        pack.update({t: torch.full((1, 1, 1, 1), S, dtype=torch.int32, device=DEV) for t in (sq, skv)})
    if fp8:
        one = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=f32)
        dq, dk, dv, ds, ss, so = (g.tensor(name=n, **one) for n in ("dq", "dk", "dv", "ds", "ss", "so"))
        o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=dq, descale_k=dk, descale_v=dv, descale_s=ds,
                                          scale_s=ss, scale_o=so, use_causal_mask=False, **kw)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(f32)
    else:
        o, _ = g.sdpa(q=tq, k=tk, v=tv, **kw)
    o.set_output(True).set_dim(shape).set_stride(strides).set_data_type(io)
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    ws = torch.empty(g.get_workspace_size(), device=DEV, dtype=torch.uint8)
    dt = torch.float8_e4m3fn if fp8 else torch.bfloat16
    qb, kb, vb, ob = (torch.zeros(1, tokens, H, D, device=DEV, dtype=dt) for _ in range(4))
    sv = (v.abs().amax().float() / 448).reshape(1, 1, 1, 1) if fp8 else None
    for buf, src, scale in ((qb, q, None), (kb, k, None), (vb, v, sv)):
        buf[:, :S] = (src.float() / scale).to(dt) if scale is not None else src.to(dt)
    pack.update({tq: qb, tk: kb, tv: vb, o: ob})
    if fp8:
        one = torch.ones(1, 1, 1, 1, device=DEV)
        pack.update({dq: one, dk: one, dv: sv, ds: one / 448, ss: one * 448, so: 1 / sv,
                     amax_s: torch.zeros_like(one), amax_o: torch.zeros_like(one)})

    def run():
        g.execute(pack, ws, handle=handle)

    run()
    torch.cuda.synchronize()
    out = ob[:, :S].float() * (sv if fp8 else 1)
    return timed(run), rel_error(out.transpose(1, 2), exact)


def attention():
    import cudnn

    R["cudnn_backend"] = cudnn.backend_version()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, S, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    exact = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float())
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        R["torch_cudnn_bf16_ms"] = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        R["torch_cudnn_bf16_rel_error"] = rel_error(F.scaled_dot_product_attention(qt, kt, vt), exact)
    for fp8 in (False, True):
        for tokens, masked in ((S, False), (S, True), (4160, True), (4224, True)):
            tag = f"frontend_{'fp8' if fp8 else 'bf16'}_{tokens}_{'masked' if masked else 'unmasked'}"
            try:
                R[tag + "_ms"], R[tag + "_rel_error"] = frontend_graph(handle, tokens, fp8, masked, q, k, v, exact)
            except Exception as e:  # noqa: BLE001  (a variant this cuDNN has no engine for)
                R[tag + "_error"] = repr(e)[:300]
    padded = [torch.zeros(1, 4224, H, D, device=DEV, dtype=torch.bfloat16) for _ in range(3)]
    for buf, src in zip(padded, (q, k, v)):
        buf[:, :S] = src
    mask = torch.zeros(1, 1, 1, 4224, dtype=torch.bool, device=DEV)
    mask[..., :S] = True
    pq, pk, pv = (t.transpose(1, 2) for t in padded)
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        tag = f"torch_{name.lower()}_4224_bool_mask"
        try:
            with sdpa_kernel(getattr(SDPBackend, name)):
                R[tag + "_rel_error"] = rel_error(F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask)[:, :, :S],
                                                  exact)
                R[tag + "_ms"] = timed(lambda: F.scaled_dot_product_attention(pq, pk, pv, attn_mask=mask))
        except Exception as e:  # noqa: BLE001
            R[tag + "_error"] = repr(e)[:300]
    sv = v.abs().amax().float() / 448
    R["v_amax_ms"] = timed(lambda: v.abs().amax())
    R["v_to_fp8_ms"] = timed(lambda: (v.float() / sv).to(torch.float8_e4m3fn))


def products():
    m, k = S, 3840
    x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
    ws = [torch.randn(k, k, device=DEV, dtype=torch.bfloat16) / 60 for _ in range(3)]
    stacked = torch.cat(ws)
    R["bf16_qkv_three_ms"] = timed(lambda: [F.linear(x, w) for w in ws])
    R["bf16_qkv_stacked_ms"] = timed(lambda: F.linear(x, stacked))
    R["bf16_qkv_equal"] = bool(torch.equal(torch.cat([F.linear(x, w) for w in ws], 1), F.linear(x, stacked)))
    x8, scale_a = x.to(torch.float8_e4m3fn), torch.ones(m, 1, device=DEV)
    w8 = [w.to(torch.float8_e4m3fn) for w in ws]

    def mm(w):
        return torch._scaled_mm(x8, w.t(), scale_a=scale_a, scale_b=torch.ones(1, w.shape[0], device=DEV),
                                out_dtype=torch.bfloat16, use_fast_accum=True)

    w8_stacked = torch.cat(w8)
    R["fp8_qkv_three_ms"] = timed(lambda: [mm(w) for w in w8])
    R["fp8_qkv_stacked_ms"] = timed(lambda: mm(w8_stacked))
    w1, w3 = (torch.randn(10240, k, device=DEV, dtype=torch.bfloat16) / 60 for _ in range(2))
    w13 = torch.cat([w1, w3])
    R["bf16_w1_w3_two_ms"] = timed(lambda: (F.linear(x, w1), F.linear(x, w3)))
    R["bf16_w1_w3_stacked_ms"] = timed(lambda: F.linear(x, w13))


def run_parts(parts, results: dict, filename: str) -> None:
    """Each part in turn (a failure recorded, the rest still run), then `results` as JSON in $OUT."""
    for part in parts:
        try:
            part()
        except Exception as e:  # noqa: BLE001
            results[part.__name__ + "_error"] = repr(e)[:500]
        print(json.dumps(results, indent=1), flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), filename), "w") as f:
        json.dump(results, f, indent=1)


def main():
    run_parts((attention, products), R, "attention_shapes.json")


if __name__ == "__main__":
    main()
