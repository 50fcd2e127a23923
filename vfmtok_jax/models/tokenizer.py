"""VFMTok's trainable part: region encoder -> L2 VQ -> ViT decoder -> conv pixel decoder.

Submodule names follow the reference state dict (`encode_transformer`, `pre_slots_quant`,
`slot_quantize`, `post_slots_quant`, `decode_transformer`, `decoder`), so the key map
(`weights.tokenizer`) is a rename. The frozen VFM is not part of this module: its features are
inputs.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.models import layers
from vfmtok_jax.models import pixel_decoder
from vfmtok_jax.models import quantizer
from vfmtok_jax.models import region_encoder
from vfmtok_jax.models import vit_decoder

Dtype = Any


class VFMTokenizer(nn.Module):
  """Takes VFM level features, returns codes / reconstructions. All sizes are fields."""
  # Region encoder.
  vfm_width: int = 1024
  num_levels: int = 4
  dim: int = 512
  encoder_depth: int = 6
  num_queries: int = 256
  encoder_heads: int = 8
  encoder_points: int = 4
  encoder_ffn_dim: int = 1024
  encoder_self_attn_heads: int = 8
  # Quantizer.
  codebook_size: int = 16384
  code_dim: int = 12
  commit_beta: float = 0.25
  entropy_weight: float = 0.0
  # ViT decoder.
  decoder_depth: int = 6
  decoder_heads: int = 8
  decoder_mlp_dim: int = 2048
  decoder_grid: int = 21
  decoder_pos_table: int = 24
  semantic_dim: int = 1024
  num_registers: int = 4
  attn_dropout: float = 0.0
  # Conv pixel decoder.
  pixel_ch: int = 128
  pixel_ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  pixel_num_res_blocks: int = 1
  dtype: Dtype = jnp.float32

  def setup(self):
    self.encode_transformer = region_encoder.RegionEncoder(
        self.dim, self.encoder_depth, self.num_queries, self.num_levels, self.encoder_heads,
        self.encoder_points, self.encoder_ffn_dim, self.encoder_self_attn_heads, dtype=self.dtype)
    dense = dict(kernel_init=layers.torch_default_kernel_init, dtype=jnp.float32)
    self.pre_slots_quant = layers.Dense(self.code_dim, kernel_axes=("embed", "code_dim"), **dense)
    self.slot_quantize = quantizer.L2Quantizer(self.codebook_size, self.code_dim,
                                               self.commit_beta, self.entropy_weight)
    self.post_slots_quant = layers.Dense(self.dim, kernel_axes=("code_dim", "embed"), **dense)
    self.decode_transformer = vit_decoder.ViTDecoder(
        self.dim, self.decoder_depth, self.decoder_heads, self.decoder_mlp_dim, self.num_queries,
        self.decoder_grid, self.decoder_pos_table, self.semantic_dim, self.num_registers,
        self.attn_dropout, dtype=self.dtype)
    self.decoder = pixel_decoder.PixelDecoder(self.pixel_ch, tuple(self.pixel_ch_mult),
                                              self.pixel_num_res_blocks, dtype=self.dtype)

  @property
  def image_size(self) -> int:
    """Output resolution: decoder grid times the pixel decoder's upsampling."""
    return self.decoder_grid * 2 ** (len(self.pixel_ch_mult) - 1)

  def encode(self, features: Sequence[jax.Array], grids) -> dict[str, jax.Array]:
    """VFM levels -> dict(slots (B,n,dim), z (B,n,e), quant (B,n,e) straight-through,
    indices (B,n), vq/commit/entropy losses, codebook statistics)."""
    slots = self.encode_transformer(features, grids)
    z = self.pre_slots_quant(slots.astype(jnp.float32))
    out = self.slot_quantize(z)
    out["slots"] = slots
    out["z"] = z
    return out

  def decode(self, codes: jax.Array, *, semantic: bool = False,
             deterministic: bool = True) -> dict[str, jax.Array]:
    """Normalised codes (B, n, e) -> dict(recon (B,H,W,3), pixel_features, [semantic])."""
    post = self.post_slots_quant(codes.astype(jnp.float32)).astype(self.dtype)
    out = self.decode_transformer(post, semantic=semantic, deterministic=deterministic)
    out["post_quant"] = post
    out["recon"] = self.decoder(out["pixel_features"]).astype(jnp.float32)
    return out

  def decode_indices(self, indices: jax.Array) -> jax.Array:
    """Code indices (B, n) -> images (B, H, W, 3) in about [-1, 1]."""
    return self.decode(self.slot_quantize.lookup(indices))["recon"]

  def __call__(self, features: Sequence[jax.Array], grids, *, train: bool = True,
               semantic: bool = True) -> dict[str, jax.Array]:
    """Training forward: encode, quantise (straight-through), decode (and the semantic branch).

    Returns the union of `encode` and `decode` outputs; "recon" is decoded from the
    straight-through codes (gradients reach the encoder), "semantic" is (B, T*T, semantic_dim).
    """
    enc = self.encode(features, grids)
    dec = self.decode(enc["quant"], semantic=semantic, deterministic=not train)
    return {**enc, **dec}
