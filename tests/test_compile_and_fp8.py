"""Compiled blocks and fp8 matmuls on real tiny models (CPU: inductor and torch._scaled_mm run
here too), alone and combined with the streaming engine."""
from __future__ import annotations

import math

import pytest
import torch
from test_streaming import use_plan


def psnr(a, b):
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return 10 * math.log10(float((b.float().max() - b.float().min()) ** 2) / mse) if mse > 0 else float("inf")


def load(tiny, **kw):
    from zimage_nodes.loaders.pipeline_loading import load_parts

    return load_parts(tiny["diffusers"], device="cpu", dtype=torch.float32, **kw)


def run(parts, latent=(6, 4), seed=3, **kw):
    from zimage_nodes.loaders.generation import denoise

    pos = parts.text_encoder.encode("a red fox")
    return denoise(parts, pos, None, torch.zeros(1, 16, *latent), seed=seed, steps=3, **kw)


def test_fp8_linear_is_close_to_the_bf16_linear_and_handles_few_rows(pack):
    from zimage_nodes.loaders.fp8_matmul import Fp8Linear, fp8_quantize

    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 96, bias=True)
    q, s = fp8_quantize(lin.weight.detach())
    f = Fp8Linear(64, 96, lin.bias.detach(), q, s)
    for rows in (32, 3):  # 32 rows: torch._scaled_mm; 3 rows: dequantised bf16 path
        x = torch.randn(1, rows, 64)
        ref, out = lin(x), f(x)
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.998


def test_fp8_linear_takes_rows_quantised_by_their_producer_as_its_own(pack):
    """A norm or gate that writes its output as fp8 rows hands them to the linear layers as they
    are: the product equals the one from the bf16 activation, which the layer quantises the same
    way (a scale of max|row| / 448 per row); rows of a few tokens are not fp8 GEMM rows."""
    from zimage_nodes.loaders.fp8_matmul import Fp8Linear, fp8_quantize, take_fp8_rows
    from zimage_nodes.loaders.fp8_rows import FP8, Fp8Rows, quantize

    torch.manual_seed(0)
    w = torch.randn(96, 64) * 0.05
    f = Fp8Linear(64, 96, None, *fp8_quantize(w))
    x = torch.randn(2, 16, 64) * 3
    x[0, 3] = 0  # an all-zero row keeps the smallest scale instead of dividing by zero
    rows = quantize(x.reshape(-1, 64))
    assert isinstance(rows, Fp8Rows) and rows.q.dtype == FP8 and rows.scale.shape == (32, 1)
    assert torch.equal(rows.scale[:, 0], (x.reshape(-1, 64).abs().amax(1) * (1 / 448)).clamp(min=1e-12))
    given = f(Fp8Rows(rows.q.reshape(2, 16, 64), rows.scale, x.dtype))
    assert given.shape == (2, 16, 96) and torch.equal(given, f(x))
    assert f.takes_rows(32) and not f.takes_rows(3) and not f.takes_rows(24)
    assert take_fp8_rows(x, f, f) and not take_fp8_rows(x[:, :3], f)  # a norm feeding q, k and v; 6 rows
    assert not take_fp8_rows(x, f, torch.nn.Linear(64, 96))  # one bf16 layer among them: no shared rows


def test_fp8_matmul_run_is_close_to_bf16_and_streams_the_same_bits(tiny, pack):
    from zimage_nodes.loaders.fp8_matmul import Fp8Linear

    reference, _ = run(load(tiny))
    parts = load(tiny, matmul="fp8")
    resident, _ = run(parts)
    linears = [m for m in parts.transformer._replica.modules() if isinstance(m, Fp8Linear)]
    # attention q/k/v/out, the SwiGLU's three, and adaLN where the block has it
    assert len(linears) == 4 * 7 + 3 and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    assert psnr(resident, reference) > 25
    use_plan(parts, ["pinned", "gpu", "mapped", "pinned"])
    streamed, _ = run(parts)
    assert torch.equal(streamed, resident)  # same quantisation, same kernels: bit for bit


def test_fp8_matmul_needs_ada_or_hopper(pack, monkeypatch):
    from zimage_nodes.loaders.errors import ZImageError
    from zimage_nodes.loaders.fp8_matmul import check_supported

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(ZImageError) as e:
        check_supported(torch.device("cuda"))
    assert "RTX 3090" in str(e.value) and "8.6" in str(e.value) and "matmul to bf16" in str(e.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_supported(torch.device("cuda"))


def test_compiled_blocks_equal_eager_with_streaming_and_do_not_recompile_for_a_new_resolution(tiny, pack):
    parts = load(tiny)
    use_plan(parts, ["pinned", "gpu", "mapped", "pinned"])
    eager, report = run(parts)
    assert not report.compiled and "compiled" not in report.summary()
    # aot_eager traces the blocks through dynamo and AOTAutograd like inductor does, without codegen:
    # the same math, so the same bits
    compiled, report = run(parts, compile_blocks=True, compile_backend="aot_eager")
    assert torch.equal(compiled, eager)
    assert report.compile_graphs >= 1 and "compiled blocks (compiled" in report.summary()
    again, report = run(parts, seed=4, compile_blocks=True, compile_backend="aot_eager")
    assert report.compile_graphs == 0 and "reused" in report.summary()
    _, report = run(parts, latent=(16, 24), compile_blocks=True, compile_backend="aot_eager")
    assert report.compile_graphs == 0  # token counts are dynamic after the first run's refiners and layers
    after, _ = run(parts)  # compiling was for those runs only
    assert torch.equal(after, eager)
    assert all("forward" not in b.__dict__ for b in parts.transformer._replica.modules())


def test_inductor_compiled_blocks_with_fp8_matmuls_and_streaming(tiny, pack):
    parts = load(tiny, matmul="fp8")
    use_plan(parts, ["pinned", "gpu", "gpu", "pinned"])
    eager, _ = run(parts)
    compiled, report = run(parts, compile_blocks=True)
    assert report.compiled and report.first_step_s > 0
    assert psnr(compiled, eager) > 40


def test_fp8_attention_inputs_carry_one_scale_each(pack):
    """What fp8 attention (cudnn_fp8) is fed, from PyTorch's path (this CPU): v scaled by its
    maximum; q and k normalised and rotated, then scaled the same way. (The GPU kernels, whose q/k
    scale is the bound the norm's weight sets: bench/fp8_rows_interpreter.py, bench/fp8_kernels.py.)"""
    from zimage_nodes.loaders import fp8_attention as fa
    from zimage_nodes.loaders.real_rope import norm_rotate, rotate

    torch.manual_seed(0)
    v = torch.randn(1, 200, 2, 32) * 3
    got = fa.quantize(v)
    assert got.values.shape == v.shape and got.values.dtype == torch.float8_e4m3fn
    assert torch.equal(got.descale.reshape(()), v.abs().max() * (1 / 448))
    assert torch.equal(got.values.float(), (v / got.descale).to(torch.float8_e4m3fn).float())
    assert got.values.float().abs().max() == 448  # the maximum lands on fp8's largest value
    norm = torch.nn.RMSNorm(32, eps=1e-6)
    freqs = torch.polar(torch.ones(1, 200, 16), torch.randn(1, 200, 16))
    q8 = norm_rotate(v, norm, freqs, fp8=True)
    assert isinstance(q8, fa.Fp8Tensor) and q8.values.dtype == torch.float8_e4m3fn
    q = q8.values.float() * q8.descale
    want = rotate(norm(v), freqs)
    assert q.shape == want.shape
    assert torch.nn.functional.cosine_similarity(q.flatten(), want.flatten(), dim=0) > 0.999


@pytest.mark.parametrize("matmul", ["bf16", "fp8"])
def test_fp8_attention_path_with_a_cpu_stand_in_for_cudnn(tiny, pack, monkeypatch, matmul):
    """The cudnn_fp8 path of the attention processor on this CPU, cuDNN's graph replaced by float32
    attention over the dequantised fp8 inputs (what the graph computes, up to its own roundings)
    and the same fp8 output: q and k from norm_rotate's fp8 path, v quantised, the mask passed on,
    the output handed to an fp8 out-projection as rows or dequantised for a bf16 one. The image
    stays close to the bf16-attention one; sequences fp8 attention does not take run as before."""
    import torch.nn.functional as F

    from zimage_nodes.loaders import fp8_attention as fa
    from zimage_nodes.loaders.fp8_rows import FP8, Fp8Rows

    calls = []

    def attend(q, k, v, mask):
        b, s, h, d = q.values.shape
        calls.append(s)
        qf, kf, vf = (t.values.float() * t.descale for t in (q, k, v))
        m = None if mask is None else mask[:, None, None, :]
        o = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (qf, kf, vf)), attn_mask=m).transpose(1, 2)
        o8 = (o / v.descale).clamp(-448, 448).to(FP8)
        assert torch.equal(v.scale, 1.0 / v.descale) and v.row_descales.shape == (b * s, 1)
        return Fp8Rows(o8.reshape(b, s, h * d), v.row_descales, q.dtype)  # as attend: v's scale per row

    parts = load(tiny, matmul=matmul)
    reference, _ = run(parts)
    monkeypatch.setattr(fa, "why_unavailable", lambda device: None)
    monkeypatch.setattr(fa, "fits", lambda q: q.shape[1] > 16)  # the image's tokens, not the caption's
    monkeypatch.setattr(fa, "attend", attend)
    out, report = run(parts, attention_backend="cudnn_fp8")
    assert report.attention == "cudnn_fp8" and calls and all(s > 16 for s in calls)
    # 80-82 dB here; with the attention's output zeroed the image still scores 53 dB (this tiny
    # model's attention moves its latent little), so the bound sits between
    assert psnr(out, reference) > 65
