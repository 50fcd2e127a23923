"""Image transforms of the reference (ADM crops, flip), numpy/PIL, deterministic given a Generator.

The reference trains with guided-diffusion's `random_crop_arr(img, S, 0.8, 1.0)` followed by a
p=0.5 horizontal flip, and evaluates with ADM `center_crop_arr(img, S)` (VFMTok
`vfmtok/data/augmentation.py`, `imagenet_lmdb.py`; spec section 1). Both crops work on uint8
(H, W, 3) arrays with PIL's BOX / BICUBIC filters, as the reference does; `train_transform` and
`eval_transform` add the `ToTensor + Normalize(0.5, 0.5)` step and return float32 in [-1, 1].

Python's `random.randrange` draws of the reference are replaced by draws from a numpy
Generator in the same order (short side s, then crop top, then crop left, then the flip).
"""

from __future__ import annotations

import math

import numpy as np

from vfmtok_jax.data import images

center_crop_arr = images.center_crop_arr  # uint8 (H, W, 3) -> (size, size, 3); the eval crop.


def crop_size_range(size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0) -> tuple[int, int]:
  """Inclusive range [ceil(size / max_crop_frac), ceil(size / min_crop_frac)] of the short side."""
  if not 0 < min_crop_frac <= max_crop_frac <= 1:
    raise ValueError(f"need 0 < min_crop_frac <= max_crop_frac <= 1, got "
                     f"{min_crop_frac}, {max_crop_frac}")
  return math.ceil(size / max_crop_frac), math.ceil(size / min_crop_frac)


def resize_short_side(rgb: np.ndarray, short: int) -> np.ndarray:
  """ADM resize: BOX-halve while the short side is >= 2*short, then BICUBIC to short side `short`.

  Args:
    rgb: uint8 (H, W, 3).
    short: target short side.

  Returns:
    uint8 (H', W', 3) with min(H', W') == short (the long side rounded with Python's `round`).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(np.asarray(rgb, np.uint8))
  while min(im.size) >= 2 * short:
    im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
  scale = short / min(im.size)
  im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
  return np.asarray(im, dtype=np.uint8)


def random_crop_arr(rgb: np.ndarray, size: int, rng: np.random.Generator,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0) -> np.ndarray:
  """ADM `random_crop_arr`: random-scale resize then a uniformly placed square crop.

  Draws the short side s uniformly from the integers [ceil(size / max_crop_frac),
  ceil(size / min_crop_frac)], resizes with `resize_short_side(rgb, s)` and takes a uniformly
  random size x size crop.

  Args:
    rgb: uint8 (H, W, 3).
    size: output side S.
    rng: numpy Generator (three draws: s, top, left).
    min_crop_frac: smallest crop side / short side.
    max_crop_frac: largest crop side / short side.

  Returns:
    uint8 (S, S, 3).
  """
  lo, hi = crop_size_range(size, min_crop_frac, max_crop_frac)
  short = int(rng.integers(lo, hi + 1))
  arr = resize_short_side(rgb, short)
  top = int(rng.integers(arr.shape[0] - size + 1))
  left = int(rng.integers(arr.shape[1] - size + 1))
  return arr[top:top + size, left:left + size]


def random_flip(arr: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
  """Horizontal flip of (H, W, C) with probability p (one uniform draw)."""
  return arr[:, ::-1] if rng.random() < p else arr


def train_transform(rgb: np.ndarray, size: int, rng: np.random.Generator, *,
                    min_crop_frac: float = 0.8, max_crop_frac: float = 1.0,
                    flip: bool = True) -> np.ndarray:
  """Reference train transform: uint8 (H, W, 3) -> float32 (S, S, 3) in [-1, 1]."""
  arr = random_crop_arr(rgb, size, rng, min_crop_frac, max_crop_frac)
  if flip:
    arr = random_flip(arr, rng)
  return images.to_signed(np.ascontiguousarray(arr))


def eval_transform(rgb: np.ndarray, size: int) -> np.ndarray:
  """Reference eval transform (centre crop): uint8 (H, W, 3) -> float32 (S, S, 3) in [-1, 1]."""
  return images.to_signed(center_crop_arr(np.asarray(rgb, np.uint8), size))
