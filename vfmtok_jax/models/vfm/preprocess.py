"""The reference's VFM input path: images in [-1, 1] -> VFM resize -> [0, 1] -> mean/std.

The official VFMTok resizes with kornia (bicubic, align_corners=True, antialias) to 336 px,
clamps to [-1, 1], maps to [0, 1] and normalises with the ImageNet statistics. The resize is
an explicit choice here:
  "kornia_bicubic"   exactly the reference (no-op when the size already matches);
  "jax_bicubic"      `jax.image.resize(..., "cubic", antialias=True)`, a plain resize;
  "torch_bicubic", "torch_bicubic_antialias"  F.interpolate equivalents;
  "none"             no resize (the input must already have the requested size).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vfmtok_jax.ops import resize as resize_ops

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

RESIZE_MODES = ("kornia_bicubic", "jax_bicubic", "torch_bicubic", "torch_bicubic_antialias",
                "none")


def resize_images(images: jax.Array, size: Sequence[int], mode: str) -> jax.Array:
  """Resizes (B, H, W, C) images to `size` = (h, w) with a named mode (see module doc)."""
  size = tuple(int(s) for s in size)
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown VFM resize mode {mode!r}; expected one of {RESIZE_MODES}")
  if images.shape[1:3] == size:
    return images
  if mode == "none":
    raise ValueError(f"VFM resize mode 'none' but images are {images.shape[1:3]}, "
                     f"VFM input size is {size}")
  if mode == "jax_bicubic":
    return jax.image.resize(images, (images.shape[0],) + size + images.shape[3:], "cubic",
                            antialias=True)
  return resize_ops.resize(images, size, mode)


def vfm_input(images: jax.Array, *, size: Sequence[int] | None, resize: str,
              mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1] -> normalised VFM input (B, h, w, 3), float32.

  Args:
    images: pixels in [-1, 1].
    size: (h, w) the VFM sees, or None to keep the input size.
    resize: a mode from RESIZE_MODES.
    mean, std: per-channel statistics applied to [0, 1] pixels.
  """
  x = images.astype(jnp.float32)
  if size is not None:
    x = resize_images(x, size, resize)
  x = (jnp.clip(x, -1.0, 1.0) + 1.0) / 2.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
