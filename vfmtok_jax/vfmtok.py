"""The public tokenizer object: frozen VFM + trainable `VFMTokenizer`, with jitted entry points.

  tok = VFMTok(vfm, model, params, vfm_levels=..., vfm_size=..., vfm_resize=...)
  indices = tok.encode(images)                # (B, H, W, 3) in [-1, 1] -> (B, n) int32
  out = tok.encode(images, return_tokens=True)  # + "quant" (B, n, e), "slots" (B, n, dim)
  images = tok.decode_indices(indices)        # -> (B, H', W', 3), about [-1, 1]
  out = tok.forward(params, vfm_params, images, rng=rng, train=True)  # training forward

The VFM params are a separate argument everywhere (never closed over, never differentiated).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from vfmtok_jax import vfm_zoo
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.models.vfm import preprocess


def vfm_features(vfm_module, vfm_params, images: jax.Array, *, levels: Sequence[int],
                 size: Sequence[int] | None, resize: str, mean, std) -> dict:
  """Images (B, H, W, 3) in [-1, 1] -> frozen multi-level features (no gradient).

  Returns dict(levels=list of (B, h*w, C), grids=[(h, w)] * L, target=(B, h*w, C) final
  normed features = the semantic target).
  """
  x = preprocess.vfm_input(images, size=size, resize=resize, mean=mean, std=std)
  out = vfm_module.apply({"params": vfm_params}, x, levels=tuple(levels))
  feats = [jax.lax.stop_gradient(f) for f in out["levels"]]
  return {"levels": feats, "grids": [tuple(out["grid"])] * len(feats), "target": feats[-1]}


@dataclasses.dataclass
class VFMTok:
  """A frozen VFM and a trained tokenizer (see module docstring)."""
  vfm: vfm_zoo.VFM
  model: tokenizer_lib.VFMTokenizer
  params: Any
  vfm_levels: tuple[int, ...]
  vfm_size: tuple[int, int] | None = None
  vfm_resize: str = "kornia_bicubic"

  def __post_init__(self):
    self.vfm_levels = tuple(self.vfm_levels)
    if len(self.vfm_levels) != self.model.num_levels:
      raise ValueError(f"the tokenizer reads {self.model.num_levels} VFM levels, "
                       f"vfm_levels has {len(self.vfm_levels)}")
    if self.vfm.width != self.model.vfm_width:
      raise ValueError(f"the tokenizer expects a VFM of width {self.model.vfm_width}, "
                       f"{self.vfm.source or self.vfm.kind} has width {self.vfm.width}")

  def features(self, vfm_params, images) -> dict:
    return vfm_features(self.vfm.module, vfm_params, images, levels=self.vfm_levels,
                        size=self.vfm_size, resize=self.vfm_resize, mean=self.vfm.mean,
                        std=self.vfm.std)

  @functools.cached_property
  def _encode(self):
    def fn(params, vfm_params, images):
      f = self.features(vfm_params, images)
      return self.model.apply({"params": params}, f["levels"], f["grids"],
                              method=tokenizer_lib.VFMTokenizer.encode)
    return jax.jit(fn)

  @functools.cached_property
  def _decode(self):
    return jax.jit(lambda params, idx: self.model.apply(
        {"params": params}, idx, method=tokenizer_lib.VFMTokenizer.decode_indices))

  def encode(self, images, *, return_tokens: bool = False):
    """(B, H, W, 3) in [-1, 1] -> indices (B, n); with return_tokens a dict with
    "indices", "quant" (normalised codes, (B, n, e)) and "slots" (B, n, dim)."""
    out = self._encode(self.params, self.vfm.params, jnp.asarray(images, jnp.float32))
    if return_tokens:
      return {k: out[k] for k in ("indices", "quant", "slots")}
    return out["indices"]

  def decode_indices(self, indices) -> jax.Array:
    """(B, n) code indices -> (B, H, W, 3) images in about [-1, 1]."""
    indices = jnp.asarray(indices, jnp.int32)
    if indices.ndim != 2 or indices.shape[1] != self.model.num_queries:
      raise ValueError(f"expected indices of shape (B, {self.model.num_queries}), "
                       f"got {indices.shape}")
    if int(indices.min()) < 0 or int(indices.max()) >= self.model.codebook_size:
      raise ValueError(f"indices must lie in [0, {self.model.codebook_size})")
    return self._decode(self.params, indices)

  def forward(self, params, vfm_params, images, *, rng=None, train: bool = True,
              semantic: bool = True) -> dict:
    """Training forward (not jitted here: called inside the train step)."""
    f = self.features(vfm_params, images)
    rngs = {"dropout": rng} if rng is not None else {}
    out = self.model.apply({"params": params}, f["levels"], f["grids"], train=train,
                           semantic=semantic, rngs=rngs)
    out["vfm_target"] = f["target"]
    return out
