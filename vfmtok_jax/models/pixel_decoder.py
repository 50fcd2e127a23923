"""VQGAN-style conv pixel decoder (Taming/LlamaGen `Decoder`, as VFMTok builds it).

conv_in -> mid [ResBlock, AttnBlock, ResBlock] -> for each level (channels ch*ch_mult[::-1]):
(num_res_blocks+1) ResBlocks, then nearest x2 + conv except at the last level ->
GroupNorm -> swish -> conv_out. No attention in the up path. GroupNorm: 32 groups, eps 1e-6.
Input (B, g, g, z) -> output (B, g*2^(L-1), g*2^(L-1), 3). NHWC throughout.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers
from vfmtok_jax.ops import conv

Dtype = Any


class Conv(nn.Module):
  """2-D conv, stride 1, 'same' padding, kernel HWIO (f32 params)."""
  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    fan_in = k * k * x.shape[-1]
    kernel = self.param("kernel", layers.logical(layers.torch_default_kernel_init,
                                                 (None, None, "conv_in", "conv_out")),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", layers.logical(layers.torch_default_bias_init(fan_in), ("conv_out",)),
                      (self.features,), jnp.float32)
    y = conv.conv2d_same(x.astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias).astype(self.dtype)


class GroupNorm(nn.Module):
  """GroupNorm with float32 statistics (PyTorch semantics, biased variance)."""
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    g = self.num_groups
    xf = x.astype(jnp.float32).reshape(x.shape[:-1] + (g, c // g))
    axes = tuple(range(1, xf.ndim - 2)) + (xf.ndim - 1,)
    mean = xf.mean(axes, keepdims=True)
    var = jnp.square(xf - mean).mean(axes, keepdims=True)
    y = ((xf - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    scale = self.param("scale", layers.logical(nn.initializers.ones, ("conv_out",)), (c,),
                       jnp.float32)
    bias = self.param("bias", layers.logical(nn.initializers.zeros, ("conv_out",)), (c,),
                      jnp.float32)
    return (y * scale + bias).astype(self.dtype)


class ResBlock(nn.Module):
  """`shortcut(x) + conv2(swish(gn2(conv1(swish(gn1 x)))))`; 1x1 `nin_shortcut` if widths differ."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = nn.swish(GroupNorm(dtype=self.dtype, name="norm1")(x))
    h = Conv(self.features, dtype=self.dtype, name="conv1")(h)
    h = nn.swish(GroupNorm(dtype=self.dtype, name="norm2")(h))
    h = Conv(self.features, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, kernel_size=1, dtype=self.dtype, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head attention over all H*W positions with 1x1-conv q/k/v/proj_out, residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    h = GroupNorm(dtype=self.dtype, name="norm")(x)
    q, k, v = (Conv(c, kernel_size=1, dtype=self.dtype, name=n)(h).reshape(b, 1, hh * ww, c)
               for n in ("q", "k", "v"))
    out = layers.dot_product_attention(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3),
                                       v.transpose(0, 2, 1, 3), dtype=self.dtype)
    out = out.reshape(b, hh, ww, c)
    return x + Conv(c, kernel_size=1, dtype=self.dtype, name="proj_out")(out)


def upsample_nearest2x(x: jax.Array) -> jax.Array:
  """Each pixel duplicated 2x2 (F.interpolate(scale_factor=2, mode='nearest'))."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class PixelDecoder(nn.Module):
  """(B, g, g, z_channels) -> (B, g*2^(L-1), g*2^(L-1), out_channels)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 1
  out_channels: int = 3
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array) -> jax.Array:
    n_levels = len(self.ch_mult)
    block_in = self.ch * self.ch_mult[-1]
    h = Conv(block_in, dtype=self.dtype, name="conv_in")(z)
    h = ResBlock(block_in, dtype=self.dtype, name="mid_0")(h)
    h = AttnBlock(dtype=self.dtype, name="mid_1")(h)
    h = ResBlock(block_in, dtype=self.dtype, name="mid_2")(h)
    for i in range(n_levels):
      block_out = self.ch * self.ch_mult[n_levels - 1 - i]
      for j in range(self.num_res_blocks + 1):
        h = ResBlock(block_out, dtype=self.dtype, name=f"conv_blocks_{i}_res_{j}")(h)
      if i != n_levels - 1:
        h = Conv(block_out, dtype=self.dtype, name=f"conv_blocks_{i}_upsample")(
            upsample_nearest2x(h))
      h = nn.with_logical_constraint(h, ("act_batch", None, None, "act_conv"))
    h = nn.swish(GroupNorm(dtype=self.dtype, name="norm_out")(h))
    return Conv(self.out_channels, dtype=self.dtype, name="conv_out")(h)
