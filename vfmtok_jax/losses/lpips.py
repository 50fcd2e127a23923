"""LPIPS (VGG16) perceptual distance as taming / VFMTok use it (spec 6.3).

  x, y in [-1, 1] -> ScalingLayer (x - shift) / scale -> torchvision VGG16 `features`, tapped after
  relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (`features[0:4]`, `[4:9]`, `[9:16]`, `[16:23]`,
  `[23:30]`) -> per-tap channel unit-normalisation x / (||x||_2 + 1e-10) -> squared difference ->
  NetLinLayer (Dropout(0.5) in train mode, then 1x1 conv C -> 1 without bias) -> spatial mean ->
  sum over the 5 taps -> (B,).

Weights: ONE local file (`.safetensors`, `.pth` or `.npz`), or two (VGG16 + lin layers), holding
  * the VGG16 convs in torchvision layout `features.N.weight/bias` (N in 0, 2, 5, ..., 28), or the
    taming / `lpips`-package layout `net.sliceK.N.weight/bias` (same N);
  * the LPIPS lin layers `linK.model.1.weight` (taming's `vgg.pth`, the `lpips` package's
    `weights/v0.1/vgg.pth`; `linK.model.0.weight`, the no-dropout naming, is accepted too).
`scaling_layer.shift/scale` buffers and torchvision's `classifier.*` are ignored (the layouts are
`weights.lpips`'s). Build the single file offline with `python -m vfmtok_jax.convert.lpips_weights`
(see `MISSING_WEIGHTS_HELP`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.models import layers
from vfmtok_jax.models.pixel_decoder import Conv
from vfmtok_jax.weights import files
from vfmtok_jax.weights import lpips as lpips_keys
from vfmtok_jax.weights import trees

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision `vgg16().features` conv indices per LPIPS tap (a 2x2 max-pool precedes taps 1-4).
VGG16_STAGES = lpips_keys.VGG16_STAGES
VGG16_WIDTHS = (64, 128, 256, 512, 512)
WEIGHTS_FILENAME = "lpips_vgg16.safetensors"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
LIN_URL = "https://heibox.uni-heidelberg.de/f/607503859c864bc1b30b/?dl=1"  # taming vgg.pth

MISSING_WEIGHTS_HELP = """\
LPIPS needs one local weight file holding torchvision's VGG16 ImageNet weights and the LPIPS lin
layers; nothing is downloaded. Produce it on a machine with internet:

  # 1. VGG16 (torchvision IMAGENET1K_V1, {vgg_url}):
  python -c "import torch, torchvision; torch.save(torchvision.models.vgg16(weights='IMAGENET1K_V1').features.state_dict(), 'vgg16_features.pth')"
  # 2. LPIPS lin layers: taming's vgg.pth ({lin_url}, md5 d507d7349b931f0638a25a48a722f98a),
  #    or `lpips/weights/v0.1/vgg.pth` from `pip install lpips`.
  # 3. merge:
  python -m vfmtok_jax.convert.lpips_weights --vgg vgg16_features.pth --lin vgg.pth --out {path}

Then put the result at {path} (or pass its path to load_lpips; the default folder is
${env}, else ~/.cache/vfmtok_jax)."""


def default_path() -> str:
  """`$VFMTOK_JAX_WEIGHTS/lpips_vgg16.safetensors` (else under ~/.cache/vfmtok_jax)."""
  return os.path.join(files.weights_dir(), WEIGHTS_FILENAME)


def _normalize(x: jax.Array, eps: float = 1e-10) -> jax.Array:
  """x / (||x||_2 over channels + eps); zero gradient (not NaN) where a feature vector is 0."""
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  pos = sq > 0
  norm = jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)
  return x / (norm + eps)


class NetLin(nn.Module):
  """Dropout(0.5) (train mode) then 1x1 conv C -> 1 without bias; kernel (1, 1, C, 1) HWIO."""
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    kernel = self.param("kernel", layers.logical(nn.initializers.lecun_normal(),
                                                 (None, None, "conv_in", None)),
                        (1, 1, x.shape[-1], 1), jnp.float32)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    return jnp.einsum("bhwc,c->bhw", x, kernel[0, 0, :, 0])


class LPIPS(nn.Module):
  """LPIPS-VGG16 distance.

  Params: `features_N/{kernel, bias}` (N = torchvision `features` index), `linK/kernel` (1,1,C,1).
  """
  dropout_rate: float = 0.5

  def vgg_taps(self, x: jax.Array) -> list[jax.Array]:
    """(B, H, W, 3) scaled input -> the 5 post-ReLU taps (B, H/2^k, W/2^k, C_k)."""
    taps = []
    for k, stage in enumerate(VGG16_STAGES):
      if k:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for idx in stage:
        x = nn.relu(Conv(VGG16_WIDTHS[k], 3, name=f"features_{idx}")(x))
      taps.append(x)
    return taps

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """Args: x, y (B, H, W, 3) in [-1, 1]. Returns (B,) float32 distances.

    `deterministic=False` applies the lin-layer dropout (rng stream 'dropout'), as the reference
    does during training (spec 9.12).
    """
    b = x.shape[0]
    shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
    both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
    taps = self.vgg_taps((both - shift) / scale)
    total = jnp.zeros((b,), jnp.float32)
    for k, feat in enumerate(taps):
      diff = jnp.square(_normalize(feat[:b]) - _normalize(feat[b:]))
      lin = NetLin(self.dropout_rate, name=f"lin{k}")(diff, deterministic=deterministic)
      total = total + lin.mean(axis=(1, 2))
    return total


# ----------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------

def from_state(state: Mapping[str, np.ndarray], *, source: str) -> tuple[LPIPS, Any]:
  """(LPIPS(), params) from a flat state dict in any accepted layout.

  Raises:
    WeightLoadError: missing, unexpected, duplicated or mis-shaped tensors.
  """
  model = LPIPS()
  dummy = np.zeros((1, 32, 32, 3), np.float32)
  expected = trees.expected_params(model, dummy, dummy)
  params = trees.assemble(expected, lpips_keys.lpips_mapping(),
                          lpips_keys.canonical_state(state, source=source), source=source)
  return model, params


def load_lpips(path: str | None = None, lin_path: str | None = None) -> tuple[LPIPS, Any]:
  """(LPIPS(), params) from local files; nothing is downloaded.

  Args:
    path: one file with VGG16 + lin weights (see module doc); default
      `$VFMTOK_JAX_WEIGHTS/lpips_vgg16.safetensors` (else under ~/.cache/vfmtok_jax).
    lin_path: optional second file with the lin layers when `path` holds only VGG16.

  Raises:
    FileNotFoundError: a file is absent (the message says how to produce it).
    WeightLoadError: missing, unexpected or mis-shaped tensors.
  """
  path = path or default_path()
  for p in (path, lin_path):
    if p is not None and not os.path.isfile(p):
      raise FileNotFoundError(f"LPIPS weight file {p} does not exist.\n" +
                              MISSING_WEIGHTS_HELP.format(path=path, vgg_url=VGG16_URL,
                                                          lin_url=LIN_URL,
                                                          env=files.WEIGHTS_ENV))
  state = dict(files.read_state_dict(path))
  source = path
  if lin_path is not None:
    lin = files.read_state_dict(lin_path)
    clash = sorted(set(state) & set(lin))
    if clash:
      raise files.WeightLoadError(f"{path} + {lin_path}", other=[
          f"{k} is in both files" for k in clash])
    state.update(lin)
    source = f"{path} + {lin_path}"
  return from_state(state, source=source)
