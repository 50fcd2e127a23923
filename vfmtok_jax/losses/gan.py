"""GAN objectives of the VFMTok tokenizer (spec 6.1-6.2), float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_fake))); logits of any shape -> scalar."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def softplus_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Non-saturating generator loss mean softplus(-D(x_fake)) -> scalar."""
  return jnp.mean(jax.nn.softplus(-logits_fake.astype(jnp.float32)))


def disc_weight(step, *, disc_start: int = 20000, weight: float = 0.5) -> jax.Array:
  """w_d(t): 0 for t < disc_start, else `weight` (taming `adopt_weight`); t may be traced.

  The reference passes t = train_steps + 1 (the 1-based step being taken).
  """
  return jnp.where(jnp.asarray(step) < disc_start, 0.0, weight).astype(jnp.float32)
