"""Kernel-level options for a Z-Image step, timed on one GPU in one run: fused vs separate q/k/v
and w1/w3 GEMMs at a 1024x1024 step's shapes, SDPA backends at its attention shape, the fp8
dequantisation of a streamed block (compiled per matrix, dynamic vs static shapes, or one Triton
launch), the VAE decode in the default vs the channels_last memory layout, and one layer block
eager vs compiled with inductor's tuning options.

    python bench/kernel_options.py        # env: OUT (results folder), PARTS (e.g. dequantize,vae_decode)
Without a GPU it runs a smoke test of itself at tiny sizes on the CPU.
"""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DT = torch.bfloat16 if CUDA else torch.float32
OUT = os.environ.get("OUT", "/tmp")
R: dict = {"gpu": torch.cuda.get_device_name() if CUDA else "cpu (smoke test)", "torch": torch.__version__}


def timed(fn, reps=20 if CUDA else 2) -> float:
    """Median milliseconds of `fn` after two warm-up calls."""
    fn()
    fn()
    ts = []
    for _ in range(reps):
        if CUDA:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 3)


def save():
    with open(os.path.join(OUT, "kernel_options.json"), "w") as f:
        json.dump(R, f, indent=1)


def gemms():
    tokens, dim, hidden = (4128, 3840, 10240) if CUDA else (64, 96, 256)
    x = torch.randn(tokens, dim, device=DEV, dtype=DT)
    q, k, v = (torch.randn(dim, dim, device=DEV, dtype=DT) * 0.02 for _ in range(3))
    w1, w3 = (torch.randn(hidden, dim, device=DEV, dtype=DT) * 0.02 for _ in range(2))
    w2 = torch.randn(dim, hidden, device=DEV, dtype=DT) * 0.02
    qkv, w13 = torch.cat([q, k, v]), torch.cat([w1, w3])
    h = torch.randn(tokens, hidden, device=DEV, dtype=DT)
    r = {"qkv_separate_ms": timed(lambda: (F.linear(x, q), F.linear(x, k), F.linear(x, v))),
         "qkv_fused_ms": timed(lambda: F.linear(x, qkv)),
         "out_ms": timed(lambda: F.linear(x, q)),
         "w1_w3_separate_ms": timed(lambda: (F.linear(x, w1), F.linear(x, w3))),
         "w1_w3_fused_ms": timed(lambda: F.linear(x, w13)),
         "w2_ms": timed(lambda: F.linear(h, w2))}
    flops = 2 * tokens * dim * (4 * dim + 3 * hidden)
    sep = r["qkv_separate_ms"] + r["out_ms"] + r["w1_w3_separate_ms"] + r["w2_ms"]
    fused = r["qkv_fused_ms"] + r["out_ms"] + r["w1_w3_fused_ms"] + r["w2_ms"]
    r.update({"block_separate_ms": round(sep, 3), "block_fused_ms": round(fused, 3),
              "block_separate_TFLOPS": round(flops / sep / 1e9, 1),
              "block_fused_TFLOPS": round(flops / fused / 1e9, 1)})
    R["gemms"] = r
    print("gemms", r, flush=True)


def attention():
    heads, tokens, hd = (30, 4128, 128) if CUDA else (2, 64, 32)
    q, k, v = (torch.randn(1, heads, tokens, hd, device=DEV, dtype=DT) for _ in range(3))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    r = {}
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        if name == "math" and CUDA:
            continue
        try:
            with sdpa_kernel(be):
                r[name + "_ms"] = timed(lambda: F.scaled_dot_product_attention(q, k, v))
        except RuntimeError as e:
            r[name + "_ms"] = repr(e)[:120]
    R["attention"] = r
    print("attention", r, flush=True)


def _layer_block(dim: int, hidden: int, ada: int) -> torch.nn.Module:
    """A module with a Z-Image layer's matrices (attention, SwiGLU, adaLN), random weights."""
    m = torch.nn.Module()
    for n in ("to_q", "to_k", "to_v", "to_out"):
        setattr(m, n, torch.nn.Linear(dim, dim, bias=False, dtype=DT))
    m.w1, m.w3 = (torch.nn.Linear(dim, hidden, bias=False, dtype=DT) for _ in range(2))
    m.w2 = torch.nn.Linear(hidden, dim, bias=False, dtype=DT)
    m.ada = torch.nn.Linear(ada, 4 * dim, dtype=DT)
    m.norm = torch.nn.RMSNorm(dim, dtype=DT)
    return m


def dequantize():
    """One layer block's fp8 weights (per-row scales) to bf16, as the streamer does for fp8-stored
    blocks: compiled per matrix with dynamic vs static shapes (loaders.fp8_matmul), and the whole
    block in one Triton launch (loaders.block_dequant), checked bit for bit against eager."""
    from loaders import block_dequant
    from loaders.fp8_matmul import _dequantize
    from loaders.gpu_kernels import Fused
    from loaders.streaming import FP8, HostBlock

    dim, hidden, ada = (3840, 10240, 256) if CUDA else (96, 256, 32)
    host = HostBlock("layer", _layer_block(dim, hidden, ada), "fp8", False, torch.bfloat16)
    stage = host.host.to(DEV)
    fp8 = [e for e in host.entries if e.stage_dtype == FP8]
    w8s = [stage[e.stage_off:e.stage_off + e.numel].view(FP8).view(e.shape) for e in fp8]
    scales = [stage[e.scale_off:e.scale_off + e.shape[0] * 4].view(torch.float32) for e in fp8]

    def outs(buf):
        return [buf[e.compute_off:e.compute_off + e.numel * 2].view(torch.bfloat16).view(e.shape) for e in fp8]

    nbytes = sum(e.numel * 3 for e in fp8)  # fp8 read, bf16 written
    reference = torch.zeros(host.compute_bytes, dtype=torch.uint8, device=DEV)
    _dequantize(w8s, scales, outs(reference))
    r = {}
    variants = [("eager", _dequantize), ("compiled_dynamic", Fused(_dequantize, dynamic=True)),
                ("compiled_static", Fused(_dequantize, dynamic=False))]
    for label, fn in variants:
        buf = torch.zeros_like(reference)
        ms = timed(lambda: fn(w8s, scales, outs(buf)))
        r[label] = {"ms_per_block": ms, "GBps": round(nbytes / ms / 1e6, 1),
                    "same_bits": bool(torch.equal(buf, reference))}
    if CUDA and host.chunks is not None:
        table = host.chunks.rows.to(DEV)
        buf = torch.zeros_like(reference)
        try:  # straight to the kernel first, so that a compile error is seen, not swallowed
            block_dequant._dequant_chunks[(len(table),)](stage, stage.view(torch.float32), buf.view(torch.bfloat16),
                                                         table, R=block_dequant._TILE_ROWS,
                                                         C=block_dequant._TILE_COLS, num_warps=block_dequant._WARPS)
        except Exception as e:  # noqa: BLE001
            r["triton_error"] = repr(e)[:1500]
        ran = block_dequant.dequantize_block(stage, buf, table)
        ms = timed(lambda: block_dequant.dequantize_block(stage, buf, table)) if ran else None
        r["triton_one_launch"] = {"ran": ran, "ms_per_block": ms, "GBps": round(nbytes / ms / 1e6, 1) if ms else None,
                                  "same_bits": bool(torch.equal(buf, reference)), "chunks": len(table)}
    if CUDA and host.chunks is not None and "triton_error" not in r:
        # the kernel's shape: elements per program (CHUNK_ELEMENTS), tile rows x columns, warps
        matrices = [(e.stage_off, e.scale_off, e.compute_off // 2, e.shape[0], e.numel // e.shape[0]) for e in fp8]
        saved, tuning = block_dequant.CHUNK_ELEMENTS, {}
        for chunk in (16384, 32768, 65536):
            block_dequant.CHUNK_ELEMENTS = chunk
            table = block_dequant.ChunkTable.of(matrices).rows.to(DEV)
            for rows, cols, warps in ((8, 256, 4), (8, 256, 8), (16, 256, 8), (4, 512, 4), (2, 1024, 4), (4, 1024, 8)):
                buf = torch.zeros_like(reference)

                def launch():
                    block_dequant._dequant_chunks[(len(table),)](stage, stage.view(torch.float32),
                                                                 buf.view(torch.bfloat16), table, R=rows, C=cols,
                                                                 num_warps=warps)
                ms = timed(launch)
                tuning[f"chunk{chunk}_R{rows}_C{cols}_w{warps}"] = {
                    "ms": ms, "GBps": round(nbytes / ms / 1e6, 1), "same_bits": bool(torch.equal(buf, reference))}
        block_dequant.CHUNK_ELEMENTS = saved
        r["triton_shapes"] = dict(sorted(tuning.items(), key=lambda kv: kv[1]["ms"]))
    R["dequantize"] = r
    print("dequantize", {k: v for k, v in r.items() if k != "triton_shapes"}, flush=True)
    print("dequantize fastest shapes", list(r.get("triton_shapes", {}).items())[:5], flush=True)


def exponent_unpack():
    """One layer block's packed bf16 weights (loaders.exponent_pack) back to bf16 as the streamer does
    for packed storage: the one-launch Triton kernel (with its listed values patched after) against
    the PyTorch path, bit for bit against the block's weights, and the kernel's tile shapes."""
    from loaders import exponent_pack as ep
    from loaders.streaming import HostBlock

    dim, hidden, ada = (3840, 10240, 256) if CUDA else (96, 256, 32)
    block = _layer_block(dim, hidden, ada)
    with torch.no_grad():
        for prm in block.parameters():
            prm.normal_(0, 0.02)  # as bench/full_size_files.py draws them
    host = HostBlock("layer", block, "packed", True, torch.bfloat16)
    stage = host.host.to(DEV)
    views_ref = {n: t.to(DEV, torch.bfloat16) for n, t in block.state_dict().items()}  # fp32 on a CPU
    packed = [e for e in host.entries if e.packed]
    nbytes = sum(e.numel * 3.5 for e in packed)  # 1.5 read, 2 written

    def same(buf) -> bool:
        v = host.views(stage, buf)
        return all(torch.equal(v[e.name], views_ref[e.name]) for e in packed)

    r = {"listed": host.listed, "packed_over_bf16": round(host.stage_bytes / HostBlock(
        "layer", block, "bf16", False, torch.bfloat16).stage_bytes, 4)}
    buf = torch.zeros(host.compute_bytes, dtype=torch.uint8, device=DEV)
    failed = ep.launch.failed
    ep.launch.failed = True  # the PyTorch path
    ms = timed(lambda: host.dequantize(stage, buf, {}))
    r["pytorch"] = {"ms_per_block": ms, "GBps": round(nbytes / ms / 1e6, 1), "same_bits": same(buf)}
    ep.launch.failed = failed
    if CUDA and host.packs is not None:
        table = host.packs.rows.to(DEV)
        buf = torch.zeros_like(buf)
        try:  # straight to the kernel first, so that a compile error is seen, not swallowed
            ep._unpack_chunks[(len(table),)](stage.view(torch.int16), stage, buf.view(torch.int32), table,
                                             P=ep._PAIRS, num_warps=ep._WARPS)
        except Exception as e:  # noqa: BLE001
            r["triton_error"] = repr(e)[:1500]
        tables = {}
        ms = timed(lambda: host.dequantize(stage, buf, tables))
        r["triton_one_launch"] = {"ran": not ep.launch.failed, "ms_per_block": ms,
                                  "GBps": round(nbytes / ms / 1e6, 1), "same_bits": same(buf), "chunks": len(table)}
        if "triton_error" not in r:
            tuning = {}
            for pairs in (512, 1024, 2048, 4096):
                for warps in (4, 8):
                    out = torch.zeros_like(buf)

                    def launch():
                        ep._unpack_chunks[(len(table),)](stage.view(torch.int16), stage, out.view(torch.int32), table,
                                                         P=pairs, num_warps=warps)
                    ms = timed(launch)
                    tuning[f"P{pairs}_w{warps}"] = {"ms": ms, "GBps": round(nbytes / ms / 1e6, 1)}
            r["triton_shapes"] = dict(sorted(tuning.items(), key=lambda kv: kv[1]["ms"]))
    R["exponent_unpack"] = r
    print("exponent_unpack", r, flush=True)


def vae_decode():
    """The Flux VAE's decode at 1024x1024 in bf16 (weights already on the GPU): untiled, on 512-pixel
    tiles overlapping by 128 (the pack until session 5) and on the pack's tiles (DECODE_TILE,
    DECODE_BLEND), with PyTorch's GroupNorm and with loaders.group_norm's; time, peak memory and
    PSNR against untiled with PyTorch's. Also one 1024x1024x128 GroupNorm alone, in both layouts.
    Session 5 timed channels-last decodes with PyTorch's GroupNorm: slower (bench/NOTES.md); the
    `_channels_last` rows have the pack's GroupNorm for that layout."""
    from diffusers import AutoencoderKL

    from loaders.group_norm import use_spread_group_norms
    from loaders.model_detection import scaffold_config
    from loaders.placement import DECODE_BLEND, DECODE_TILE
    from loaders.tile_blend import use_one_pass_blends

    side = 1024 if CUDA else 96
    torch.manual_seed(0)
    vae = AutoencoderKL(**scaffold_config("vae")).to(DEV, DT).eval()
    z = torch.randn(1, 16, side // 8, side // 8, device=DEV, dtype=DT, generator=torch.Generator(DEV).manual_seed(0))
    r, ref = {}, None
    with torch.no_grad():
        cases = (("untiled", 0, 0), ("tiles_512", 512, 128), ("tiles_pack", DECODE_TILE, DECODE_BLEND),
                 ("untiled_spread_gn", 0, 0), ("tiles_pack_spread_gn", DECODE_TILE, DECODE_BLEND),
                 ("tiles_pack_spread_gn_one_pass_blends", DECODE_TILE, DECODE_BLEND),
                 ("untiled_spread_gn_channels_last", 0, 0),
                 ("tiles_pack_spread_gn_one_pass_blends_channels_last", DECODE_TILE, DECODE_BLEND),
                 # cuDNN timing its convolution algorithms per shape (its first decode pays for that)
                 ("untiled_spread_gn_channels_last_cudnn_benchmark", 0, 0),
                 ("tiles_pack_spread_gn_one_pass_blends_channels_last_cudnn_benchmark", DECODE_TILE, DECODE_BLEND))
        z_plain = z
        for label, tile, blend in cases:
            if label.endswith("spread_gn"):
                use_spread_group_norms(vae)
            if label.endswith("one_pass_blends"):
                use_one_pass_blends(vae)
            # the latent channels-last (the pack's decode since session 8): the layout carries through
            z = z_plain.contiguous(memory_format=torch.channels_last) if "channels_last" in label else z_plain
            torch.backends.cudnn.benchmark = label.endswith("cudnn_benchmark")
            if not CUDA and tile:
                tile, blend = tile // 8, blend // 8  # a smoke test: small tiles on a small image
            vae.use_tiling = tile > 0
            if tile:
                vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
                vae.tile_overlap_factor = blend / tile
            if CUDA:
                torch.cuda.reset_peak_memory_stats()
            ms = timed(lambda: vae.decode(z, return_dict=False)[0], reps=10 if CUDA else 1)
            img = vae.decode(z, return_dict=False)[0].float().clamp(-1, 1)
            ref = img if ref is None else ref
            mse = torch.mean((img - ref) ** 2).item() / 4  # on 0..1 pixels
            peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else None
            r[label] = {"ms": ms, "tile": tile, "peak_GiB": peak,
                        "psnr_vs_untiled_dB": round(10 * math.log10(1 / mse), 2) if mse else float("inf")}
            print("vae", label, r[label], flush=True)
        torch.backends.cudnn.benchmark = False
        from loaders.group_norm import group_norm

        x = torch.randn(1, 128, side, side, device=DEV, dtype=DT) * 2 + 0.5
        w, b = torch.randn(128, device=DEV, dtype=DT), torch.randn(128, device=DEV, dtype=DT)
        exact = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
        xl = x.contiguous(memory_format=torch.channels_last)
        for label, fn, t in (("pytorch", F.group_norm, x), ("spread", group_norm, x),
                             ("pytorch_channels_last", F.group_norm, xl), ("spread_channels_last", group_norm, xl)):
            r[f"group_norm_{label}"] = {"ms": timed(lambda: fn(t, 32, w, b, 1e-6)),
                                        "max_abs_err": (fn(t, 32, w, b, 1e-6).double() - exact).abs().max().item()}
            print("group_norm", label, r[f"group_norm_{label}"], flush=True)
    R["vae_decode"] = r


def compiled_block():
    """One full-size layer block as the sampler runs it (fused norms, RoPE on reals under compile)
    at a 1024x1024 step's shape, with q/k's norm and rotation in one kernel (norm_rope, eager only) and without:
    eager, and compiled as the pack compiles it (TUNING=1 adds inductor's tuning options); ms per
    call, max difference from eager without it, and the block's 7 GEMMs and attention alone (what
    is left is elementwise work and launch spacing)."""
    import torch._dynamo
    import torch._inductor.config as inductor
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from loaders import norm_rope
    from loaders.fused_norms import use_fused_norms
    from loaders.real_rope import use_real_rope

    dim, heads, tokens, hidden = (3840, 30, 4128, 10240) if CUDA else (64, 2, 48, 170)
    torch.manual_seed(0)
    blk = ZImageTransformerBlock(0, dim, heads, heads, 1e-5, True).to(DEV, DT).eval()
    with torch.no_grad():
        for n, p in blk.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.ndim >= 2 else 1 + 0.1 * torch.randn_like(p) if "norm" in n
                    else torch.zeros_like(p))
    use_fused_norms(blk)
    use_real_rope(blk)
    x = torch.randn(1, tokens, dim, device=DEV, dtype=DT)
    ang = torch.rand(1, tokens, dim // heads // 2, device=DEV) * 6.28
    freqs = torch.polar(torch.ones_like(ang), ang)
    ada = torch.randn(1, min(dim, 256), device=DEV, dtype=DT)
    r: dict = {"tokens": tokens}
    variants = {"compiled": ({}, None)}
    if os.environ.get("TUNING") == "1":
        variants |= {"coordinate_descent": ({"coordinate_descent_tuning": True}, None),
                     "max_autotune_no_cudagraphs": ({}, "max-autotune-no-cudagraphs")}
    with torch.no_grad():
        ws = [blk.attention.to_q.weight, blk.attention.to_k.weight, blk.attention.to_v.weight,
              blk.attention.to_out[0].weight, blk.feed_forward.w1.weight, blk.feed_forward.w3.weight]
        h = torch.randn(1, tokens, hidden, device=DEV, dtype=DT)
        w2 = blk.feed_forward.w2.weight
        r["gemms_ms"] = timed(lambda: ([F.linear(x, w) for w in ws], F.linear(h, w2)))
        q = torch.randn(1, heads, tokens, dim // heads, device=DEV, dtype=DT)
        r["attention_ms"] = timed(lambda: F.scaled_dot_product_attention(q, q, q))
        norm_rope.launch.failed = True
        ref = blk(x, None, freqs, ada)
        for fused in (False, True):
            norm_rope.launch.failed = not fused
            tag = "norm_rope_" if fused else ""
            out = blk(x, None, freqs, ada)
            r[tag + "eager_ms"] = timed(lambda: blk(x, None, freqs, ada))
            r[tag + "eager_max_diff"] = round((out.float() - ref.float()).abs().max().item(), 4)
            for name, (cfg, mode) in variants.items():
                torch._dynamo.reset()
                try:
                    with inductor.patch(cfg):
                        fn = torch.compile(type(blk).forward, mode=mode)
                        t = time.perf_counter()
                        out = fn(blk, x, None, freqs, ada)
                        r[tag + name + "_compile_s"] = round(time.perf_counter() - t, 1)
                        r[tag + name + "_ms"] = timed(lambda: fn(blk, x, None, freqs, ada))
                    r[tag + name + "_max_diff"] = round((out.float() - ref.float()).abs().max().item(), 4)
                except Exception as e:  # noqa: BLE001
                    r[tag + name + "_ms"] = repr(e)[:200]
                print("compiled_block", {k: v for k, v in r.items() if k.startswith(tag + name)}, flush=True)
                R["compiled_block"] = r
                save()
            r["norm_rope_kernel_failed"] = norm_rope.launch.failed
    norm_rope.launch.failed = False
    torch._dynamo.reset()
    print("compiled_block", r, flush=True)


def norm_rope_kernel():
    """q's RMSNorm and rotation at a step's shape: the eager composition, the same compiled, and the
    one Triton kernel (norm_rope), and that kernel with other program sizes; GPU ms per call from
    CUDA-graph replays (no launch overhead), and the kernel's difference from the eager composition,
    for one image and a batch of two with different angles."""
    from loaders import norm_rope
    from loaders.real_rope import rotate

    heads, tokens, hd = (30, 4128, 128) if CUDA else (2, 48, 32)
    torch.manual_seed(0)
    w = (1 + 0.1 * torch.randn(hd, device=DEV)).to(DT)
    r: dict = {}
    for batch in (1, 2):
        x = torch.randn(batch, tokens, heads, hd, device=DEV, dtype=DT) * 3
        ang = torch.rand(batch, tokens, hd // 2, device=DEV) * 6.28
        f = torch.polar(torch.ones_like(ang), ang)
        real = torch.view_as_real(f)
        out = torch.empty_like(x)

        def eager():
            return rotate(F.rms_norm(x, (hd,), w, 1e-5), f)

        def kernel():
            return norm_rope.launch(x, w, real, 1e-5, out)
        ref = eager()
        if not kernel():
            r["kernel_failed"] = True
            break
        d = (out.float() - ref.float()).abs()
        r[f"batch{batch}"] = {"max_abs_diff": round(d.max().item(), 5),
                              "elements_not_bitwise_equal": int((out != ref).sum().item())}
        if batch == 1:
            compiled = torch.compile(eager)
            for name, fn in (("eager", eager), ("compiled", compiled), ("kernel", kernel)):
                r[name + "_ms"] = replayed_ms(fn) if CUDA else timed(fn)
            r["kernel_GBps"] = round(2 * x.numel() * x.element_size() / r["kernel_ms"] / 1e6, 1)
            try:  # the same kernel with other program sizes
                for rows, warps in ((32, 4), (64, 8)):
                    cand = torch.empty_like(x)
                    norm_rope._launch(x, w, real, 1e-5, cand, rows, warps)
                    r[f"rows_{rows}x{warps}"] = {
                        "ms": replayed_ms(lambda: norm_rope._launch(x, w, real, 1e-5, cand, rows, warps)),
                        "max_diff_from_kernel": round((cand.float() - out.float()).abs().max().item(), 5)}
            except Exception as e:  # noqa: BLE001
                r["program_sizes_error"] = repr(e)[:200]
    R["norm_rope"] = r
    print("norm_rope", r, flush=True)


def seeded_norm(dim: int) -> torch.nn.RMSNorm:
    """A block's RMSNorm with weights around 1, after seeding the generator (what follows draws
    from it)."""
    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(dim, eps=1e-5, device=DEV, dtype=DT)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(dim))
    return norm


def modulation_kernels():
    """The modulated block's norm x scale and gated residual (loaders/modulation.py) at a step's
    shape: the eager ops and the Triton kernels (GPU ms from CUDA-graph replays; their difference),
    then one eager layer (fused norms, norm_rope) with the kernels and without."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from loaders import modulation
    from loaders.fused_norms import use_fused_norms
    from loaders.real_rope import use_real_rope

    dim, heads, tokens = (3840, 30, 4128) if CUDA else (64, 2, 48)
    norm = seeded_norm(dim)
    x = torch.randn(1, tokens, dim, device=DEV, dtype=DT)
    y = torch.randn(1, tokens, dim, device=DEV, dtype=DT) * 4
    scale = (1 + 0.3 * torch.randn(1, 1, dim, device=DEV)).to(DT)
    gate = torch.tanh(torch.randn(1, 1, dim, device=DEV)).to(DT)
    raw = (0.5 * torch.randn(1, 1, dim, device=DEV)).to(DT)
    r: dict = {}
    with torch.no_grad():
        for name, eager, fused in (
                ("norm_scale", lambda: norm(x) * scale, lambda: modulation.norm_scale(x, norm, scale)),
                ("gated_residual", lambda: x + gate * norm(y), lambda: modulation.gated_residual(x, gate, y, norm)),
                # the modulation's raw output in: the kernel adds the 1
                ("norm_scale_raw", lambda: norm(x) * (1.0 + raw),
                 lambda: modulation.norm_scale(x, norm, raw, raw=True))):
            ref, out = eager(), fused()
            d = (out.float() - ref.float()).abs()
            r[name] = {"eager_ms": replayed_ms(eager) if CUDA else timed(eager),
                       "kernel_ms": replayed_ms(fused) if CUDA else timed(fused),
                       "max_abs_diff": round(d.max().item(), 5), "not_bitwise": int((d > 0).sum().item()),
                       "kernel_failed": modulation.launch.failed}
        blk = ZImageTransformerBlock(0, dim, heads, heads, 1e-5, True).to(DEV, DT).eval()
        for n, p in blk.named_parameters():
            p.copy_(torch.randn_like(p) * 0.02 if p.ndim >= 2 else 1 + 0.1 * torch.randn_like(p) if "norm" in n
                    else torch.zeros_like(p))
        use_fused_norms(blk)
        use_real_rope(blk)
        ang = torch.rand(1, tokens, dim // heads // 2, device=DEV) * 6.28
        freqs = torch.polar(torch.ones_like(ang), ang)
        ada = torch.randn(1, min(dim, 256), device=DEV, dtype=DT)
        ref = blk(x, None, freqs, ada)
        r["eager_layer_ms"] = timed(lambda: blk(x, None, freqs, ada))
        modulation.use_fused_modulation(blk)
        out = blk(x, None, freqs, ada)
        r["eager_layer_fused_modulation_ms"] = timed(lambda: blk(x, None, freqs, ada))
        r["eager_layer_max_diff"] = round((out.float() - ref.float()).abs().max().item(), 4)
    R["modulation_kernels"] = r
    print("modulation_kernels", r, flush=True)


def silu_gate():
    """The feed-forward's gate (loaders/silu_gate.py) at a step's shape: PyTorch's SiLU and product
    against the Triton kernel at a few program sizes (GPU ms from CUDA-graph replays; their bits)."""
    from loaders import silu_gate as sg

    tokens, hidden = (4128, 10240) if CUDA else (48, 160)
    torch.manual_seed(0)
    a = torch.randn(1, tokens, hidden, device=DEV, dtype=DT) * 3
    b = torch.randn(1, tokens, hidden, device=DEV, dtype=DT)
    r: dict = {}
    with torch.no_grad():
        ref = F.silu(a) * b
        r["eager_ms"] = replayed_ms(lambda: F.silu(a) * b) if CUDA else timed(lambda: F.silu(a) * b)
        for block, warps in ((4096, 8), (2048, 4), (8192, 8), (1024, 4)) if CUDA else ((256, 4),):
            out = sg._run(a, b, block, warps)
            d = (out.float() - ref.float()).abs()
            fn = functools.partial(sg._run, a, b, block, warps)
            ms = replayed_ms(fn) if CUDA else timed(fn)
            r[f"kernel_{block}x{warps}"] = {"ms": ms, "GBps": round(3 * a.numel() * a.element_size() / ms / 1e6, 1),
                                            "max_abs_diff": round(d.max().item(), 5),
                                            "not_bitwise": int((d > 0).sum().item())}
    R["silu_gate"] = r
    print("silu_gate", r, flush=True)


def token_counts():
    """A layer's bf16 GEMMs and cuDNN attention at token counts around a 1024x1024 step's (4096
    image tokens plus 32 caption tokens, padded to 32): how much an unaligned count costs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not CUDA:
        return
    dim, hidden, heads = 3840, 10240, 30
    r: dict = {}
    for tokens in (4096, 4128, 4160, 4224):
        x = {k: torch.randn(tokens, k, device=DEV, dtype=DT) for k in (dim, hidden)}
        layer = [(dim, dim)] * 4 + [(dim, hidden)] * 2 + [(hidden, dim)]  # q, k, v, out; w1, w3; w2
        w = {kn: torch.randn(kn[1], kn[0], device=DEV, dtype=DT) * 0.02 for kn in set(layer)}
        ms = timed(lambda: [F.linear(x[k], w[(k, n)]) for k, n in layer])
        q = torch.randn(1, heads, tokens, dim // heads, device=DEV, dtype=DT)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            att = timed(lambda: F.scaled_dot_product_attention(q, q, q))
        flops = 2 * tokens * sum(k * n for k, n in layer)
        r[tokens] = {"layer_gemms_ms": ms, "layer_gemm_TFLOPS": round(flops / ms / 1e9),
                     "cudnn_attention_ms": att, "attention_TFLOPS": round(4 * tokens**2 * dim / att / 1e9)}
    R["token_counts"] = r
    print("token_counts", r, flush=True)


def replayed_ms(fn, calls: int = 20) -> float:
    """GPU milliseconds per call of `fn`, captured `calls` times in a CUDA graph and replayed."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    return round(timed(g.replay) / calls, 4)


def main():
    parts = (gemms, attention, dequantize, exponent_unpack, vae_decode, compiled_block, norm_rope_kernel,
             modulation_kernels, silu_gate, token_counts)
    wanted = os.environ.get("PARTS", ",".join(p.__name__ for p in parts)).split(",")
    for part in (p for p in parts if p.__name__ in wanted):
        try:
            part()
        except Exception as e:  # noqa: BLE001
            R[part.__name__ + "_error"] = repr(e)[:500]
            print(part.__name__, "FAILED", repr(e)[:500], flush=True)
        save()


if __name__ == "__main__":
    main()
