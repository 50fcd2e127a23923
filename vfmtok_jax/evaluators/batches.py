"""ADM reference / sample batches: `.npz` files with images `arr_0` (uint8 NHWC), labels
`arr_1`, and/or stored statistics `mu`, `sigma` (pool features) and `mu_s`, `sigma_s` (spatial).

Images are streamed from the archive in batches (a 50k x 256 x 256 x 3 batch is 9.8 GB), never
loaded whole, and nothing in the file is unpickled.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Iterator

import numpy as np

IMAGES = "arr_0"
LABELS = "arr_1"
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclasses.dataclass(frozen=True)
class BatchFile:
  """What an ADM batch file holds: the image array's shape (None without `arr_0`) and the
  stored statistics present."""
  path: str
  image_shape: tuple[int, ...] | None
  stats: dict[str, np.ndarray]


def _members(path: str) -> dict[str, str]:
  try:
    with zipfile.ZipFile(path) as z:
      return {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{path} is not a readable .npz file ({e})") from e


def _open_npy(z: zipfile.ZipFile, member: str):
  f = z.open(member)
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise ValueError(f"{member}: unsupported .npy format version {version}")
  if dtype.hasobject:
    raise ValueError(f"{member} holds Python objects; only numeric arrays are read")
  return f, shape, fortran, dtype


def inspect(path: str) -> BatchFile:
  """Shape of `arr_0` and the stored statistics (read in full; they are small)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"batch file {path} does not exist")
  members = _members(path)
  shape = None
  if IMAGES in members:
    with zipfile.ZipFile(path) as z:
      f, shape, _, _ = _open_npy(z, members[IMAGES])
      f.close()
  with np.load(path, allow_pickle=False) as f:
    stats = {k: np.asarray(f[k], np.float64) for k in STAT_KEYS if k in members}
  return BatchFile(path, tuple(shape) if shape is not None else None, stats)


def iter_images(path: str, batch_size: int) -> Iterator[np.ndarray]:
  """uint8 (<= batch_size, H, W, 3) batches of `arr_0`, in order."""
  members = _members(path)
  if IMAGES not in members:
    raise ValueError(f"{path} has no {IMAGES} (images)")
  with zipfile.ZipFile(path) as z:
    f, shape, fortran, dtype = _open_npy(z, members[IMAGES])
    with f:
      if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{path}: {IMAGES} has shape {shape}, expected (N, H, W, 3)")
      if dtype != np.uint8:
        raise ValueError(f"{path}: {IMAGES} is {dtype}, expected uint8 (the ADM format)")
      if fortran:
        raise ValueError(f"{path}: {IMAGES} is stored in Fortran order")
      per_image = int(np.prod(shape[1:]))
      for start in range(0, shape[0], batch_size):
        n = min(batch_size, shape[0] - start)
        data = f.read(n * per_image)
        if len(data) != n * per_image:
          raise ValueError(f"{path}: {IMAGES} is truncated (image {start + len(data) // per_image}"
                           f" of {shape[0]})")
        yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


def save(path: str, *, images: np.ndarray | None = None, labels: np.ndarray | None = None,
         stats: dict[str, np.ndarray] | None = None) -> None:
  """Writes an ADM batch (uncompressed, as the reference batches are), atomically."""
  arrays = {}
  if images is not None:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    arrays[IMAGES] = images
  if labels is not None:
    arrays[LABELS] = np.asarray(labels)
  for k, v in (stats or {}).items():
    if k not in STAT_KEYS:
      raise ValueError(f"unknown statistic {k!r}; expected one of {STAT_KEYS}")
    arrays[k] = np.asarray(v)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)
