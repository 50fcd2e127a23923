"""Codebook health for an L2-normalised VQ codebook: data-driven init and dead-code restart.

Pure functions on arrays (any sharding; XLA inserts the reductions over a global batch):

  centroids = spherical_kmeans(points (N, e), k, iters, key)          # k-means init from data
  age = code_age(age (K,), indices (...), K)                          # steps since last use
  embedding, age, dead = restart_dead_codes(embedding, age, latents, window, noise, key)

Distances and means are float32. Codes are compared by cosine (the quantizer's distance on
normalised vectors is 2 - 2 cos), so k-means is the spherical variant: assign to the nearest
centroid, average, re-normalise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _normalize(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def nearest(points: jax.Array, centroids: jax.Array) -> jax.Array:
  """Index (N,) of the highest-cosine row of `centroids` (K, e) for each of `points` (N, e)."""
  sims = jnp.matmul(points, centroids.T, precision="highest")
  return jnp.argmax(sims, axis=-1).astype(jnp.int32)


def spherical_kmeans(points: jax.Array, k: int, iters: int, key: jax.Array) -> jax.Array:
  """`k` unit centroids (k, e) of unit `points` (N, e) after `iters` Lloyd iterations.

  Starts from `k` distinct points drawn at random (so N >= k); a centroid that loses all its
  points keeps its previous position.
  """
  points = _normalize(points.astype(jnp.float32))
  n = points.shape[0]
  if n < k:
    raise ValueError(f"k-means needs at least k={k} points, got {n}")
  start = jax.random.choice(key, n, (k,), replace=False)
  centroids = points[start]

  def lloyd(centroids, _):
    assign = nearest(points, centroids)
    sums = jax.ops.segment_sum(points, assign, num_segments=k)
    counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), assign, num_segments=k)
    moved = _normalize(sums)
    return jnp.where(counts[:, None] > 0, moved, centroids), None
  centroids, _ = jax.lax.scan(lloyd, centroids, None, length=iters)
  return centroids


def code_age(age: jax.Array, indices: jax.Array, codebook_size: int) -> jax.Array:
  """(K,) int32 steps since each code was last chosen: 0 where `indices` hit it, else +1."""
  counts = jnp.bincount(indices.reshape(-1), length=codebook_size)
  return jnp.where(counts > 0, 0, age + 1).astype(jnp.int32)


def restart_dead_codes(embedding: jax.Array, age: jax.Array, latents: jax.Array, window: int,
                       noise: float, key: jax.Array):
  """Re-seeds every code unused for `window` steps from this batch's encoder outputs.

  Args:
    embedding: (K, e) codebook parameter (normalised when looked up).
    age: (K,) steps since last use (`code_age` of this step).
    latents: (..., e) the batch's normalised pre-quantisation vectors (the global batch).
    window: a code is dead when `age >= window` (window >= 1).
    noise: standard deviation of the Gaussian added to each re-seeded code before it is
      re-normalised (so two codes seeded from one latent part).
    key: PRNG key (replicated: every device draws the same restarts).

  Returns:
    (embedding, age with the restarted codes at 0, (K,) bool mask of the restarted codes).
  """
  k, e = embedding.shape
  flat = latents.reshape(-1, e).astype(jnp.float32)
  pick_key, noise_key = jax.random.split(key)
  picks = jax.random.randint(pick_key, (k,), 0, flat.shape[0])
  seeds = _normalize(flat[picks] + noise * jax.random.normal(noise_key, (k, e), jnp.float32))
  dead = age >= window
  embedding = jnp.where(dead[:, None], seeds.astype(embedding.dtype), embedding)
  return embedding, jnp.where(dead, 0, age), dead
