"""Region-adaptive encoder: learnable anchor queries read multi-level VFM features (spec 3).

Per level: `norm_layers_i(projectors_i(f_i))` with projector = Linear(no bias) -> LN -> ReLU ->
Linear(no bias) -> LN. The levels are flattened level-major into the deformable-attention
value. Anchor queries `carrier_tokens` (normed by `norm_pre1`, the same for every image) with
position `slots_pos` and fixed reference points on a sqrt(n) x sqrt(n) grid go through
post-norm layers: MS-deformable cross-attention -> causal self-attention -> ReLU FFN.
Intermediates (for parity tests) are sown into the "intermediates" collection.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import deform_attn
from vfmtok_jax.models import layers

Dtype = Any


def reference_points(num_queries: int) -> jax.Array:
  """(n, 2) anchor centres (x, y) in [0, 1] on the sqrt(n) grid, raster order n = i*s + j."""
  side = math.isqrt(num_queries)
  if side * side != num_queries:
    raise ValueError(f"number of region queries must be a square, got {num_queries}")
  c = (jnp.arange(side, dtype=jnp.float32) + 0.5) / side
  y, x = jnp.meshgrid(c, c, indexing="ij")
  return jnp.stack([x.reshape(-1), y.reshape(-1)], axis=-1)


class LevelProjector(nn.Module):
  """`mlp_0` Linear(in->dim, no bias) -> `mlp_1` LN -> ReLU -> `mlp_3` Linear -> `mlp_4` LN."""
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = dict(use_bias=False, kernel_init=layers.torch_default_kernel_init, dtype=self.dtype)
    x = layers.Dense(self.dim, kernel_axes=("vfm_embed", "embed"), name="mlp_0", **dense)(x)
    x = nn.relu(layers.LayerNorm(1e-5, dtype=self.dtype, name="mlp_1")(x))
    x = layers.Dense(self.dim, kernel_axes=("embed", "embed_out"), name="mlp_3", **dense)(x)
    return layers.LayerNorm(1e-5, dtype=self.dtype, name="mlp_4")(x)


class DeformableEncoderLayer(nn.Module):
  """Post-norm: s = LN1(s + MSDA(s+pos)); s = LN3(s + SA(s+pos)); s = LN2(s + FFN(s))."""
  dim: int
  ffn_dim: int
  num_levels: int
  num_heads: int = 8
  num_points: int = 4
  self_attn_heads: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, s, pos, ref, value, spatial_shapes):
    cross = deform_attn.MSDeformAttn(self.dim, self.num_levels, self.num_heads, self.num_points,
                                     dtype=self.dtype, name="cross_attn")
    s2, aux = cross(s + pos, ref, value, spatial_shapes, return_aux=True)
    self.sow("intermediates", "msda", aux)
    s = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm1")(s + s2)
    s2 = layers.MultiHeadAttention(self.self_attn_heads, causal=True,
                                   kernel_init=layers.torch_default_kernel_init,
                                   dtype=self.dtype, name="self_attn")(s + pos)
    s = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm3")(s + s2)
    dense = dict(kernel_init=layers.torch_default_kernel_init, dtype=self.dtype)
    h = nn.relu(layers.Dense(self.ffn_dim, kernel_axes=("embed", "mlp"), name="linear1",
                             **dense)(s))
    h = layers.Dense(self.dim, kernel_axes=("mlp", "embed"), name="linear2", **dense)(h)
    s = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm2")(s + h)
    return nn.with_logical_constraint(s, ("act_batch", "act_len", "act_emb"))


class RegionEncoder(nn.Module):
  """VFM levels -> region tokens `slots` (B, n, dim)."""
  dim: int = 512
  depth: int = 6
  num_queries: int = 256
  num_levels: int = 4
  num_heads: int = 8
  num_points: int = 4
  ffn_dim: int = 1024
  self_attn_heads: int = 8
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jax.Array], grids: Sequence[tuple[int, int]]) -> jax.Array:
    """Encodes.

    Args:
      features: num_levels arrays (B, h_l*w_l, C) (VFM patch tokens, row-major).
      grids: the (h_l, w_l) of each level (static).

    Returns:
      slots (B, n, dim).
    """
    if len(features) != self.num_levels or len(grids) != self.num_levels:
      raise ValueError(f"expected {self.num_levels} feature levels, got {len(features)}")
    b = features[0].shape[0]
    kv = []
    for i, f in enumerate(features):
      x = LevelProjector(self.dim, dtype=self.dtype, name=f"projectors_{i}")(f)
      x = layers.LayerNorm(1e-5, dtype=self.dtype, name=f"norm_layers_{i}")(x)
      self.sow("intermediates", "kv_features", x)
      kv.append(x)
    value = jnp.concatenate(kv, axis=1)
    init = nn.initializers.normal(self.dim ** -0.5)
    carriers = self.param("carrier_tokens", layers.logical(init, (None, "act_len", "embed")),
                          (1, self.num_queries, self.dim), jnp.float32)
    pos = self.param("slots_pos", layers.logical(init, (None, "act_len", "embed")),
                     (1, self.num_queries, self.dim), jnp.float32).astype(self.dtype)
    s = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm_pre1")(carriers)
    s = jnp.broadcast_to(s, (b,) + s.shape[1:])
    self.sow("intermediates", "carrier_normed", s)
    ref = jnp.broadcast_to(reference_points(self.num_queries)[None, :, None, :],
                           (b, self.num_queries, self.num_levels, 2))
    spatial_shapes = tuple(tuple(int(v) for v in g) for g in grids)
    for i in range(self.depth):
      s = DeformableEncoderLayer(self.dim, self.ffn_dim, self.num_levels, self.num_heads,
                                 self.num_points, self.self_attn_heads, dtype=self.dtype,
                                 name=f"layers_{i}")(s, pos, ref, value, spatial_shapes)
      self.sow("intermediates", "layer_out", s)
    return s


def identical_copies(params: dict) -> dict:
  """Encoder params with every `layers_i` equal to `layers_0` and every `projectors_i` equal to
  `projectors_0`: the reference deep-copies one layer and one projector, so its encoder starts
  from identical copies (spec 3.5). Leaves may be boxed (`nn.LogicallyPartitioned`)."""
  out = dict(params)
  for prefix in ("layers_", "projectors_"):
    for name in params:
      if name.startswith(prefix) and name != prefix + "0":
        out[name] = params[prefix + "0"]
  return out
