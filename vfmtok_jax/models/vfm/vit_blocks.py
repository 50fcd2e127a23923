"""Transformer-encoder pieces shared by the VFM towers (DINOv2, CLIP, SigLIP)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers

Dtype = Any


class SelfAttention(nn.Module):
  """Multi-head self-attention with a fused `qkv` projection (q | k | v order) and `proj`."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    qkv = layers.Dense(3 * d, use_bias=self.qkv_bias, kernel_axes=("embed", "qkv"),
                       dtype=self.dtype, name="qkv")(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, d // self.num_heads)
    out = layers.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                       dtype=self.dtype)
    out = out.reshape(b, n, d)
    return layers.Dense(d, kernel_axes=("heads_merged", "embed"), dtype=self.dtype,
                        name="proj")(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2."""
  hidden: int
  act: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.Dense(self.hidden, kernel_axes=("embed", "mlp"), dtype=self.dtype, name="fc1")(x)
    h = layers.activation(self.act)(h)
    return layers.Dense(x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype,
                        name="fc2")(h)


class SwiGLU(nn.Module):
  """DINOv2's fused SwiGLU: `w12` (first half gate, second half value) -> silu(g)*v -> `w3`."""
  hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.Dense(2 * self.hidden, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                     name="w12")(x)
    gate, value = jnp.split(h, 2, axis=-1)
    return layers.Dense(x.shape[-1], kernel_axes=("mlp", "embed"), dtype=self.dtype,
                        name="w3")(nn.silu(gate) * value)


class LayerScale(nn.Module):
  """Per-channel scale `gamma` (DINOv2 LayerScale)."""
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    gamma = self.param("gamma", layers.logical(nn.initializers.constant(self.init_value),
                                               ("embed",)), (x.shape[-1],), jnp.float32)
    return x * gamma.astype(x.dtype)


class PreNormBlock(nn.Module):
  """`x += ls1 * attn(norm1 x); x += ls2 * ffn(norm2 x)` (ViT pre-norm block)."""
  num_heads: int
  mlp_hidden: int
  ffn: str = "mlp"          # "mlp" or "swiglu"
  act: str = "gelu"
  layerscale: bool = True
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="norm1")(x)
    h = SelfAttention(self.num_heads, dtype=self.dtype, name="attn")(h)
    if self.layerscale:
      h = LayerScale(name="ls1")(h)
    x = x + h
    h = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="norm2")(x)
    if self.ffn == "swiglu":
      h = SwiGLU(self.mlp_hidden, dtype=self.dtype, name="mlp")(h)
    elif self.ffn == "mlp":
      h = Mlp(self.mlp_hidden, act=self.act, dtype=self.dtype, name="mlp")(h)
    else:
      raise ValueError(f"unknown ffn {self.ffn!r}; expected 'mlp' or 'swiglu'")
    if self.layerscale:
      h = LayerScale(name="ls2")(h)
    x = x + h
    return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))


class PatchEmbed(nn.Module):
  """Non-overlapping patch conv: (B, H, W, C) -> (B, H/p, W/p, D). Kernel HWIO."""
  embed_dim: int
  patch_size: int
  use_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    p = self.patch_size
    kernel = self.param("kernel", layers.logical(nn.initializers.lecun_normal(),
                                                 (None, None, None, "embed")),
                        (p, p, x.shape[-1], self.embed_dim), jnp.float32)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (p, p), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
    if self.use_bias:
      bias = self.param("bias", layers.logical(nn.initializers.zeros, ("embed",)),
                        (self.embed_dim,), jnp.float32)
      y = y + bias
    return y.astype(self.dtype)
