"""The tokenizer's generator-side loss terms (spec 6.1), each returned on its own, in float32.

  reconstruction  2 * MSE (the reference's 'l2' rec loss plus an extra F.mse_loss), or L1
  perceptual      LPIPS (VGG16), optional
  vq, commit      from the quantizer (commit already times beta)
  semantic        mean(1 - cos(pred, target)) over tokens, cos with per-norm eps 1e-6
  gan             non-saturating generator loss, gated by the discriminator start step
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction(x: jax.Array, x_hat: jax.Array, kind: str = "l2x2") -> jax.Array:
  """'l2x2': 2 * mean((x - x_hat)^2) (reference); 'l2': mean squared; 'l1': mean abs."""
  diff = x.astype(jnp.float32) - x_hat.astype(jnp.float32)
  if kind == "l2x2":
    return 2.0 * jnp.mean(jnp.square(diff))
  if kind == "l2":
    return jnp.mean(jnp.square(diff))
  if kind == "l1":
    return jnp.mean(jnp.abs(diff))
  raise ValueError(f"unknown reconstruction loss {kind!r}; expected l2x2, l2 or l1")


def cosine_similarity(a: jax.Array, b: jax.Array, eps: float = 1e-6) -> jax.Array:
  """`nn.CosineSimilarity(dim=-1, eps)`: a.b / (max(|a|, eps) * max(|b|, eps))."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  na = jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=-1), eps)
  return jnp.sum(a * b, axis=-1) / (na * nb)


def semantic(pred: jax.Array, target: jax.Array) -> jax.Array:
  """mean(1 - cos(pred, stop_gradient(target))) over (B, N)."""
  return jnp.mean(1.0 - cosine_similarity(pred, jax.lax.stop_gradient(target)))


def psnr(x: jax.Array, x_hat: jax.Array) -> jax.Array:
  """Per-image PSNR (dB) of images in [-1, 1] mapped to [0, 1]. Shape (B,)."""
  a = (jnp.clip(x.astype(jnp.float32), -1, 1) + 1) / 2
  b = (jnp.clip(x_hat.astype(jnp.float32), -1, 1) + 1) / 2
  mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))
