"""L2-normalised low-dimensional VQ codebook (VFMTok `slot_quantize`, spec section 4).

Distances, argmin and losses are float32: d_k = |z|^2 + |e_k|^2 - 2 z.e_k on l2-normalised
z and codebook rows (= 2 - 2 cos), argmin then `take` (never a one-hot matmul), and the
straight-through estimator on the normalised vector.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """`F.normalize`: x / max(|x|, eps) over the last axis."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def codebook_stats(indices: jax.Array, codebook_size: int) -> dict[str, jax.Array]:
  """Usage statistics of a batch of indices (any shape), float32 scalars.

  usage: fraction of codes hit at least once; perplexity: exp(entropy) of the code histogram;
  max_ratio: the most frequent code's share; zeros_ratio: fraction of codes never hit.
  Works on globally sharded arrays (XLA inserts the reductions).
  """
  counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.float32)
  probs = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
  used = (counts > 0).astype(jnp.float32)
  return {
      "codebook_usage": used.mean(),
      "codebook_perplexity": jnp.exp(entropy),
      "codebook_max_ratio": probs.max(),
      "codebook_zeros_ratio": 1.0 - used.mean(),
  }


class L2Quantizer(nn.Module):
  """Codebook `embedding` (K, e); `__call__(z (..., e)) -> dict`."""
  codebook_size: int = 16384
  code_dim: int = 12
  commit_beta: float = 0.25
  entropy_weight: float = 0.0
  entropy_temperature: float = 0.01

  def setup(self):
    k = self.codebook_size

    def init(key, shape, dtype=jnp.float32):
      return l2_normalize(jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k))
    self.embedding = self.param("embedding", layers.logical(init, ("codebook", "code_dim")),
                                (k, self.code_dim), jnp.float32)

  def codebook(self) -> jax.Array:
    """(K, e) normalised codebook."""
    return l2_normalize(self.embedding)

  def lookup(self, indices: jax.Array) -> jax.Array:
    """indices (...) -> normalised codes (..., e)."""
    return jnp.take(self.codebook(), indices, axis=0)

  def __call__(self, z: jax.Array) -> dict[str, jax.Array]:
    """Quantises z.

    Args:
      z: (..., e) pre-quantisation vectors (any dtype; computed in float32).

    Returns:
      dict with "quant" (straight-through value, (..., e) f32), "indices" (...) int32,
      "vq_loss", "commit_loss", "entropy_loss" (scalars, commit already times beta) and
      codebook statistics.
    """
    zn = l2_normalize(z.astype(jnp.float32))
    codebook = self.codebook()
    flat = zn.reshape(-1, self.code_dim)
    dist = (jnp.sum(jnp.square(flat), -1, keepdims=True) + jnp.sum(jnp.square(codebook), -1)[None]
            - 2.0 * jnp.matmul(flat, codebook.T, precision="highest"))
    indices = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    zq = jnp.take(codebook, indices, axis=0).reshape(zn.shape)
    indices = indices.reshape(zn.shape[:-1])
    out = {
        "vq_loss": jnp.mean(jnp.square(zq - jax.lax.stop_gradient(zn))),
        "commit_loss": self.commit_beta * jnp.mean(jnp.square(jax.lax.stop_gradient(zq) - zn)),
        "quant": zn + jax.lax.stop_gradient(zq - zn),
        "indices": indices,
    }
    if self.entropy_weight > 0:
      logits = -dist / self.entropy_temperature
      probs = jax.nn.softmax(logits, axis=-1)
      sample_entropy = -jnp.mean(jnp.sum(probs * jax.nn.log_softmax(logits, axis=-1), -1))
      avg = probs.mean(0)
      avg_entropy = -jnp.sum(avg * jnp.log(avg + 1e-5))
      out["entropy_loss"] = self.entropy_weight * (sample_entropy - avg_entropy)
    else:
      out["entropy_loss"] = jnp.zeros((), jnp.float32)
    out.update(codebook_stats(indices, self.codebook_size))
    return out
