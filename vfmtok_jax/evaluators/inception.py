"""FID Inception features of uint8 images, as the ADM evaluator's TF graph computes them.

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the TF graph's weights in
torchvision layout), read from a local path only; default `$VFMTOK_JAX_WEIGHTS/<that name>`.
Preprocessing as the graph: uint8 -> float32, TF1 legacy bilinear resize to 299 (skipped at
299), `(x - 128) / 128`. Batches are padded to one fixed size and split over the local devices
(`batched.PaddedApply`), so one program serves every batch and no image is dropped or repeated.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.evaluators import batched
from vfmtok_jax.models import inception as inception_lib
from vfmtok_jax.ops import resize
from vfmtok_jax.weights import files
from vfmtok_jax.weights import inception as inception_keys
from vfmtok_jax.weights import trees

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299

MISSING_WEIGHTS_HELP = """\
FID Inception weights not found at {path}. Nothing is downloaded: on a machine with internet,
fetch pytorch-fid's port of the 2015-12-05 TF Inception graph,

  {url}

and put it at {path} (or pass --inception PATH; the default folder is ${env}, else
~/.cache/vfmtok_jax)."""


def default_path() -> str:
  return os.path.join(files.weights_dir(), WEIGHTS_FILENAME)


def from_state(state, *, source: str):
  """(FIDInceptionV3(), params) from a pytorch-fid state dict; WeightLoadError if it misfits."""
  model = inception_lib.FIDInceptionV3()
  expected = trees.expected_params(model, np.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), np.float32))
  params = trees.assemble(expected, inception_keys.inception_mapping(expected), state,
                          source=source, ignore=inception_keys.ignored_keys(state))
  return model, params


def load_inception(path: str | None = None):
  """(model, params) from a local file (default `default_path()`).

  Raises:
    FileNotFoundError: no file there (the message says which file to put where).
    WeightLoadError: the file is not pytorch-fid's Inception layout.
  """
  path = path or default_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(MISSING_WEIGHTS_HELP.format(path=path, url=WEIGHTS_URL,
                                                        env=files.WEIGHTS_ENV))
  return from_state(files.read_state_dict(path), source=path)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (or 0..255 float) (B, H, W, 3) -> the graph's normalised (B, 299, 299, 3)."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = resize.resize(x, (INPUT_SIZE, INPUT_SIZE), "tf_legacy_bilinear")
  return (x - 128.0) / 128.0


class InceptionFeatures:
  """Callable: uint8 (N, H, W, 3) numpy images -> {"pool", "spatial", "logits"} numpy arrays.

  Args:
    model, params: from `load_inception` / `from_state`.
    batch_size: images per program call (rounded up to a multiple of the local device count).
  """

  def __init__(self, model, params, *, batch_size: int = 64):
    self._apply = batched.PaddedApply(
        lambda p, x: model.apply({"params": p}, preprocess(x)), params, batch_size=batch_size)
    self.batch_size = self._apply.batch_size

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    if images.dtype != np.uint8:
      raise ValueError(f"expected uint8 images (the ADM sample format), got {images.dtype}")
    return self._apply(images)
