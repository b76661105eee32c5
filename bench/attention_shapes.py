"""Attention and q/k/v product shapes at a 1024x1024 step, GPU only (session 11's probes):

- cuDNN attention through NVIDIA's cuDNN frontend graphs, bf16 and fp8 (per-tensor scales), at
  the step's 4128 tokens as they are, padded to 4160 / 4224 with a padding mask, and at 4096;
  PyTorch's SDPA (cuDNN, memory-efficient) with the keys padded and masked by a boolean mask;
  each against float32 attention (relative error);
- q, k and v as one stacked product ([3840, 11520]) against three, in bf16 and fp8 (branch
  `qkv-stacked` has the code that stacked them); w1 and w3 stacked;
- the cost of quantising v to fp8 with PyTorch's operations;
- every cuDNN plan for the bf16 attention (`bf16_plans`), and each bf16 product with cuBLAS
  against cuBLASLt (`blas_products`), session 13's probes for the bf16 step.

    python3 bench/attention_shapes.py     # env: OUT, PARTS=attention,products,bf16_plans,blas_products;
                                          # needs nvidia-cudnn-frontend
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


def frontend_graph(handle, tokens: int, fp8: bool, masked: bool, q, k, v, exact, every_plan: bool = False):
    """A cuDNN frontend attention graph over [1, tokens, H, D] buffers holding the S real tokens
    (the rest zero, masked off when `masked`): (ms, relative error) of the plan cuDNN's heuristics
    pick, or with `every_plan` {plan index: (its name, ms, relative error)} over every plan that
    heuristics A, B and the fallback offer and that builds here."""
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
    modes = [cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK] if every_plan \
        else [cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK]
    g.create_execution_plans(modes)
    g.check_support()
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

    def measured(run):
        ob.zero_()
        run()
        torch.cuda.synchronize()
        out = ob[:, :S].float() * (sv if fp8 else 1)
        return timed(run), rel_error(out.transpose(1, 2), exact)

    if not every_plan:
        g.build_plans()
        ws = torch.empty(g.get_workspace_size(), device=DEV, dtype=torch.uint8)
        return measured(lambda: g.execute(pack, ws, handle=handle))
    plans = {}
    for i in range(g.get_execution_plan_count()):
        try:
            g.build_plan_at_index(i)
            ws = torch.empty(g.get_workspace_size_plan_at_index(i), device=DEV, dtype=torch.uint8)
            plans[i] = (g.get_plan_name_at_index(i),
                        *measured(lambda i=i, ws=ws: g.execute_plan_at_index(pack, ws, i, handle=handle)))
        except Exception as e:  # noqa: BLE001  (a plan that does not build or run here)
            plans[i] = repr(e)[:200]
    return plans


def step_attention():
    """A cuDNN handle on PyTorch's stream, random q, k, v [1, S, H, D] in bf16, their float32
    attention, and PyTorch's cuDNN bf16 SDPA timed on them (R["torch_cudnn_bf16_*"])."""
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
    return handle, q, k, v, exact


def attention():
    handle, q, k, v, exact = step_attention()
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


def bf16_plans():
    """Every cuDNN plan for the step's bf16 attention (4128 tokens, with and without a padding
    mask): whether one beats the plan PyTorch's cuDNN SDPA runs (0.457-0.493 ms on H100s, 0.418
    at 4096 tokens)."""
    handle, q, k, v, exact = step_attention()
    for masked in (False, True):
        R[f"frontend_bf16_plans_{'masked' if masked else 'unmasked'}"] = frontend_graph(
            handle, S, False, masked, q, k, v, exact, every_plan=True)


def blas_products():
    """Each of a layer's bf16 products at the step's 4128 tokens and at 4096, with cuBLAS (torch's
    default) and with cuBLASLt preferred (`torch.backends.cuda.preferred_blas_library`), q/k/v
    also as one stacked product: whether either library's pick gains where 4128 rows fit the
    tiles worst (the 3840-wide products: 714 TFLOPS at 4128 against 774 at 4096, session 10)."""
    before = torch.backends.cuda.preferred_blas_library()
    shapes = {"q_k_v_or_out": (3840, 3840), "w1_or_w3": (3840, 10240), "w2": (10240, 3840),
              "qkv_stacked": (3840, 11520)}
    try:
        for m in (S, 4096):
            for name, (k, n) in shapes.items():
                x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
                w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / 60
                outs = {}
                for _ in range(2):  # the libraries alternate, each timed twice: the faster kept
                    for lib in ("cublas", "cublaslt"):
                        torch.backends.cuda.preferred_blas_library(lib)
                        tag = f"blas_M{m}_{name}_{lib}_ms"
                        R[tag] = min(R.get(tag, math.inf), timed(lambda: F.linear(x, w)))
                        outs[lib] = F.linear(x, w)
                R[f"blas_M{m}_{name}_TFLOPS_cublas"] = round(2 * m * k * n / R[f"blas_M{m}_{name}_cublas_ms"] / 1e9, 1)
                R[f"blas_M{m}_{name}_equal"] = bool(torch.equal(outs["cublas"], outs["cublaslt"]))
            for lib in ("cublas", "cublaslt"):  # a layer: q, k, v, out, w1, w3, w2
                R[f"blas_M{m}_layer_{lib}_ms"] = round(4 * R[f"blas_M{m}_q_k_v_or_out_{lib}_ms"]
                                                       + 2 * R[f"blas_M{m}_w1_or_w3_{lib}_ms"]
                                                       + R[f"blas_M{m}_w2_{lib}_ms"], 4)
    finally:
        torch.backends.cuda.preferred_blas_library(before)


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
    parts = (attention, products, bf16_plans, blas_products)
    wanted = os.environ.get("PARTS", ",".join(p.__name__ for p in parts)).split(",")
    run_parts([p for p in parts if p.__name__ in wanted], R, "attention_shapes.json")


if __name__ == "__main__":
    main()
