"""The ADM evaluator's metrics on Inception features: FID, sFID, IS, improved precision/recall.

Formulas as `guided-diffusion/evaluations/evaluator.py` computes them:
  * statistics: mean and `np.cov(rowvar=False)` (N - 1 normalisation) in float64;
  * Frechet distance: |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)); when the square
    root is not finite, 1e-6 is added to both diagonals and it is taken again; an imaginary part
    is dropped when the diagonal's is within 1e-3 of 0, else ValueError;
  * Inception Score: softmax of the no-bias logits, splits of 5,000 in order, per split
    exp(mean KL(p(y|x) || p(y))), the mean over splits;
  * precision / recall (k = 3): squared euclidean distances, computed in float16 with a float32
    fallback for a block that overflows (ADM's `DistanceBlock`); a point's radius is its
    distance to its 4th nearest point of its own set (itself included, so the 3rd other one);
    precision = the fraction of samples inside some reference point's ball, recall = the
    fraction of references inside some sample's ball (`<=` the radius).

The float16 distances follow ADM on a GPU: features rounded to float16, norms and the matmul
accumulated in float32 then rounded to float16, and `|u|^2 - 2 u.v + |v|^2` in float16
arithmetic. Distances run in jitted blocks (`block` rows x `block` columns).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

NHOOD = 3
IS_SPLIT = 5000
FID_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class Statistics:
  """Mean (D,) and covariance (D, D) of a feature set (float64)."""
  mu: np.ndarray
  sigma: np.ndarray


def statistics(features: np.ndarray) -> Statistics:
  features = np.asarray(features, np.float64)
  if features.ndim != 2 or len(features) < 2:
    raise ValueError(f"statistics need (N >= 2, D) features, got shape {features.shape}")
  return Statistics(features.mean(0), np.cov(features, rowvar=False))


def frechet_distance(a: Statistics, b: Statistics, eps: float = FID_EPS) -> float:
  mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
  s1, s2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
  if mu1.shape != mu2.shape or s1.shape != s2.shape:
    raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {s1.shape} vs {s2.shape}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(s1.dot(s2))
  if not np.isfinite(covmean).all():
    warnings.warn(f"the covariance product is singular; adding {eps} to their diagonals")
    offset = np.eye(s1.shape[0]) * eps
    covmean = linalg.sqrtm((s1 + offset).dot(s2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def softmax(logits: np.ndarray) -> np.ndarray:
  """float32 softmax of (N, C) logits (ADM runs `tf.nn.softmax` in float32)."""
  return np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
  """ADM's IS from the no-bias logits (N, 1008): splits of `split_size` in order."""
  preds = softmax(logits)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


@jax.jit
def _distances16(u, v):
  u = u.astype(jnp.float16)
  v = v.astype(jnp.float16)
  f32 = jnp.float32
  nu = jnp.sum(jnp.square(u.astype(f32)), 1).astype(jnp.float16)[:, None]
  nv = jnp.sum(jnp.square(v.astype(f32)), 1).astype(jnp.float16)[None, :]
  uv = jnp.dot(u, v.T, preferred_element_type=f32,
               precision=jax.lax.Precision.HIGHEST).astype(jnp.float16)
  return jnp.maximum(nu - 2 * uv + nv, jnp.float16(0))


@jax.jit
def _distances32(u, v):
  nu = jnp.sum(jnp.square(u), 1)[:, None]
  nv = jnp.sum(jnp.square(v), 1)[None, :]
  uv = jnp.dot(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu - 2 * uv + nv, 0.0)


def pairwise_distances(u: np.ndarray, v: np.ndarray, *, float16: bool = True) -> np.ndarray:
  """(N, M) float32 squared distances, float16 unless a value overflows (ADM)."""
  u = jnp.asarray(u, jnp.float32)
  v = jnp.asarray(v, jnp.float32)
  if float16:
    d = _distances16(u, v)
    if bool(jnp.isfinite(d).all()):
      return np.asarray(d.astype(jnp.float32))
  return np.asarray(_distances32(u, v))


def manifold_radii(features: np.ndarray, *, k: int = NHOOD, block: int = 10000,
                   float16: bool = True) -> np.ndarray:
  """(N,) distance of each point to its k-th nearest other point (the (k+1)-th with itself)."""
  n = len(features)
  radii = np.zeros(n, np.float32)
  for r in range(0, n, block):
    rows = np.concatenate([pairwise_distances(features[r:r + block], features[c:c + block],
                                              float16=float16)
                           for c in range(0, n, block)], axis=1)
    radii[r:r + block] = np.partition(rows, k, axis=1)[:, k]
  return radii


def precision_recall(ref: np.ndarray, samples: np.ndarray, *, k: int = NHOOD,
                     block: int = 10000, float16: bool = True) -> tuple[float, float]:
  """ADM's improved precision and recall of `samples` (N2, D) against `ref` (N1, D)."""
  if len(ref) <= k or len(samples) <= k:
    raise ValueError(f"precision/recall with k={k} need more than {k} reference and sample "
                     f"features, got {len(ref)} and {len(samples)}")
  ref_radii = manifold_radii(ref, k=k, block=block, float16=float16)
  sample_radii = manifold_radii(samples, k=k, block=block, float16=float16)
  ref_in = np.zeros(len(ref), bool)          # inside some sample's ball (recall)
  sample_in = np.zeros(len(samples), bool)   # inside some reference ball (precision)
  for r in range(0, len(ref), block):
    for c in range(0, len(samples), block):
      d = pairwise_distances(ref[r:r + block], samples[c:c + block], float16=float16)
      ref_in[r:r + block] |= (d <= sample_radii[None, c:c + block]).any(1)
      sample_in[c:c + block] |= (d <= ref_radii[r:r + block, None]).any(0)
  return float(sample_in.mean()), float(ref_in.mean())
