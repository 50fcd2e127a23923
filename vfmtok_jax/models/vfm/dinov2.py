"""DINOv2 ViT (with or without register tokens) as a frozen multi-level feature extractor.

Reference: facebookresearch/dinov2 `vision_transformer.py` (the layout the official VFMTok uses)
and transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (same math, separate q/k/v).
Sequence layout: [cls, registers..., patches...]; registers get no position embedding.
Blocks are pre-norm with LayerScale, exact-erf GELU (or fused SwiGLU for ViT-g), LN eps 1e-6.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers
from vfmtok_jax.models.vfm import vit_blocks
from vfmtok_jax.ops import resize as resize_ops

Dtype = Any

# Published DINOv2 shapes: (embed_dim, depth, heads, ffn).
VARIANTS = {
    "S": (384, 12, 6, "mlp"),
    "B": (768, 12, 12, "mlp"),
    "L": (1024, 24, 16, "mlp"),
    "g": (1536, 40, 24, "swiglu"),
}


def default_levels(depth: int) -> tuple[int, ...]:
  """Last block of each quarter: [d/4-1, d/2-1, 3d/4-1, d-1] ([5, 11, 17, 23] for ViT-L).

  For a depth not divisible by 4 the quarter ends are floored (depth 6 -> [0, 2, 3, 5]).
  """
  if depth < 4:
    raise ValueError(f"the default level rule needs at least 4 blocks, got {depth}")
  return tuple(k * depth // 4 - 1 for k in range(1, 5))


def swiglu_hidden(embed_dim: int, mlp_ratio: float = 4.0) -> int:
  """DINOv2/transformers SwiGLU hidden width: round(2/3 * ratio * dim) up to a multiple of 8."""
  return (int(int(embed_dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class DinoV2(nn.Module):
  """DINOv2 ViT/14. Input: normalised images (B, H, W, 3). See `__call__` for outputs."""
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  patch_size: int = 14
  mlp_ratio: float = 4.0
  ffn: str = "mlp"                # "mlp" (exact GELU) or "swiglu" (ViT-g)
  num_register_tokens: int = 0
  pos_grid: int = 37              # learned table side (518 / 14)
  layerscale: bool = True
  ln_eps: float = 1e-6
  # How the learned table is resized to another patch grid, always `size=(h, w)`, bicubic:
  # antialiased (official DINOv2 with interpolate_offset=0, as VFMTok runs it, and
  # transformers' Dinov2WithRegistersModel) or not (transformers' Dinov2Model).
  pos_interp_antialias: bool = True
  dtype: Dtype = jnp.float32

  @property
  def mlp_hidden(self) -> int:
    if self.ffn == "swiglu":
      return swiglu_hidden(self.embed_dim, self.mlp_ratio)
    return int(self.embed_dim * self.mlp_ratio)

  def _pos_embed(self, table: jax.Array, grid_hw: tuple[int, int]) -> jax.Array:
    """(1, 1+G*G, D) learned table -> (1, 1+h*w, D) for the (h, w) patch grid."""
    g = self.pos_grid
    if grid_hw == (g, g):
      return table
    cls_pos, patch_pos = table[:, :1], table[:, 1:].reshape(1, g, g, -1)
    method = "torch_bicubic_antialias" if self.pos_interp_antialias else "torch_bicubic"
    rows, cols = resize_ops.resize_matrices((g, g), grid_hw, method)
    patch_pos = resize_ops.apply_hw(patch_pos.astype(jnp.float32), rows, cols)
    return jnp.concatenate([cls_pos, patch_pos.reshape(1, -1, table.shape[-1])], axis=1)

  @nn.compact
  def __call__(self, images: jax.Array, levels: Sequence[int] | None = None) -> dict:
    """Runs the tower.

    Args:
      images: (B, H, W, 3) normalised pixels; H, W multiples of the patch size (extra rows
        and columns are dropped, as the strided conv does).
      levels: block indices whose outputs to return (0-based). A level equal to depth-1 is
        the final-LayerNorm output; others are the raw residual stream. Default: the last
        block of each quarter of the depth.

    Returns:
      dict with
        "levels": tuple of (B, h*w, D) patch-token features, one per requested level;
        "last_hidden_state": (B, 1+R+h*w, D) final-norm output of the whole sequence;
        "cls": (B, D) final-norm cls token;
        "grid": (h, w) patch grid.
    """
    levels = tuple(default_levels(self.depth) if levels is None else levels)
    for level in levels:
      if not 0 <= level < self.depth:
        raise ValueError(f"level {level} out of range for a {self.depth}-block DINOv2")
    d = self.embed_dim
    x = vit_blocks.PatchEmbed(d, self.patch_size, dtype=self.dtype, name="patch_embed")(images)
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, d)
    init = nn.initializers.normal(1e-6)
    cls_token = self.param("cls_token", layers.logical(init, (None, None, "embed")),
                           (1, 1, d), jnp.float32)
    pos_table = self.param("pos_embed", layers.logical(nn.initializers.normal(0.02),
                                                       (None, None, "embed")),
                           (1, 1 + self.pos_grid ** 2, d), jnp.float32)
    # Unused at inference; kept so official/HF checkpoints load with every key accounted for.
    self.param("mask_token", layers.logical(nn.initializers.zeros, (None, "embed")),
               (1, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = x + self._pos_embed(pos_table, (h, w)).astype(x.dtype)
    if self.num_register_tokens:
      reg = self.param("register_tokens", layers.logical(init, (None, None, "embed")),
                       (1, self.num_register_tokens, d), jnp.float32)
      x = jnp.concatenate([x[:, :1], jnp.broadcast_to(reg, (b,) + reg.shape[1:]).astype(x.dtype),
                           x[:, 1:]], axis=1)
    start = 1 + self.num_register_tokens
    norm = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="norm")
    outputs = {}
    for i in range(self.depth):
      x = vit_blocks.PreNormBlock(self.num_heads, self.mlp_hidden, ffn=self.ffn,
                                  layerscale=self.layerscale, ln_eps=self.ln_eps,
                                  dtype=self.dtype, name=f"blocks_{i}")(x)
      if i in levels and i != self.depth - 1:
        outputs[i] = x[:, start:]
    final = norm(x)
    outputs[self.depth - 1] = final[:, start:]
    return {
        "levels": tuple(outputs[level] for level in levels),
        "last_hidden_state": final,
        "cls": final[:, 0],
        "grid": (h, w),
    }


def dinov2(variant: str, *, registers: bool = False, **kwargs) -> DinoV2:
  """Builds a published DINOv2 shape: variant in S, B, L, g."""
  try:
    dim, depth, heads, ffn = VARIANTS[variant]
  except KeyError:
    raise ValueError(f"unknown DINOv2 variant {variant!r}; known: {sorted(VARIANTS)}") from None
  return DinoV2(embed_dim=dim, depth=depth, num_heads=heads, ffn=ffn,
                num_register_tokens=4 if registers else 0, **kwargs)
