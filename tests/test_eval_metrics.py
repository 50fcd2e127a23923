"""Reconstruction metrics, the PIL resize, padded batches, FD in VFM space and the linear probe,
each against an independent computation (scikit-image, PIL, scikit-learn, numpy/scipy)."""

import jax
import numpy as np
import pytest
from PIL import Image
from skimage import metrics as skm
from sklearn import linear_model

from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import images as image_io
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batched
from vfmtok_jax.evaluators import linear_probe
from vfmtok_jax.evaluators import recon
from vfmtok_jax.evaluators import vfm_features
from vfmtok_jax.models.vfm import dinov2


def _pairs(rng, shape, noise):
  a = rng.integers(0, 256, shape, dtype=np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
  return a, b


def test_psnr_and_ssim_match_scikit_image_as_the_reference_calls_it():
  rng = np.random.default_rng(0)
  a, b = _pairs(rng, (3, 40, 33, 3), 40)
  a[2] = np.clip(np.cumsum(rng.integers(-9, 10, (40, 33, 3)), axis=1) + 128, 0, 255)  # smooth
  out = jax.device_get(recon.pair_metrics_jit(b, a))
  for i in range(len(a)):
    rec, gt = b[i].astype(np.float32) / 255.0, a[i].astype(np.float32) / 255.0
    # Same pixels, f32 (ours) vs scikit-image: PSNR from one mean (~1e-7); SSIM's cancellation
    # (E[x^2] - E[x]^2) leaves ~1e-7 absolute per window, averaged: 2e-6 absolute.
    np.testing.assert_allclose(out["psnr"][i], skm.peak_signal_noise_ratio(gt, rec), rtol=1e-5)
    for name, data_range in (("ssim", 1.0), ("ssim_reference", 2.0)):
      want = skm.structural_similarity(rec, gt, channel_axis=-1, data_range=data_range)
      np.testing.assert_allclose(out[name][i], want, atol=2e-6, err_msg=name)
  assert np.all(out["ssim_reference"] > out["ssim"])  # the reference's range inflates SSIM


def test_ssim_refuses_images_smaller_than_its_window():
  with pytest.raises(ValueError, match="at least 7 px"):
    recon.ssim(np.zeros((1, 6, 8, 3), np.uint8), np.zeros((1, 6, 8, 3), np.uint8),
               data_range=1.0)


def test_pil_resize_is_pillows_default_bicubic():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, (2, 42, 42, 3), dtype=np.uint8)
  out = image_io.pil_resize(x, 32)
  want = np.stack([np.asarray(Image.fromarray(im).resize((32, 32), Image.BICUBIC)) for im in x])
  np.testing.assert_array_equal(out, want)
  assert image_io.pil_resize(x, 42) is x
  with pytest.raises(ValueError, match="uint8"):
    image_io.pil_resize(x.astype(np.float32), 32)


def test_padded_apply_keeps_every_row_once_whatever_the_batch():
  x = np.arange(11 * 3, dtype=np.float32).reshape(11, 3)
  fn = lambda c, v: {"y": v * c, "s": v.sum(-1)}  # noqa: E731
  for batch_size in (1, 4, 8, 16):
    out = batched.PaddedApply(fn, np.float32(2.0), batch_size=batch_size)(x)
    np.testing.assert_array_equal(out["y"], 2 * x)
    np.testing.assert_array_equal(out["s"], x.sum(-1))
  empty = batched.PaddedApply(fn, np.float32(2.0), batch_size=8)(x[:0])
  assert empty["y"].shape == (0, 3)


@pytest.fixture(scope="module")
def tiny_vfm():
  module = dinov2.DinoV2(embed_dim=32, depth=4, num_heads=2, pos_grid=4)
  params = module.init(jax.random.PRNGKey(0), np.zeros((1, 56, 56, 3), np.float32))["params"]
  return vfm_zoo.dinov2_vfm(module, params, "random tiny DINOv2")


def test_vfm_features_follow_the_fd_dinov2_protocol(tiny_vfm):
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, (5, 70, 70, 3), dtype=np.uint8)
  feats = vfm_features.VFMFeatures(tiny_vfm, size=56, batch_size=4)
  out = feats(images)
  x = np.stack([np.asarray(Image.fromarray(im).resize((56, 56), Image.BICUBIC)) for im in images])
  x = (x.astype(np.float32) / 255.0 - np.asarray(tiny_vfm.mean)) / np.asarray(tiny_vfm.std)
  want = tiny_vfm.module.apply({"params": tiny_vfm.params}, x)["cls"]
  # The extractor's padded batches vs one direct apply of the same f32 ViT: ~1e-6 of O(1).
  np.testing.assert_allclose(out, np.asarray(want), atol=1e-5)
  assert feats.label == "FD-dinov2 (random tiny DINOv2)"
  a, b = rng.normal(size=(50, 4)), rng.normal(size=(60, 4)) + 0.5
  assert vfm_features.frechet_distance(a, b) == adm.frechet_distance(adm.statistics(a),
                                                                     adm.statistics(b))


def test_linear_probe_is_scikit_learns_logistic_regression():
  rng = np.random.default_rng(3)
  k, d, n, l2 = 5, 16, 400, 1e-2
  y = rng.integers(0, k, n)
  x = rng.normal(size=(k, d))[y] + 1.5 * rng.normal(size=(n, d))
  x = x * rng.uniform(0.5, 3.0, d) + rng.normal(size=d)  # unequal scales: standardised first
  probe = linear_probe.fit(x, y, num_classes=k, l2=l2)
  xs = (x - probe.mean) / probe.scale
  ref = linear_model.LogisticRegression(C=1.0 / (l2 * n), tol=1e-10, max_iter=10000).fit(xs, y)
  # Two solvers to tol 1e-10 of the same strictly convex objective; optax L-BFGS in f32 stops
  # at ~1e-6 relative gradient: weights agree to ~1e-5 (a wrong l2 scale moves them by > 1e-2).
  np.testing.assert_allclose(probe.kernel, ref.coef_.T, atol=2e-5)
  np.testing.assert_allclose(probe.bias - probe.bias.mean(),
                             ref.intercept_ - ref.intercept_.mean(), atol=2e-5)
  assert linear_probe.accuracy(probe, x, y) == pytest.approx(ref.score(xs, y))


def test_linear_probe_names_bad_input():
  with pytest.raises(ValueError, match="labels must lie"):
    linear_probe.fit(np.zeros((3, 2)), np.array([0, 1, 5]), num_classes=3)
  with pytest.raises(ValueError, match="expected"):
    linear_probe.fit(np.zeros((3, 2)), np.array([0, 1]), num_classes=3)
