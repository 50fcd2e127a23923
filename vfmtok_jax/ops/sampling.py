"""Next-token sampling from logits: temperature, top-k, nucleus (top-p), categorical draw.

Semantics follow the reference's `sample()` (LlamaGen `generate.py`): logits / max(T, 1e-5);
top-k keeps every logit >= the k-th largest; top-p (HF `top_k_top_p_filtering`) keeps the
smallest prefix of the sorted distribution whose mass exceeds p; the top token is always
kept; then softmax and a categorical draw. Filtering here keeps a logit when it is >= the cut-off
value, so tokens tied with the last kept one are kept too (HF keeps ties for top-k and breaks
them by sort order for top-p).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
  """Keep-mask (same shape) of the logits >= the k-th largest of each row; k <= 0: all."""
  if k <= 0 or k >= logits.shape[-1]:
    return jnp.ones(logits.shape, bool)
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return logits >= kth


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
  """Keep-mask of each row's nucleus: sorted tokens while the mass before them is <= p."""
  if p >= 1.0:
    return jnp.ones(logits.shape, bool)
  order = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(order.astype(jnp.float32), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = before <= p
  keep_sorted = keep_sorted.at[..., 0].set(True)
  # The smallest kept logit is the cut-off.
  cutoff = jnp.min(jnp.where(keep_sorted, order, jnp.inf), axis=-1, keepdims=True)
  return logits >= cutoff


def filter_logits(logits: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
  """(..., V) float32 logits scaled by the temperature with the filtered ones at -inf."""
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-5)
  # One materialised copy for the cut-offs and the comparisons: XLA may otherwise recompute
  # the scaled (and CFG-mixed) logits inside each fusion with different rounding, and a row's
  # top logit could fall below its own cut-off.
  logits = jax.lax.optimization_barrier(logits)
  top = jnp.argmax(logits, axis=-1)[..., None] == jnp.arange(logits.shape[-1])
  if top_k > 0:
    logits = jnp.where(top_k_mask(logits, top_k) | top, logits, NEG_INF)
  if top_p < 1.0:
    logits = jnp.where(top_p_mask(logits, top_p) | top, logits, NEG_INF)
  return logits


def inverse_cdf(weights: jax.Array, u: jax.Array) -> jax.Array:
  """(B,) int32: the first index whose running sum of `weights` (B, V) (>= 0, unnormalised)
  reaches `u` (B,) in (0, 1] times the row's total.

  Two levels instead of one cumsum over V (XLA:CPU's cumsum over a 16k vocabulary costs more
  than a small GPT's layer): the running sum over blocks of about sqrt(V) entries picks the
  block, a running sum inside it picks the entry. The index is clipped to the block's last
  positive entry, so rounding between the two levels never returns a zero-weight entry.
  """
  b, v = weights.shape
  block = max(1, math.isqrt(v - 1) + 1)
  nblocks = -(-v // block)
  blocks = jnp.pad(weights, ((0, 0), (0, nblocks * block - v))).reshape(b, nblocks, block)
  block_sums = blocks.sum(-1)
  block_cdf = jnp.cumsum(block_sums, -1)
  target = u * block_cdf[:, -1]
  nonzero = block_sums > 0
  last_block = jnp.max(jnp.where(nonzero, jnp.arange(nblocks), 0), -1)
  chosen = jnp.minimum(jnp.sum(block_cdf < target[:, None], -1), last_block)
  pick = lambda x: jnp.take_along_axis(x, chosen[:, None], 1)[:, 0]  # noqa: E731
  inner = jnp.take_along_axis(blocks, chosen[:, None, None], 1)[:, 0]        # (B, block)
  before = pick(block_cdf) - pick(block_sums)
  inner_cdf = before[:, None] + jnp.cumsum(inner, -1)
  last = jnp.max(jnp.where(inner > 0, jnp.arange(block), 0), -1)
  within = jnp.minimum(jnp.sum(inner_cdf < target[:, None], -1), last)
  return (chosen * block + within).astype(jnp.int32)


def sample_rows(keys: jax.Array, logits: jax.Array, *, temperature: float = 1.0,
                top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """(B,) int32 tokens, row b drawn with keys[b] from logits[b] (B, V).

  One key per row makes a row's draw independent of how the batch is split over devices. The
  draw inverts the CDF with one uniform number per row (as torch.multinomial does), instead of
  a Gumbel number per vocabulary entry: random bits for (B, V) per token cost more than the
  whole decode step of a small GPT on a CPU.
  """
  filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  weights = jnp.exp(filtered - jnp.max(filtered, -1, keepdims=True))  # the top token: 1
  u = jax.vmap(lambda k: jax.random.uniform(k, (), minval=jnp.finfo(jnp.float32).tiny))(keys)
  return inverse_cdf(weights, u)
