"""The whole-component plan for a VRAM budget (GPU sizes simulated; the plan is pure)."""
from __future__ import annotations

import pytest
import torch

GiB = 2**30
FULL = {"transformer": int(11.46 * GiB), "text_encoder": int(7.49 * GiB), "vae": int(0.16 * GiB)}


def _plan(budget_gb, free_gb=80):
    from zimage_nodes.loaders.placement import plan_components

    return plan_components(FULL, "cuda:0", budget_gb, free_bytes=int(free_gb * GiB))


def test_everything_resident_when_the_budget_holds_it(pack):
    p = _plan(24)
    assert (p.transformer.value, p.text_encoder.value, p.vae.value) == ("resident",) * 3
    assert p.peak_bytes <= 24 * GiB


def test_text_encoder_is_swapped_when_only_the_transformer_fits_beside_it(pack):
    p = _plan(20)
    assert (p.transformer.value, p.text_encoder.value, p.vae.value) == ("resident", "swapped", "resident")
    assert p.peak_bytes <= 20 * GiB
    assert "text encoder swapped (7.5 GB)" in p.summary() and "expected peak" in p.summary()


def test_every_component_is_swapped_in_turn_when_the_transformer_cannot_stay(pack):
    p = _plan(16)
    assert (p.transformer.value, p.text_encoder.value, p.vae.value) == ("swapped",) * 3
    phases = p.phase_bytes()
    assert phases["denoise"] == max(phases.values()) <= 16 * GiB


def test_automatic_budget_is_free_vram_minus_a_margin(pack):
    from zimage_nodes.loaders.placement import AUTO_MARGIN_BYTES, CUDA_CONTEXT_BYTES

    p = _plan(0, free_gb=21)
    assert p.budget_bytes == 21 * GiB - AUTO_MARGIN_BYTES + CUDA_CONTEXT_BYTES
    assert p.transformer.value == "resident" and p.text_encoder.value == "swapped"


def test_budget_below_the_transformer_is_an_error_with_the_minimum(pack):
    from zimage_nodes.loaders.errors import ZImageError

    with pytest.raises(ZImageError) as e:
        _plan(8)
    msg = str(e.value)
    assert "vram_budget_gb" in msg and "at least 14.5 GB" in msg and "Found: 8.0 GB" in msg and "Fix:" in msg


def test_cpu_runs_keep_everything_in_ram(pack):
    from zimage_nodes.loaders.placement import plan_components

    p = plan_components(FULL, torch.device("cpu"), 4)
    assert p.transformer.value == p.text_encoder.value == p.vae.value == "cpu"
