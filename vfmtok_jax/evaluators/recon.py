"""Reconstruction metrics of uint8 images as the reference's tokenizer evaluation computes them.

The reference (`vqgan_test.py`) scores each 256 px uint8 pair, read as float32 in [0, 1], with
scikit-image:
  * PSNR: `peak_signal_noise_ratio` (data range 1 for [0, 1] floats), 10 log10(1 / MSE);
  * SSIM: `structural_similarity(..., channel_axis=-1, data_range=2.0)`: a 7 x 7 uniform window,
    K1 = 0.01, K2 = 0.03, sample covariances (x 49/48), the mean over the window positions that
    lie fully inside the image, then over the channels. `data_range=2.0` is wrong for [0, 1]
    images (it inflates SSIM); the correct range is 1. Both are offered by name:
    `SSIM_DATA_RANGES`.
The results are per image; the paper's numbers are their means over the evaluation set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03
# metric name -> data_range: the correct SSIM of [0, 1] images, and the reference's.
SSIM_DATA_RANGES = {"ssim": 1.0, "ssim_reference": 2.0}


def _unit(images: jax.Array) -> jax.Array:
  """uint8 (or 0..255) images -> float32 in [0, 1], as the reference's `astype(f32) / 255`."""
  return images.astype(jnp.float32) / 255.0


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  """(B, H, W, C) uint8 pairs -> (B,) PSNR in dB of the [0, 1] images (inf when equal)."""
  mse = jnp.mean(jnp.square(_unit(a) - _unit(b)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / mse)


def _window_mean(x: jax.Array, size: int) -> jax.Array:
  """Mean over every size x size window fully inside the image: (B, H, W, C) ->
  (B, H - size + 1, W - size + 1, C); the same numbers as scipy's `uniform_filter` there."""
  h, w = x.shape[1] - size + 1, x.shape[2] - size + 1
  rows = sum(x[:, i:i + h] for i in range(size))
  return sum(rows[:, :, j:j + w] for j in range(size)) / float(size * size)


def ssim(a: jax.Array, b: jax.Array, *, data_range: float) -> jax.Array:
  """(B, H, W, C) uint8 pairs -> (B,) SSIM of the [0, 1] images, scikit-image's defaults.

  `data_range=1.0` is the correct range; `2.0` reproduces the reference's number.
  """
  if min(a.shape[1], a.shape[2]) < SSIM_WINDOW:
    raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px, got {a.shape[1:3]}")
  x, y = _unit(a), _unit(b)
  n = SSIM_WINDOW * SSIM_WINDOW
  cov_norm = n / (n - 1.0)
  ux, uy = _window_mean(x, SSIM_WINDOW), _window_mean(y, SSIM_WINDOW)
  uxx, uyy = _window_mean(x * x, SSIM_WINDOW), _window_mean(y * y, SSIM_WINDOW)
  uxy = _window_mean(x * y, SSIM_WINDOW)
  vx, vy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy)
  vxy = cov_norm * (uxy - ux * uy)
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


def pair_metrics(a: jax.Array, b: jax.Array) -> dict[str, jax.Array]:
  """Every per-image metric of uint8 pairs: {"psnr", "ssim", "ssim_reference"}, each (B,)."""
  out = {"psnr": psnr(a, b)}
  for name, data_range in SSIM_DATA_RANGES.items():
    out[name] = ssim(a, b, data_range=data_range)
  return out


pair_metrics_jit = jax.jit(pair_metrics)
