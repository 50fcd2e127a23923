"""The DINO discriminator's trainable heads: spectral-norm conv1d heads on feature maps.

Reference: VFMTok `vfmtok/tokenizer/discriminator_dino.py` (VAR / StyleGAN-T style). Per map
(B, N, C): [SNConv1d(k=1) -> BatchNormLocal -> LeakyReLU(0.2)] -> Residual((f(h) + h) / sqrt 2),
f = [SNConv1d(k=9, circular pad 4) -> BNLocal -> LReLU] -> SNConv1d(C -> 1, k=1) -> (B, N).
`models.dino_disc.DinoDisc` runs them on the frozen DINO features.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.models import layers


def _l2_normalize(v: jax.Array, eps: float) -> jax.Array:
  """`F.normalize(v, dim=0, eps)`: v / max(||v||, eps)."""
  return v / jnp.maximum(jnp.linalg.norm(v), eps)


class SNConv1d(nn.Module):
  """Conv1d (with bias) whose weight is divided by its spectral norm (PyTorch `spectral_norm`).

  kernel (k, in, out); the norm is taken of the PyTorch matrix W = weight(out, in, k).reshape(out,
  -1). `update=True` runs one power iteration first: v = normalize(W^T u), u = normalize(W v)
  (no gradient), then sigma = u . W v with gradient through W only.
  """
  features: int
  kernel_size: int = 1
  circular_pad: int = 0
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array, *, update: bool) -> jax.Array:
    """x: (B, L, C_in) -> (B, L + 2 * pad - k + 1, features)."""
    k, cin, cout = self.kernel_size, x.shape[-1], self.features
    kernel = self.param("kernel", layers.logical(layers.torch_default_kernel_init,
                                                 (None, "conv_in", "conv_out")),
                        (k, cin, cout), jnp.float32)
    bias = self.param("bias", layers.logical(layers.torch_default_bias_init(cin * k),
                                             ("conv_out",)), (cout,), jnp.float32)
    mat = kernel.transpose(2, 1, 0).reshape(cout, cin * k)

    def init_vec(n):
      return _l2_normalize(jax.random.normal(self.make_rng("params"), (n,), jnp.float32), self.eps)

    u = self.variable("spectral", "u", init_vec, cout)
    v = self.variable("spectral", "v", init_vec, cin * k)
    if update and not self.is_initializing():
      w = jax.lax.stop_gradient(mat)
      v_new = _l2_normalize(jnp.dot(w.T, u.value, precision="highest"), self.eps)
      u.value = _l2_normalize(jnp.dot(w, v_new, precision="highest"), self.eps)
      v.value = v_new
    uu, vv = jax.lax.stop_gradient(u.value), jax.lax.stop_gradient(v.value)
    sigma = jnp.dot(uu, jnp.dot(mat, vv, precision="highest"), precision="highest")
    p = self.circular_pad
    if p:
      x = jnp.concatenate([x[:, -p:], x, x[:, :p]], axis=1)
    y = jax.lax.conv_general_dilated(x.astype(jnp.float32), kernel / sigma, (1,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias


class BatchNormLocal(nn.Module):
  """Ghost batch norm: ceil(B / virtual_bs) groups of B / G samples, stats over (group, tokens).

  No running statistics (train = eval). Like the reference `view`, B must divide into G groups.
  `batch_groups` > 1 first splits the batch into that many contiguous slices (the per-device
  batches, as the reference normalises each GPU's batch alone) and groups within each slice.
  """
  virtual_bs: int = 8
  epsilon: float = 1e-6
  batch_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, L, C) -> (B, L, C) float32."""
    b, l, c = x.shape
    if b % self.batch_groups:
      raise ValueError(f"BatchNormLocal: batch {b} does not split into {self.batch_groups} "
                       "per-device slices")
    local = b // self.batch_groups
    g = -(-local // self.virtual_bs)
    if local % g:
      raise ValueError(f"BatchNormLocal: batch {local} does not split into {g} equal groups "
                       f"(virtual_bs={self.virtual_bs})")
    g *= self.batch_groups
    xg = x.astype(jnp.float32).reshape(g, b // g, l, c)
    mean = xg.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2), keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + self.epsilon)).reshape(b, l, c)
    scale = self.param("scale", layers.logical(nn.initializers.ones, ("conv_out",)), (c,),
                       jnp.float32)
    bias = self.param("bias", layers.logical(nn.initializers.zeros, ("conv_out",)), (c,),
                      jnp.float32)
    return y * scale + bias


class DiscHead(nn.Module):
  """One head: (B, N, C) -> (B, N) logits."""
  kernel_size: int = 9
  virtual_bs: int = 8
  norm_eps: float = 1e-6
  batch_groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, update: bool) -> jax.Array:
    c = x.shape[-1]

    def block(h, k, name):
      h = SNConv1d(c, k, k // 2, name=f"{name}_conv")(h, update=update)
      h = BatchNormLocal(self.virtual_bs, self.norm_eps, self.batch_groups,
                         name=f"{name}_norm")(h)
      return nn.leaky_relu(h, 0.2)

    h = block(x, 1, "block")
    h = (block(h, self.kernel_size, "res") + h) * (1.0 / np.sqrt(2))
    return SNConv1d(1, 1, name="cls")(h, update=update)[..., 0]


class DiscHeads(nn.Module):
  """One `DiscHead` per feature map (`head_i`); concatenated logits (B, sum N_i)."""
  num_maps: int = 5
  kernel_size: int = 9
  virtual_bs: int = 8
  norm_eps: float = 1e-6
  batch_groups: int = 1

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
    if len(feats) != self.num_maps:
      raise ValueError(f"expected {self.num_maps} feature maps, got {len(feats)}")
    return jnp.concatenate([
        DiscHead(self.kernel_size, self.virtual_bs, self.norm_eps, self.batch_groups,
                 name=f"head_{i}")(
            f, update=train) for i, f in enumerate(feats)], axis=1)
