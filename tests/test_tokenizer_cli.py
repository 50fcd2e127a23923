"""`convert tokenizer` + `tokenize encode/decode` end to end on the golden checkpoint."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from vfmtok_jax import tokenize
from vfmtok_jax import tokenizer_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_FLAGS = ["--config.model.decoder_heads=4", "--config.model.decoder_grid=16",
                "--config.vfm.levels=(0,1,2,3)", "--config.vfm.num_heads=3",
                "--config.vfm.size=336"]


def _convert(src, dst, *extra):
  cmd = [sys.executable, "-m", "vfmtok_jax.convert", "tokenizer", str(src), str(dst),
         *GOLDEN_FLAGS, *extra]
  return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.fixture(scope="module")
def release_ckpt(tmp_path_factory, fixtures_dir):
  """The golden weights as the official release stores them: {'model', 'ema', ...} in a .pt,
  with a deliberately different 'model' entry so that the EMA choice is visible."""
  state = load_file(str(fixtures_dir / "tokenizer.safetensors"))
  ema = {k: torch.from_numpy(v) for k, v in state.items()}
  model = {k: v + 1.0 if k == "post_slots_quant.bias" else v for k, v in ema.items()}
  path = tmp_path_factory.mktemp("release") / "vq_ckpt.pt"
  torch.save({"model": model, "ema": ema, "steps": torch.tensor(5)}, path)
  dst = tmp_path_factory.mktemp("converted") / "tok"
  result = _convert(path, dst)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "converted tokenizer" in result.stdout and "DINOv2 backbone" in result.stdout
  return dst


def test_encode_decode_arrays(release_ckpt, tmp_path, tokenizer_io):
  images = tmp_path / "images.npy"
  np.save(images, tokenizer_io["images"])  # NCHW float in [-1, 1]
  codes = tmp_path / "codes.npz"
  assert tokenize.main(["encode", "--ckpt", str(release_ckpt), "--input", str(images),
                        "--output", str(codes)]) == 0
  with np.load(codes) as f:
    np.testing.assert_array_equal(f["indices"], tokenizer_io["indices"])
  recon = tmp_path / "recon.npy"
  assert tokenize.main(["decode", "--ckpt", str(release_ckpt), "--input", str(codes),
                        "--output", str(recon)]) == 0
  # The official code's f32 decoder (another framework, another machine) vs ours through
  # ~20 layers: ~1e-6 of O(1) pixels, 1e-4 as in test_tokenizer_golden.
  np.testing.assert_allclose(np.load(recon), tokenizer_io["recon"].transpose(0, 2, 3, 1),
                             atol=1e-4)
  pngs = tmp_path / "pngs"
  assert tokenize.main(["decode", "--ckpt", str(release_ckpt), "--input", str(codes),
                        "--output", str(pngs)]) == 0
  assert sorted(os.listdir(pngs)) == ["00000.png", "00001.png"]


def test_encode_image_files(release_ckpt, tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = tmp_path / "imgs"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for name, hw in [("a", (40, 50)), ("b", (64, 32))]:
    Image.fromarray(rng.integers(0, 255, hw + (3,), dtype=np.uint8)).save(folder / f"{name}.png")
  codes = tmp_path / "codes.npz"
  assert tokenize.main(["encode", "--ckpt", str(release_ckpt), "--input", str(folder),
                        "--output", str(codes)]) == 0
  with np.load(codes) as f:
    assert f["indices"].shape == (2, 16) and list(f["names"]) == ["a", "b"]


def test_bad_inputs(release_ckpt, tmp_path, capsys):
  as_uint8 = tmp_path / "u8.npy"
  np.save(as_uint8, np.zeros((1, 32, 32, 3), np.uint8))
  bad_png = tmp_path / "broken.png"
  bad_png.write_bytes(b"\x89PNG not really")
  for inputs, message in [([str(as_uint8)], "expected float images"),
                          ([str(bad_png)], "cannot read image .*broken.png")]:
    assert tokenize.main(["encode", "--ckpt", str(release_ckpt), "--input", *inputs,
                          "--output", str(tmp_path / "c.npz")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
  with pytest.raises(FileNotFoundError, match="not a tokenizer checkpoint"):
    tokenizer_io.load_tokenizer(str(tmp_path))


def test_convert_names_a_bad_config_key(tmp_path, fixtures_dir):
  result = _convert(fixtures_dir / "tokenizer.safetensors", tmp_path / "x",
                    "--config.model.decoder_haeds=4")
  assert result.returncode != 0 and "decoder_haeds" in result.stderr
