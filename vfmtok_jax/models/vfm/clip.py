"""CLIP vision tower (transformers' `CLIPVisionModel`) as a frozen multi-level feature extractor.

Reference: transformers `modeling_clip.py` (`CLIPVisionEmbeddings`, `CLIPEncoderLayer`,
`CLIPVisionModel`). Sequence layout: [cls, patches...]. The patch conv has no bias; the cls
token and the patches get a learned position table (1 + G*G, D); `pre_layrnorm` is applied to
the embedded sequence before the encoder; layers are pre-norm with separate q/k/v/out
projections (fused into `qkv` here), no LayerScale, `hidden_act` (quick_gelu for OpenAI CLIP).

"Final norm": HF's `last_hidden_state` is the raw output of the last layer; `post_layernorm`
is applied only to the pooled cls token (`pooler_output`). So every level here, the last one
included, is a raw residual-stream block output (patch tokens, cls stripped), and the
post-layernormed cls is returned separately as "pooled".
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers
from vfmtok_jax.models.vfm import dinov2
from vfmtok_jax.models.vfm import vit_blocks
from vfmtok_jax.ops import resize as resize_ops

Dtype = Any


def interpolate_pos_table(patch_pos: jax.Array, grid: int, grid_hw: tuple[int, int]) -> jax.Array:
  """Resizes a (G*G, D) patch position table to (h*w, D) for the (h, w) patch grid.

  Same as transformers' `interpolate_pos_encoding` of CLIP/SigLIP: `F.interpolate(size=(h, w),
  mode="bicubic", align_corners=False)` without antialias, in float32. Identity at (G, G).
  """
  if tuple(grid_hw) == (grid, grid):
    return patch_pos
  d = patch_pos.shape[-1]
  rows, cols = resize_ops.resize_matrices((grid, grid), tuple(grid_hw), "torch_bicubic")
  table = resize_ops.apply_hw(patch_pos.reshape(grid, grid, d).astype(jnp.float32), rows, cols)
  return table.reshape(grid_hw[0] * grid_hw[1], d)


def check_levels(levels: Sequence[int] | None, depth: int, name: str) -> tuple[int, ...]:
  """Validates block indices; None -> `dinov2.default_levels(depth)`."""
  levels = tuple(dinov2.default_levels(depth) if levels is None else levels)
  for level in levels:
    if not 0 <= level < depth:
      raise ValueError(f"level {level} out of range for a {depth}-block {name}")
  return levels


class CLIPVision(nn.Module):
  """CLIP ViT vision tower. Input: normalised images (B, H, W, C). See `__call__` for outputs."""
  embed_dim: int = 1024
  depth: int = 24
  num_heads: int = 16
  mlp_hidden: int = 4096
  patch_size: int = 14
  image_size: int = 224           # native resolution: the position table is (image/patch)^2 + 1
  hidden_act: str = "quick_gelu"
  ln_eps: float = 1e-5
  num_channels: int = 3
  dtype: Dtype = jnp.float32

  @property
  def pos_grid(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, levels: Sequence[int] | None = None) -> dict:
    """Runs the tower.

    Args:
      images: (B, H, W, C) normalised pixels; H, W need not be the native size nor equal (the
        position table is interpolated as HF's `interpolate_pos_encoding=True`); rows/columns
        beyond a multiple of the patch size are dropped, as the strided conv does.
      levels: 0-based block indices whose outputs to return. Every level, depth-1 included, is
        the raw residual stream (CLIP has no final norm over the patch tokens). Default: the
        last block of each quarter of the depth.

    Returns:
      dict with
        "levels": tuple of (B, h*w, D) patch-token features, one per requested level;
        "last_hidden_state": (B, 1+h*w, D) raw last-layer output (= HF last_hidden_state);
        "pooled": (B, D) post_layernorm(cls) (= HF pooler_output);
        "grid": (h, w) patch grid.
    """
    levels = check_levels(levels, self.depth, "CLIP")
    d, g = self.embed_dim, self.pos_grid
    x = vit_blocks.PatchEmbed(d, self.patch_size, use_bias=False, dtype=self.dtype,
                              name="patch_embed")(images)
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, d)
    cls = self.param("class_embedding", layers.logical(nn.initializers.normal(d ** -0.5),
                                                       ("embed",)), (d,), jnp.float32)
    pos = self.param("position_embedding", layers.logical(nn.initializers.normal(0.02),
                                                          (None, "embed")),
                     (1 + g * g, d), jnp.float32)
    pos = jnp.concatenate([pos[:1], interpolate_pos_table(pos[1:], g, (h, w))], axis=0)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
    x = x + pos[None].astype(x.dtype)
    x = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="pre_norm")(x)
    outputs = {}
    for i in range(self.depth):
      x = vit_blocks.PreNormBlock(self.num_heads, self.mlp_hidden, ffn="mlp", act=self.hidden_act,
                                  layerscale=False, ln_eps=self.ln_eps, dtype=self.dtype,
                                  name=f"blocks_{i}")(x)
      if i in levels:
        outputs[i] = x[:, 1:]
    pooled = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="post_norm")(x[:, 0])
    return {
        "levels": tuple(outputs[level] for level in levels),
        "last_hidden_state": x,
        "pooled": pooled,
        "grid": (h, w),
    }
