"""The shared ViT decoder: quantised region tokens -> pixel-decoder features and VFM features.

Spec section 5. Sequence [norm_post1(slots + slot_pos) ; norm(queries)] runs through pre-norm
layers (causal attention with q/k/v/out projections, fused SwiGLU `w12`/`w3`), no final norm.
Pixel branch: queries [cls + pos0 ; mask_embedding + pos(g x g) ; registers], where the
learned (T x T) table is resized with the reference's `scale_factor = (g + 0.1) / T` bicubic
(a = -0.75), normed by `norm_post1`; the g*g outputs feed the conv decoder.
Semantic branch (training): queries [cls + pos0 ; mask_dino + pos (native T x T) ; registers]
normed by `norm_post2`; the T*T outputs go through `proj` to the VFM width.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers
from vfmtok_jax.ops import resize as resize_ops

Dtype = Any


def swiglu_hidden(mlp_dim: int) -> int:
  """The reference's `SwiGLUFFNFused` hidden width: (int(mlp_dim * 2/3) + 7) // 8 * 8."""
  return (int(mlp_dim * 2 / 3) + 7) // 8 * 8


class SwiGLUFused(nn.Module):
  """`w3(silu(x1) * x2)` with `x1, x2 = split(w12 x)` (first half is the gate)."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.Dense(2 * self.hidden, kernel_axes=("embed", "mlp"),
                     kernel_init=layers.xavier_uniform, dtype=self.dtype, name="w12")(x)
    x1, x2 = jnp.split(h, 2, axis=-1)
    return layers.Dense(x.shape[-1], kernel_axes=("mlp", "embed"),
                        kernel_init=layers.xavier_uniform, dtype=self.dtype,
                        name="w3")(nn.silu(x1) * x2)


class DecoderLayer(nn.Module):
  """Pre-norm: `x += attn(norm1 x)`, `x += ffn(norm2 x)`; causal attention."""
  num_heads: int
  mlp_hidden: int
  attn_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    h = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm1")(x)
    x = x + layers.MultiHeadAttention(self.num_heads, causal=True, dropout_rate=self.attn_dropout,
                                      dtype=self.dtype, name="attn1")(
                                          h, deterministic=deterministic)
    h = layers.LayerNorm(1e-5, dtype=self.dtype, name="norm2")(x)
    x = x + SwiGLUFused(self.mlp_hidden, dtype=self.dtype, name="ffnet")(h)
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))


class ViTDecoder(nn.Module):
  """Region tokens (B, n, dim) -> pixel features (B, g, g, dim) [+ VFM features (B, T*T, out)]."""
  dim: int = 512
  depth: int = 6
  num_heads: int = 8
  mlp_dim: int = 2048
  num_slots: int = 256
  grid: int = 21                 # g: pixel-decoder grid (image_size // patch_size)
  pos_table: int = 24            # T: side of the learned position table (576 + 1 rows)
  semantic_dim: int = 1024       # width of the predicted VFM features (`proj`)
  num_registers: int = 4
  attn_dropout: float = 0.0
  dtype: Dtype = jnp.float32

  def setup(self):
    init = nn.initializers.normal(self.dim ** -0.5)
    d = self.dim

    def p(name, shape, initializer=init):
      return self.param(name, layers.logical(initializer, (None,) * (len(shape) - 1) + ("embed",)),
                        shape, jnp.float32)
    self.position_embedding = p("position_embedding", (1, 1 + self.pos_table ** 2, d))
    self.slot_position_embedding = p("slot_position_embedding", (1, self.num_slots, d))
    self.mask_embedding = p("mask_embedding", (1, 1, d))
    self.mask_dino = p("mask_dino", (1, 1, d))
    self.cls_token = p("cls_token", (1, 1, d))
    self.register_tokens = p("register_tokens", (1, self.num_registers, d), nn.initializers.zeros)
    self.layers = [DecoderLayer(self.num_heads, swiglu_hidden(self.mlp_dim),
                                attn_dropout=self.attn_dropout, dtype=self.dtype,
                                name=f"layers_{i}") for i in range(self.depth)]
    self.norm_post1 = layers.LayerNorm(1e-5, dtype=self.dtype)
    self.norm_post2 = layers.LayerNorm(1e-5, dtype=self.dtype)
    self.proj = layers.Dense(self.semantic_dim, kernel_axes=("embed", "vfm_embed"),
                             kernel_init=layers.xavier_uniform, dtype=self.dtype)

  def pixel_positions(self) -> jax.Array:
    """(1, 1 + g*g, dim): cls position + the table resized with scale (g + 0.1) / T."""
    t, g = self.pos_table, self.grid
    table = self.position_embedding
    if g == t:
      return table
    sf = (g + 0.1) / t
    patch = table[:, 1:].reshape(1, t, t, self.dim)
    patch = resize_ops.resize(patch, (g, g), "torch_bicubic", scale_factor=(sf, sf))
    return jnp.concatenate([table[:, :1], patch.reshape(1, g * g, self.dim)], axis=1)

  def _run(self, memory, queries, norm, deterministic):
    b = memory.shape[0]
    queries = jnp.concatenate(
        [jnp.broadcast_to(queries, (b,) + queries.shape[1:]),
         jnp.broadcast_to(self.register_tokens, (b, self.num_registers, self.dim))], axis=1)
    x = jnp.concatenate([self.norm_post1(memory), norm(queries.astype(self.dtype))], axis=1)
    for layer in self.layers:
      x = layer(x, deterministic=deterministic)
    return x

  def __call__(self, quant: jax.Array, *, semantic: bool = False,
               deterministic: bool = True) -> dict[str, jax.Array]:
    """Decodes region tokens.

    Args:
      quant: (B, n, dim) post-quantisation tokens (`post_slots_quant` output).
      semantic: also run the semantic branch (training).
      deterministic: disable attention dropout.

    Returns:
      dict with "pixel_features" (B, g, g, dim) and, when `semantic`, "semantic_pre_proj"
      (B, T*T, dim) and "semantic" (B, T*T, semantic_dim).
    """
    b, n, d = quant.shape
    memory = quant + self.slot_position_embedding.astype(quant.dtype)
    pos = self.pixel_positions()
    g = self.grid
    queries = jnp.concatenate([self.cls_token + pos[:, :1],
                               self.mask_embedding + pos[:, 1:]], axis=1)
    x = self._run(memory, queries, self.norm_post1, deterministic)
    out = {"pixel_features": x[:, n + 1:n + 1 + g * g].reshape(b, g, g, d)}
    if semantic:
      table = self.position_embedding
      queries = jnp.concatenate([self.cls_token + table[:, :1], self.mask_dino + table[:, 1:]],
                                axis=1)
      x = self._run(memory, queries, self.norm_post2, deterministic)
      pre = x[:, n + 1:n + 1 + self.pos_table ** 2]
      out["semantic_pre_proj"] = pre
      out["semantic"] = self.proj(pre)
    return out
