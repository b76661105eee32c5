"""The README's main job: a PNG from a prompt on the command line, without ComfyUI."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from pack_testing import ROOT


def test_generate_without_weights_uses_the_demo_model_and_writes_a_png(tmp_path):
    out = tmp_path / "fox.png"
    r = subprocess.run([sys.executable, "-m", "loaders.generate", "a red fox in the snow", "--out", str(out),
                        "--width", "64", "--height", "48", "--steps", "3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "DEMO model with random weights" in r.stderr
    img = np.asarray(Image.open(out))
    assert img.shape == (48, 64, 3) and img.std() > 0


def test_generate_with_real_files_and_a_bad_size_reports_the_error(tiny, tmp_path):
    r = subprocess.run([sys.executable, "-m", "loaders.generate", "a fox", "--out", str(tmp_path / "x.png"),
                        "--model", tiny["transformer"], "--text-encoder", tiny["text_encoder"], "--vae", tiny["vae"],
                        "--tokenizer", tiny["diffusers"] + "/tokenizer", "--width", "40", "--height", "32"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "multiples of 16" in r.stderr and "Fix:" in r.stderr
    assert "DEMO" not in r.stderr


def test_generate_with_fp8_matmuls_on_the_cpu(tmp_path):
    out = tmp_path / "fp8.png"
    r = subprocess.run([sys.executable, "-m", "loaders.generate", "a fox", "--out", str(out), "--width", "64",
                        "--height", "48", "--steps", "2", "--matmul", "fp8"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert np.asarray(Image.open(out)).shape == (48, 64, 3)
