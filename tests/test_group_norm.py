"""The VAE's GroupNorm split into float32 moments and one scale-and-shift: the math checked on a
CPU against PyTorch's GroupNorm (the Triton kernels run the same math on a GPU, compared by
bench/kernel_options.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.04)])
def test_group_norm_math_matches_pytorch(pack, dtype, tol):
    from zimage_nodes.loaders.group_norm import group_norm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 24, 20, generator=g) * 3 + 1.5).to(dtype)  # a mean well away from 0
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    ours = group_norm(x, 32, w, b, 1e-6)
    ref = F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6)
    assert ours.dtype == dtype and ours.shape == x.shape
    assert (ours.double() - ref).abs().max() < tol
    native = F.group_norm(x, 32, w.to(dtype), b.to(dtype), 1e-6)
    assert (ours.double() - ref).abs().mean() <= (native.double() - ref).abs().mean() * 1.5
    bare = group_norm(x, 32, None, None, 1e-6)  # no affine weight and bias
    assert (bare.double() - F.group_norm(x.double(), 32, None, None, 1e-6)).abs().max() < tol


def test_channels_last_activations_take_their_own_kernels_with_the_same_math(pack):
    """A decode runs channels-last on GPUs: the layout test picks the [pixels, channels] kernels for
    images and for the VAE attention's [B, C, pixels] view of one; on a CPU the same math runs in
    that layout and keeps it."""
    from zimage_nodes.loaders import group_norm as gn

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 64, 12, 10, generator=g) * 3 + 1.5).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(64, generator=g), torch.randn(64, generator=g)
    assert gn.channels_last(x) and gn.channels_last(x.view(2, 64, 120)) and not gn.channels_last(x.contiguous())
    assert not gn.channels_last(x.contiguous().transpose(2, 3))  # strided, but not channels-innermost
    assert not gn.fits(x, 32)  # a CPU tensor: PyTorch's GroupNorm in the module
    ours = gn.group_norm(x, 32, w, b, 1e-6)
    assert ours.is_contiguous(memory_format=torch.channels_last)
    assert (ours - F.group_norm(x, 32, w, b, 1e-6)).abs().max() < 1e-5


def test_the_vae_loads_with_spread_group_norms_and_a_benchmark_can_undo_them(tiny, pack):
    from torch import nn

    from zimage_nodes.loaders.component_loading import load_vae
    from zimage_nodes.loaders.group_norm import SpreadGroupNorm, use_plain_group_norms

    vae = load_vae(tiny["vae"]).module
    norms = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(type(m) is SpreadGroupNorm for m in norms)
    x = torch.randn(1, norms[0].num_channels, 8, 8)
    assert torch.equal(norms[0](x), F.group_norm(x, norms[0].num_groups, norms[0].weight, norms[0].bias,
                                                 norms[0].eps))  # a CPU: PyTorch's own kernel
    use_plain_group_norms(vae)
    assert all(type(m) is nn.GroupNorm for m in vae.modules() if isinstance(m, nn.GroupNorm))


def test_a_kernel_that_fails_once_is_not_tried_again_and_out_of_memory_goes_on(pack):
    from zimage_nodes.loaders.gpu_kernels import Guarded

    calls = []

    def kernel(x):
        calls.append(x)
        if x == "oom":
            raise torch.OutOfMemoryError("CUDA out of memory")
        if x == "bad":
            raise RuntimeError("PassManager::run failed")  # what Triton says for an unsupported GPU
        return x * 2

    k = Guarded(kernel)
    assert k(3) == 6
    with pytest.raises(torch.OutOfMemoryError):
        k("oom")
    assert k(4) == 8 and not k.failed  # out of memory is the caller's, not the kernel's fault
    assert k("bad") is None and k.failed
    assert k(5) is None and calls == [3, "oom", 4, "bad"]  # never launched again
