"""The FID InceptionV3: the 2015-12-05 TensorFlow graph the ADM evaluator and pytorch-fid use.

Layout and names follow pytorch-fid's port (torchvision's `Inception3` with the FID blocks), so
its `pt_inception-2015-12-05-*.pth` maps key for key (`weights/inception.py`). Differences from
torchvision's ImageNet InceptionV3, all from the TF graph: the branch average pools exclude the
padding (TF `SAME` average pooling), and the last block (`Mixed_7c`) pools its fourth branch with
a max pool. Every convolution is conv (no bias) -> batch norm (eps 1e-3, frozen statistics) ->
ReLU.

Input: (B, 299, 299, 3) already normalised as the graph does it (`(x - 128) / 128` of the
resized 0..255 image; `evaluators/inception.py` does that). Outputs, with the TF tensor names the
ADM evaluator reads:
  pool     (B, 2048)  `pool_3:0`, FID / precision / recall features;
  spatial  (B, 2023)  `mixed_6/conv:0[..., :7]` flattened (17 x 17 x 7, HWC order), sFID;
  logits   (B, 1008)  pool @ `softmax/logits` weight, without the bias, as ADM's IS does.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NUM_LOGITS = 1008
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3


class BasicConv(nn.Module):
  """conv (no bias) -> frozen batch norm -> ReLU; `padding` per spatial dim (torch style)."""
  features: int
  kernel: Sequence[int]
  strides: int = 1
  padding: Sequence[int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.features, tuple(self.kernel), strides=self.strides,
                padding=tuple((p, p) for p in self.padding), use_bias=False,
                precision=jax.lax.Precision.HIGHEST, name="conv")(x)
    c = self.features
    scale = self.param("bn_scale", nn.initializers.ones, (c,))
    bias = self.param("bn_bias", nn.initializers.zeros, (c,))
    mean = self.param("bn_mean", nn.initializers.zeros, (c,))
    var = self.param("bn_var", nn.initializers.ones, (c,))
    x = (x - mean) * (scale * jax.lax.rsqrt(var + BN_EPS)) + bias
    return nn.relu(x)


def _avg_pool(x):
  """3x3, stride 1, TF SAME: the mean over the window's pixels inside the image."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), (2, 2))


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], -1)


class InceptionC(nn.Module):
  """The 17x17 block; returns (output, branch1x1) so `Mixed_6d`'s 1x1 branch (the TF graph's
  `mixed_6/conv`) can be read."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))
    b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv(c, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv(c, row[0], padding=row[1], name="branch7x7_2")(b7)
    b7 = BasicConv(192, col[0], padding=col[1], name="branch7x7_3")(b7)
    bd = BasicConv(c, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv(c, col[0], padding=col[1], name="branch7x7dbl_2")(bd)
    bd = BasicConv(c, row[0], padding=row[1], name="branch7x7dbl_3")(bd)
    bd = BasicConv(c, col[0], padding=col[1], name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, row[0], padding=row[1], name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], -1), b1


class InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], -1)


class InceptionE(nn.Module):
  """The 8x8 block; `max_pool` (the graph's last block) pools the fourth branch with a max."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool(x)
    bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


class FIDInceptionV3(nn.Module):
  """(B, 299, 299, 3) normalised images -> {"pool", "spatial", "logits"} (module docstring)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
    x = x.astype(jnp.float32)
    x = BasicConv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x, _ = InceptionC(128, name="Mixed_6b")(x)
    x, _ = InceptionC(160, name="Mixed_6c")(x)
    x, mixed_6_conv = InceptionC(160, name="Mixed_6d")(x)
    x, _ = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool = jnp.mean(x, axis=(1, 2))
    spatial = mixed_6_conv[..., :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
    weight = self.param("logits_kernel", nn.initializers.zeros, (pool.shape[-1], NUM_LOGITS))
    logits = jnp.dot(pool, weight, precision=jax.lax.Precision.HIGHEST)
    return {"pool": pool, "spatial": spatial, "logits": logits}
