"""Reading user images: listing, decoding (with errors that name the file), ADM crops."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def list_images(paths: Sequence[str]) -> list[str]:
  """Expands folders (their image files, sorted, not recursive); files are kept as given.

  Raises:
    FileNotFoundError: a path does not exist.
    ValueError: a folder holds no image files, or nothing was given.
  """
  out = []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, f) for f in os.listdir(path)
                     if f.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(path, f)))
      if not found:
        raise ValueError(f"folder {path} has no image files (extensions {', '.join(IMAGE_EXTS)})")
      out.extend(found)
    elif os.path.isfile(path):
      out.append(path)
    else:
      raise FileNotFoundError(f"image path {path} does not exist")
  if not out:
    raise ValueError("no images given")
  return out


def read_image(path: str) -> np.ndarray:
  """uint8 (H, W, 3) RGB, EXIF orientation applied. ValueError naming the file if unreadable."""
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as im:
      im = ImageOps.exif_transpose(im)
      return np.asarray(im.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError (truncated), ...
    raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e


def center_crop_arr(rgb: np.ndarray, size: int) -> np.ndarray:
  """The reference's eval transform (ADM `center_crop_arr`), uint8 (H, W, 3) -> (size, size, 3).

  Halve with a box filter while the short side is >= 2*size, bicubic-resize the short side to
  `size`, centre crop.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  im = Image.fromarray(rgb)
  while min(im.size) >= 2 * size:
    im = im.resize(tuple(x // 2 for x in im.size), resample=Image.BOX)
  scale = size / min(im.size)
  im = im.resize(tuple(round(x * scale) for x in im.size), resample=Image.BICUBIC)
  arr = np.asarray(im, dtype=np.uint8)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def pil_resize(images: np.ndarray, size: int) -> np.ndarray:
  """uint8 (N, H, W, 3) -> (N, size, size, 3) with `PIL.Image.resize`'s default (antialiased
  bicubic), as the reference's tokenizer evaluation brings 336 px images to 256 px."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if images.dtype != np.uint8 or images.ndim != 4:
    raise ValueError(f"pil_resize takes uint8 (N, H, W, 3) images, got {images.dtype} "
                     f"{images.shape}")
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size))) for im in images]
                  ) if len(images) else np.zeros((0, size, size, 3), np.uint8)


def to_signed(rgb: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1]."""
  return rgb.astype(np.float32) / 127.5 - 1.0


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8 as the reference does: clamp(127.5 x + 128, 0, 255), then truncate."""
  return np.clip(np.asarray(images, np.float32) * 127.5 + 128.0, 0, 255).astype(np.uint8)


def save_png(path: str, rgb: np.ndarray) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.asarray(rgb, np.uint8)).save(path)


def image_grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
  """Rows of uint8 (N, H, W, 3) batches -> one uint8 grid image with `pad` white borders."""
  rows = [np.asarray(r, np.uint8) for r in rows]
  n, h, w, _ = rows[0].shape
  grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, np.uint8)
  for i, row in enumerate(rows):
    for j, img in enumerate(row):
      top, left = pad + i * (h + pad), pad + j * (w + pad)
      grid[top:top + h, left:left + w] = img
  return grid
