"""Optimizers and schedules from config values (optax).

The reference tokenizer uses Adam(0.9, 0.95), lr warmed up linearly from 1e-7 over
`warmup_steps` then constant (its "cosine" scheduler is flat), global-norm clipping 1.0 and an
EMA of the params with decay 0.9999. Weight decay (off in the reference) applies only to
kernels and embeddings (ndim >= 2) when enabled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def schedule(*, lr: float, warmup_steps: int, total_steps: int, decay: str = "constant",
             warmup_init: float = 1e-7, final_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up from `warmup_init` to `lr`, then constant or cosine to `final_lr`."""
  if decay not in ("constant", "cosine"):
    raise ValueError(f"unknown lr decay {decay!r}; expected 'constant' or 'cosine'")

  def fn(step):
    step = jnp.asarray(step, jnp.float32)
    warm = warmup_init + (lr - warmup_init) * step / max(warmup_steps, 1)
    if decay == "constant":
      after = jnp.asarray(lr, jnp.float32)
    else:
      frac = jnp.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
      after = final_lr + 0.5 * (lr - final_lr) * (1.0 + jnp.cos(jnp.pi * frac))
    return jnp.where(step < warmup_steps, warm, after)
  return fn


def decay_mask(params):
  """True for leaves that weight decay applies to: arrays with ndim >= 2."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def adam(*, lr_schedule: optax.Schedule, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
         weight_decay: float = 0.0, grad_clip: float | None = 1.0,
         mask=decay_mask) -> optax.GradientTransformation:
  """clip -> Adam(W) with the decay `mask` (params -> bool tree); lr from the schedule."""
  parts = []
  if grad_clip:
    parts.append(optax.clip_by_global_norm(grad_clip))
  if weight_decay:
    parts.append(optax.adamw(lr_schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                             mask=mask))
  else:
    parts.append(optax.adam(lr_schedule, b1=b1, b2=b2, eps=eps))
  return optax.chain(*parts)


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)
