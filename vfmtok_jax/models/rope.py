"""2D rotary position embedding of LlamaGen's class-conditional GPT.

Table layout (`rope_2d_table`): row s is sequence position s. The first `num_prefix` rows
(the class token) are all zero, so RoPE multiplies that token's q and k to zero (a LlamaGen
quirk the released checkpoints were trained with). Image token n = grid * r + c sits at row
n + num_prefix; its head_dim / 2 angles are `[r f_0 .. r f_{q-1}, c f_0 .. c f_{q-1}]` with
`f_k = base ** (-4 k / head_dim)` and q = head_dim / 4. Rotation pairs are interleaved
(x[2i], x[2i+1]), the Meta-LLaMA convention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_2d_table(num_tokens: int, head_dim: int, *, base: float = 10000.0,
                  num_prefix: int = 1) -> np.ndarray:
  """(num_prefix + num_tokens, head_dim // 2, 2) float32 (cos, sin); `num_tokens` a square."""
  grid = math.isqrt(num_tokens)
  if grid * grid != num_tokens:
    raise ValueError(f"2D RoPE needs a square token grid; {num_tokens} tokens is not a square")
  if head_dim % 4:
    raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
  quarter = head_dim // 4
  freqs = 1.0 / (base ** (np.arange(0, head_dim // 2, 2, dtype=np.float32)[:quarter]
                          / np.float32(head_dim // 2)))
  per_axis = np.outer(np.arange(grid, dtype=np.float32), freqs).astype(np.float32)  # (g, q)
  rows = np.broadcast_to(per_axis[:, None, :], (grid, grid, quarter))
  cols = np.broadcast_to(per_axis[None, :, :], (grid, grid, quarter))
  angles = np.concatenate([rows, cols], axis=-1).reshape(num_tokens, head_dim // 2)
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)
  return np.concatenate([np.zeros((num_prefix, head_dim // 2, 2), np.float32), table])


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
  """Rotates interleaved pairs of `x` (B, S, H, D) by `table` (S, D // 2, 2), in float32.

  Returns `x`'s dtype.
  """
  b, s, h, d = x.shape
  pairs = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
  cos = table[None, :, None, :, 0]
  sin = table[None, :, None, :, 1]
  even, odd = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.reshape(b, s, h, d).astype(x.dtype)
