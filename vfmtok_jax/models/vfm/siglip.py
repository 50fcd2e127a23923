"""SigLIP vision tower (transformers' `SiglipVisionModel`) as a frozen multi-level extractor.

Reference: transformers `modeling_siglip.py` (`SiglipVisionEmbeddings`, `SiglipEncoderLayer`,
`SiglipVisionModel`, `SiglipMultiheadAttentionPoolingHead`). No cls token: the sequence is
the patches, each with a learned position (G*G, D). The patch conv has a bias; layers are
pre-norm with separate q/k/v/out projections (fused into `qkv` here), `hidden_act`
(gelu_pytorch_tanh), and `post_layernorm` is applied to every token: that is HF's
`last_hidden_state`, and level depth-1 here. The optional attention-pooling head
(`vision_use_head`) gives HF's `pooler_output` as "pooled".
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers
from vfmtok_jax.models.vfm import clip
from vfmtok_jax.models.vfm import vit_blocks

Dtype = Any


class AttentionPoolingHead(nn.Module):
  """SigLIP MAP head: a learned probe attends over the tokens, then `x + mlp(norm(x))`.

  `q` / `kv` / `proj` are torch `nn.MultiheadAttention`'s `in_proj` (split q | k,v) and
  `out_proj`. Input (B, N, D) -> (B, D).
  """
  num_heads: int
  mlp_hidden: int
  hidden_act: str = "gelu_pytorch_tanh"
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    hd = d // self.num_heads
    probe = self.param("probe", layers.logical(nn.initializers.normal(0.02),
                                               (None, None, "embed")), (1, 1, d), jnp.float32)
    q = layers.Dense(d, kernel_axes=("embed", "qkv"), dtype=self.dtype, name="q")(
        jnp.broadcast_to(probe.astype(x.dtype), (b, 1, d)))
    kv = layers.Dense(2 * d, kernel_axes=("embed", "qkv"), dtype=self.dtype, name="kv")(x)
    kv = kv.reshape(b, n, 2, self.num_heads, hd)
    out = layers.dot_product_attention(q.reshape(b, 1, self.num_heads, hd), kv[:, :, 0],
                                       kv[:, :, 1], dtype=self.dtype)
    out = layers.Dense(d, kernel_axes=("heads_merged", "embed"), dtype=self.dtype,
                       name="proj")(out.reshape(b, 1, d))
    h = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="norm")(out)
    out = out + vit_blocks.Mlp(self.mlp_hidden, act=self.hidden_act, dtype=self.dtype,
                               name="mlp")(h)
    return out[:, 0]


class SiglipVision(nn.Module):
  """SigLIP ViT vision tower. Input: normalised images (B, H, W, C). See `__call__`."""
  embed_dim: int = 1152
  depth: int = 27
  num_heads: int = 16
  mlp_hidden: int = 4304
  patch_size: int = 14
  image_size: int = 384           # native resolution: the position table is (image/patch)^2
  hidden_act: str = "gelu_pytorch_tanh"
  ln_eps: float = 1e-6
  num_channels: int = 3
  use_head: bool = True           # HF `vision_use_head`
  dtype: Dtype = jnp.float32

  @property
  def pos_grid(self) -> int:
    return self.image_size // self.patch_size

  @nn.compact
  def __call__(self, images: jax.Array, levels: Sequence[int] | None = None) -> dict:
    """Runs the tower.

    Args:
      images: (B, H, W, C) normalised pixels; any size (the position table is interpolated
        as HF's `interpolate_pos_encoding=True`), extra rows/columns beyond a multiple of the
        patch size are dropped.
      levels: 0-based block indices whose outputs to return. Level depth-1 is the
        post_layernorm output; others are the raw residual stream. Default: the last block of
        each quarter of the depth (needs depth % 4 == 0; so400m's 27 blocks need explicit
        levels).

    Returns:
      dict with
        "levels": tuple of (B, h*w, D) features, one per requested level;
        "last_hidden_state": (B, h*w, D) post_layernorm output (= HF last_hidden_state);
        "pooled": (B, D) attention-pooling head output (only when `use_head`);
        "grid": (h, w) patch grid.
    """
    levels = clip.check_levels(levels, self.depth, "SigLIP")
    d, g = self.embed_dim, self.pos_grid
    x = vit_blocks.PatchEmbed(d, self.patch_size, use_bias=True, dtype=self.dtype,
                              name="patch_embed")(images)
    b, h, w, _ = x.shape
    x = x.reshape(b, h * w, d)
    pos = self.param("position_embedding", layers.logical(nn.initializers.normal(d ** -0.5),
                                                          (None, "embed")),
                     (g * g, d), jnp.float32)
    x = x + clip.interpolate_pos_table(pos, g, (h, w))[None].astype(x.dtype)
    outputs = {}
    for i in range(self.depth):
      x = vit_blocks.PreNormBlock(self.num_heads, self.mlp_hidden, ffn="mlp", act=self.hidden_act,
                                  layerscale=False, ln_eps=self.ln_eps, dtype=self.dtype,
                                  name=f"blocks_{i}")(x)
      if i in levels and i != self.depth - 1:
        outputs[i] = x
    final = layers.LayerNorm(self.ln_eps, dtype=self.dtype, name="post_norm")(x)
    outputs[self.depth - 1] = final
    out = {
        "levels": tuple(outputs[level] for level in levels),
        "last_hidden_state": final,
        "grid": (h, w),
    }
    if self.use_head:
      out["pooled"] = AttentionPoolingHead(self.num_heads, self.mlp_hidden, self.hidden_act,
                                           self.ln_eps, dtype=self.dtype, name="head")(final)
    return out
