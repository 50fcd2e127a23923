"""`python -m vfmtok_jax.features` with a tiny DINOv2 (the golden backbone), and the demo photos."""

import os
import socket
import subprocess
import sys

from absl import flags
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vfmtok_jax import features
from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import demo_photos
from vfmtok_jax.models.vfm import preprocess
from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights import files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_vfm(tmp_path_factory, tokenizer_state):
  """The golden VFMTok DINOv2 (width 48, 3 heads, 4 blocks, 4 registers) as an official file."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  backbone = files.strip_prefix(tokenizer_state, dinov2_keys.VFMTOK_PREFIX)
  path = tmp_path_factory.mktemp("vfm") / "dinov2_tiny.safetensors"
  save_file({k: np.ascontiguousarray(v) for k, v in backbone.items()}, str(path))
  return str(path)


@pytest.fixture
def image_dir(tmp_path):
  """Three small images of different sizes and modes (RGB png, grayscale png, jpg)."""
  rng = np.random.default_rng(0)
  folder = tmp_path / "images"
  folder.mkdir()
  Image.fromarray(rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 256, (80, 50), dtype=np.uint8)).save(folder / "b.png")
  Image.fromarray(demo_photos.load_photo("chelsea")).save(folder / "c.jpg")
  (folder / "notes.txt").write_text("not an image")
  return folder


def _flags(argv):
  fv = flags.FlagValues()
  features.define_flags(fv)
  fv(["features"] + argv)
  return fv


def _direct(vfm_path, paths, levels):
  """Reference: the same preprocessing and model, one batch, no CLI."""
  model, params = vfm_zoo.load_dinov2_official(vfm_path, num_heads=3)
  x = np.stack([features.to_signed(features.center_crop_resize(features.read_image(p), 224))
                for p in paths])
  x = preprocess.vfm_input(jnp.asarray(x), size=(224, 224), resize="kornia_bicubic")
  return model.apply({"params": params}, x, levels=levels)


def test_cli_writes_features(tiny_vfm, image_dir, tmp_path, capsys):
  out = tmp_path / "feats.npz"
  fv = _flags(["--vfm", tiny_vfm, "--num_heads", "3", "--images", str(image_dir),
               "--out", str(out), "--batch_size", "2", "--levels", "1,3"])
  assert features.run_from_flags(fv) == 0
  printed = capsys.readouterr().out
  assert "batch 2/2" in printed and "nearest other image" in printed
  with np.load(out) as f:
    got = {k: f[k] for k in f.files}
  assert set(got) == {"level_1", "level_3", "levels", "cls", "names", "grid"}
  paths = [str(image_dir / n) for n in ("a.png", "b.png", "c.jpg")]
  assert list(got["names"]) == paths
  np.testing.assert_array_equal(got["levels"], [1, 3])
  np.testing.assert_array_equal(got["grid"], [16, 16])
  assert got["level_1"].shape == got["level_3"].shape == (3, 256, 48)
  assert got["cls"].shape == (3, 48) and got["level_3"].dtype == np.float32
  ref = _direct(tiny_vfm, paths, (1, 3))  # batches of 2 (last one padded) == one batch of 3
  # Same f32 ViT in batches of 2 vs 3 rows: XLA may block rows differently, ~1e-6 of O(1).
  np.testing.assert_allclose(got["level_1"], ref["levels"][0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["level_3"], ref["levels"][1], atol=1e-5, rtol=0)
  np.testing.assert_allclose(got["cls"], ref["cls"], atol=1e-5, rtol=0)


def test_bfloat16_close_to_float32(tiny_vfm, image_dir):
  kw = dict(vfm=tiny_vfm, images=[str(image_dir)], num_heads=3, levels=(3,), log=lambda s: None)
  f32_out = features.run(**kw)
  bf16_out = features.run(dtype="bfloat16", **kw)
  f32, bf16 = f32_out["level_3"], bf16_out["level_3"]
  assert bf16.dtype == np.float32
  cos = (f32 * bf16).sum(-1) / (np.linalg.norm(f32, axis=-1) * np.linalg.norm(bf16, axis=-1))
  assert cos.min() > 0.99, cos.min()
  # bf16 is really used (outputs differ) yet close: each bf16 matmul rounds its inputs to
  # eps = 2^-7 ~ 7.8e-3 relative; over the 4 blocks the error measures ~1.3% of max|f32|
  # (level 3 and cls), so bound it by 8 eps.
  for name in ("level_3", "cls"):
    want, got = f32_out[name], bf16_out[name]
    diff = np.abs(got - want).max()
    assert 0 < diff <= 8 * 2.0 ** -7 * np.abs(want).max(), (name, diff, np.abs(want).max())


def test_crop_then_vfm_resize(tiny_vfm, image_dir):
  """--image_size 112 --size 224: 112 px crops, resized to the VFM's 224 by --resize."""
  path = str(image_dir / "c.jpg")
  got = features.run(vfm=tiny_vfm, images=[path], num_heads=3, image_size=112, size=224,
                     resize="jax_bicubic", levels=(3,), log=lambda s: None)
  model, params = vfm_zoo.load_dinov2_official(tiny_vfm, num_heads=3)
  x = features.to_signed(features.center_crop_resize(features.read_image(path), 112))[None]
  x = preprocess.vfm_input(jnp.asarray(x), size=(224, 224), resize="jax_bicubic")
  want = model.apply({"params": params}, x, levels=(3,))["levels"][0]
  # As above: the same f32 program shape-for-shape, another batch.
  np.testing.assert_allclose(got["level_3"], want, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(got["grid"], [16, 16])


def test_cli_subprocess(tiny_vfm, image_dir, tmp_path):
  """The real entry point: absl flags, positional image paths, exit codes."""
  out = tmp_path / "f.npz"
  cmd = [sys.executable, "-m", "vfmtok_jax.features", "--vfm", tiny_vfm, "--num_heads", "3",
         "--out", str(out), str(image_dir / "a.png"), str(image_dir / "c.jpg")]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "c.jpg" in done.stdout and "nearest other image" in done.stdout
  with np.load(out) as f:
    assert f["level_3"].shape == (2, 256, 48)
  (image_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
  done = subprocess.run(cmd[:-2] + [str(image_dir)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 1
  assert "broken.jpg" in done.stderr and "Traceback" not in done.stderr


def test_corrupt_image_names_the_file(tiny_vfm, image_dir, capsys):
  bad = image_dir / "zz_corrupt.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
  with pytest.raises(ValueError, match=r"cannot read image .*zz_corrupt\.png"):
    features.run(vfm=tiny_vfm, images=[str(image_dir)], num_heads=3, log=lambda s: None)
  fv = _flags(["--vfm", tiny_vfm, "--num_heads", "3", "--images", str(bad)])
  assert features.run_from_flags(fv) == 1
  assert "zz_corrupt.png" in capsys.readouterr().err


def test_bad_inputs(tiny_vfm, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "readme.md").write_text("no images here")
  with pytest.raises(ValueError, match="has no image files"):
    features.run(vfm=tiny_vfm, images=[str(empty)], num_heads=3)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    features.run(vfm=tiny_vfm, images=[str(tmp_path / "absent.jpg")], num_heads=3)
  img = tmp_path / "x.png"
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(img)
  with pytest.raises(FileNotFoundError, match="unknown VFM source 'dinov2_vitq14'"):
    features.run(vfm="dinov2_vitq14", images=[str(img)])
  with pytest.raises(ValueError, match="out of range"):
    features.run(vfm=tiny_vfm, images=[str(img)], num_heads=3, levels=(7,), log=lambda s: None)
  with pytest.raises(ValueError, match="multiple of the patch size"):
    features.run(vfm=tiny_vfm, images=[str(img)], num_heads=3, size=100, log=lambda s: None)
  with pytest.raises(flags.IllegalFlagValueError):
    _flags(["--resize", "lanczos"])


def test_center_crop_resize():
  img = np.zeros((100, 300, 3), np.uint8)
  img[:, 100:200] = 255  # the center square is white
  out = features.center_crop_resize(img, 50)
  assert out.shape == (50, 50, 3) and out.dtype == np.uint8
  assert out[:, 2:-2].min() == 255
  assert features.to_signed(out).max() == 1.0


def test_demo_photos_offline(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  photos = demo_photos.demo_photos()
  assert len(photos) >= 10 and len({n for n, _ in photos}) == len(photos)
  for name, img in photos:
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3, name
    assert min(img.shape[:2]) >= 224 and img.std() > 10, name
  import skimage.data  # pylint: disable=g-import-not-at-top
  left, right, _ = skimage.data.stereo_motorcycle()
  got = dict(photos)
  np.testing.assert_array_equal(got["motorcycle_left"], left)
  np.testing.assert_array_equal(got["motorcycle_right"], right)
  with pytest.raises(KeyError, match="unknown demo photo"):
    demo_photos.load_photo("lena")


def test_nearest_table():
  sims = np.array([[1.0, 0.2, 0.9], [0.2, 1.0, 0.3], [0.9, 0.3, 1.0]])
  before = sims.copy()
  lines = features.nearest_table(["a", "bb", "c"], sims).splitlines()
  assert lines[1].split() == ["a", "c", "0.900"]
  assert lines[2].split() == ["bb", "c", "0.300"]
  np.testing.assert_array_equal(sims, before)  # the diagonal is masked on a copy
