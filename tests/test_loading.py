"""Loading Z-Image from a diffusers folder and from ComfyUI's single files (original key names)."""
from __future__ import annotations

import torch

from pack_testing import mapped_files


def _loading():
    from zimage_nodes.loaders import component_loading
    return component_loading


def test_transformer_single_file_and_diffusers_folder_give_the_same_weights(tiny, pack):
    cl = _loading()
    a = cl.load_transformer(tiny["transformer"]).module.state_dict()
    b = cl.load_transformer(tiny["diffusers"]).module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the fused qkv of the original file really was split: q, k and v differ
    assert not torch.equal(a["layers.0.attention.to_q.weight"], a["layers.0.attention.to_k.weight"])


def test_fp8_single_file_is_upcast_to_bf16_at_load(tiny, pack):
    cl = _loading()
    fp8 = cl.load_transformer(tiny["transformer_fp8"])
    ref = cl.load_transformer(tiny["transformer"]).module.state_dict()
    assert "float8_e4m3fn" in fp8.source_dtype
    for k, v in fp8.module.state_dict().items():
        assert v.dtype == torch.bfloat16, k
        expected = ref[k].to(torch.float8_e4m3fn).to(torch.bfloat16) if ref[k].ndim == 2 else ref[k]
        assert torch.equal(v, expected), k


def test_text_encoder_and_vae_single_files_match_the_diffusers_folder(tiny, pack):
    cl = _loading()
    for load, key in ((cl.load_text_encoder, "text_encoder"), (cl.load_vae, "vae")):
        a = load(tiny[key]).module.state_dict()
        b = load(tiny["diffusers"]).module.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), key


def test_sizes_come_from_the_tensors(tiny, pack):
    cl = _loading()
    t = cl.load_transformer(tiny["transformer"])
    assert (t.config["dim"], t.config["n_layers"], t.config["n_refiner_layers"], t.config["n_heads"],
            t.config["cap_feat_dim"]) == (64, 2, 1, 2, 32)
    assert t.config["axes_dims"] == [8, 12, 12]  # head_dim 32 x [1/4, 3/8, 3/8]
    te = cl.load_text_encoder(tiny["text_encoder"])
    assert (te.config["hidden_size"], te.config["num_hidden_layers"], te.config["head_dim"]) == (32, 3, 16)
    v = cl.load_vae(tiny["vae"])
    assert v.config["block_out_channels"] == [32, 32, 32, 32] and v.config["latent_channels"] == 16


def test_full_size_original_key_layout_is_detected_as_the_real_model(pack):
    """The full model's shapes (from diffusers' class on the meta device, renamed to the original
    names with the fused qkv) give the published config through the same code path."""
    from diffusers import ZImageTransformer2DModel

    from zimage_nodes.loaders import key_names, model_detection

    with torch.device("meta"):
        full = ZImageTransformer2DModel()
    shapes = {}
    for k, v in full.state_dict().items():
        name, chunk = key_names.transformer_original_name(k)
        shape = tuple(v.shape)
        shapes[name] = (shape[0] * 3, *shape[1:]) if chunk is not None else shape
    size = model_detection.transformer_size("full.safetensors", shapes,
                                            lambda k: key_names.transformer_original_name(k)[0])
    cfg = size.diffusers_config()
    assert (cfg["dim"], cfg["n_layers"], cfg["n_refiner_layers"], cfg["n_heads"], cfg["cap_feat_dim"]) == \
        (3840, 30, 2, 30, 2560)
    assert cfg["axes_dims"] == [32, 48, 48]


def test_rope_axes_follow_one_rule_for_other_head_sizes(pack):
    from zimage_nodes.loaders.model_detection import TransformerSize

    for head_dim, axes in ((64, [16, 24, 24]), (128, [32, 48, 48]), (256, [64, 96, 96])):
        cfg = TransformerSize(dim=head_dim * 4, n_layers=1, n_refiner_layers=1, n_heads=4, cap_feat_dim=8,
                              in_channels=16, patch_size=2).diffusers_config()
        assert cfg["axes_dims"] == axes and sum(axes) == head_dim


def test_bf16_weights_are_views_of_the_file_mapping_not_copies(tiny, pack):
    cl = _loading()
    path = tiny["transformer"]
    t = cl.load_transformer(path, torch.bfloat16)
    with open("/proc/self/maps") as f:
        ranges = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in f if line.rstrip().endswith(path)]
    assert ranges, "the file is not memory-mapped"
    w = t.module.layers[0].feed_forward.w1.weight
    assert any(lo <= w.data_ptr() < hi for lo, hi in ranges)
    del t, w
    import gc
    gc.collect()
    assert path not in mapped_files()  # the mapping goes with the last tensor


def test_transformer_norms_run_fused_and_match_diffusers_own(tiny, pack):
    from diffusers.models.normalization import RMSNorm

    from zimage_nodes.loaders.component_loading import load_transformer
    from zimage_nodes.loaders.fused_norms import use_plain_norms

    t = load_transformer(tiny["transformer"], torch.float32).module
    norms = [m for m in t.modules() if isinstance(m, RMSNorm)]
    assert norms and all(type(m).__name__ == "FusedRMSNorm" for m in norms)
    x = torch.randn(2, 7, norms[0].weight.shape[0])
    fused = norms[0](x)
    use_plain_norms(t)
    assert all(type(m) is RMSNorm for m in norms)
    torch.testing.assert_close(fused, norms[0](x), atol=1e-6, rtol=1e-5)


def test_modulated_blocks_take_the_fused_path_and_match_diffusers_forward(tiny, pack, monkeypatch):
    """The blocks' forward with norm_scale / gated_residual (Triton on GPUs): off the GPU it is
    diffusers' own; its fused path, run here with the kernels' eager equivalents, composes the same
    block bit for bit."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

    from zimage_nodes.loaders import modulation
    from zimage_nodes.loaders.component_loading import load_transformer

    t = load_transformer(tiny["transformer"], torch.float32).module
    blocks = [m for m in t.modules() if isinstance(m, ZImageTransformerBlock)]
    assert blocks and all(type(b).__name__ == "FusedModulationBlock" for b in blocks)
    blk = t.layers[0]
    n, dim = 9, t.dim
    torch.manual_seed(0)
    x = torch.randn(2, n, dim)
    freqs = torch.polar(torch.ones(2, n, sum(t.config.axes_dims) // 2), torch.randn(2, n, sum(t.config.axes_dims) // 2))
    adaln = torch.randn(2, min(dim, 256))
    with torch.no_grad():
        theirs = ZImageTransformerBlock.forward(blk, x, None, freqs, adaln)
        assert torch.equal(blk(x, None, freqs, adaln), theirs)  # a CPU tensor: diffusers' forward
        calls = []
        monkeypatch.setattr(modulation, "fits", lambda x, *v: True)
        monkeypatch.setattr(modulation, "launch", lambda name, *a: calls.append(name))  # "failed": eager
        monkeypatch.setattr(modulation, "_norm_weight", lambda norm, x: norm.weight)
        assert torch.equal(blk(x, None, freqs, adaln), theirs)
    # the residual-then-norm kernel first, then (its launch "failed") the two it stands for
    assert calls == ["norm_scale", "gated_residual_norm_scale", "gated_residual", "norm_scale", "gated_residual"]
    modulation.use_plain_modulation(t)
    assert all(type(b) is ZImageTransformerBlock for b in blocks)


def test_attention_rotates_on_real_numbers_bit_for_bit_like_diffusers_complex_product(tiny, pack):
    from diffusers.models.transformers.transformer_z_image import ZSingleStreamAttnProcessor

    from zimage_nodes.loaders.component_loading import load_transformer
    from zimage_nodes.loaders.real_rope import rotate, use_complex_rope

    t = load_transformer(tiny["transformer"], torch.bfloat16).module
    procs = [m.processor for m in t.modules() if getattr(m, "processor", None) is not None]
    assert procs and all(type(p).__name__ == "RealRopeAttnProcessor" for p in procs)
    torch.manual_seed(0)
    x = torch.randn(1, 9, 2, 16, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(1, 9, 8), torch.randn(1, 9, 8))
    ref = torch.view_as_real(torch.view_as_complex(x.float().reshape(1, 9, 2, 8, 2)) * freqs.unsqueeze(2))
    assert torch.equal(rotate(x, freqs), ref.flatten(3).type_as(x))
    # the form torch.compile sees: on real numbers, same bits
    compiled = torch.compile(rotate, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, freqs), ref.flatten(3).type_as(x))
    # the whole model, same seed, same bits with diffusers' own processor
    lat = torch.randn(1, 16, 1, 8, 8, dtype=torch.bfloat16)
    cap = [torch.randn(5, t.config.cap_feat_dim, dtype=torch.bfloat16)]
    step = torch.tensor([0.3])
    with torch.no_grad():
        ours = t(list(lat), step, cap, return_dict=False)[0][0]
        use_complex_rope(t)
        assert all(type(p) is ZSingleStreamAttnProcessor for p in procs)
        theirs = t(list(lat), step, cap, return_dict=False)[0][0]
    assert torch.equal(ours, theirs)


def test_q_and_k_norm_and_rotation_fall_back_to_the_two_steps_off_the_gpu(pack):
    """norm_rotate: on GPUs one Triton kernel (norm_rope; bench/kernel_options.py PARTS=norm_rope_kernel
    compares its bits there), elsewhere the norm then the rotation, per batch item with its own
    angles; the kernel's shape checks refuse what it cannot take."""
    from torch import nn

    from zimage_nodes.loaders import norm_rope, real_rope

    torch.manual_seed(0)
    x = torch.randn(2, 7, 3, 16, dtype=torch.bfloat16)
    freqs = torch.polar(torch.ones(2, 7, 8), torch.randn(2, 7, 8))
    norm = nn.RMSNorm(16, eps=1e-5, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(16))
    assert torch.equal(real_rope.norm_rotate(x, norm, freqs), real_rope.rotate(norm(x), freqs))
    real = torch.view_as_real(freqs)
    assert not norm_rope.fits(x, norm.weight, real)  # a CPU tensor
    assert not norm_rope.fits(x.transpose(1, 2), norm.weight, real)  # not [batch, tokens, heads, dim]


def test_feed_forward_gate_goes_through_the_fused_kernel_and_back_to_diffusers_code(tiny, pack, monkeypatch):
    """Loaded feed-forwards call silu_gate.silu_mul (one Triton pass on GPUs: bench/kernel_options.py
    PARTS=silu_gate compares its bits with PyTorch's there); off the GPU, or once the launch failed,
    PyTorch's SiLU and product, same bits. use_diffusers_forwards gives back diffusers' classes."""
    from diffusers.models.transformers.transformer_z_image import FeedForward, ZImageTransformerBlock

    from zimage_nodes.loaders import silu_gate
    from zimage_nodes.loaders.component_loading import load_transformer, use_diffusers_forwards

    t = load_transformer(tiny["transformer"], torch.bfloat16).module
    ffs = [m for m in t.modules() if isinstance(m, FeedForward)]
    assert ffs and all(type(f).__name__ == "FusedGateFeedForward" for f in ffs)
    torch.manual_seed(0)
    x = torch.randn(2, 9, t.dim, dtype=torch.bfloat16)
    with torch.no_grad():
        theirs = FeedForward.forward(ffs[0], x)
        assert torch.equal(ffs[0](x), theirs)  # a CPU tensor: PyTorch's ops
        assert not silu_gate.fits(x, x.clone())
        calls = []
        monkeypatch.setattr(silu_gate, "fits", lambda a, b: True)
        monkeypatch.setattr(silu_gate, "launch", lambda a, b: calls.append(a.shape))  # "failed"
        assert torch.equal(ffs[0](x), theirs)
    assert len(calls) == 1 and calls[0][-1] == ffs[0].w1.out_features
    use_diffusers_forwards(t)
    assert all(type(f) is FeedForward for f in ffs)
    assert all(type(b) is ZImageTransformerBlock for b in t.modules() if isinstance(b, ZImageTransformerBlock))
    procs = [m.processor for m in t.modules() if getattr(m, "processor", None) is not None]
    assert procs and all(type(p).__name__ == "ZSingleStreamAttnProcessor" for p in procs)


def test_loading_the_same_files_again_reuses_their_mapped_components(tiny, pack):
    import os

    from zimage_nodes.loaders.pipeline_loading import load_parts

    paths = (tiny["transformer"], tiny["text_encoder"], tiny["vae"])
    kw = dict(device="cpu", dtype=torch.float32, comfy_tokenizer=os.path.join(tiny["diffusers"], "tokenizer"))
    first = load_parts(*paths, **kw)
    again = load_parts(*paths, **kw)
    assert again.transformer.component is first.transformer.component
    assert again.vae.component is first.vae.component
    other = load_parts(tiny["transformer_fp8"], *paths[1:], **kw)
    assert other.transformer.component is not first.transformer.component
    assert other.text_encoder.component is first.text_encoder.component  # same file, still the last load's
