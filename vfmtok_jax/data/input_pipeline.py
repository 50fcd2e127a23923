"""Per-process input pipeline on Grain: train batches (restorable by step) and padded eval batches.

Pattern of big_vision `input_pipeline.py` and MaxText's Grain pipeline (style guide 1.6, 8.4
item 10): random-access sources read through `grain.MapDataset`, images decoded here with PIL so
the reference's ADM crops (`transforms.py`) apply exactly and a corrupt image can be named.
Batches become global arrays with `jax.make_array_from_process_local_data` when a sharding is
given.

Sources (`input.dataset`):
  "demo"            the offline photos of `demo_photos.py` (12 photos; label = photo index).
                    Train: random crops of the whole photos. Eval: a fixed held-out set of
                    `demo_eval_crops` crops per photo: crop 0 is the standard centre crop
                    (`center_crop_arr`), crops 1.. are ADM random crops (train scale range, no
                    flip) drawn once from `demo_eval_seed`. "Held out" means fixed and separate
                    from the random train stream; the pixels come from the same 12 photos.
  "imagenet2012"    tfds imagenet2012 from `data_dir`, prepared in ArrayRecord format (random
                    access); see `prepare_dataset` (reads the two ImageNet tars from
                    `manual_dir`).
  "tfds:<name>"     any tfds dataset prepared in ArrayRecord format with an `image` (tfds Image)
                    and a `label` feature (`tfds build <name> --file_format=array_record`).
  "folder:<path>"   an image folder in the layout of `tfds.folder_dataset.ImageFolder`:
                      <path>/<split>/<class_name>/<image>.{jpg,jpeg,png}
                    e.g. <path>/train/cat/001.jpg, <path>/val/dog/002.png. Labels are the class
                    names (union over the splits) sorted, numbered from 0.
Nothing downloads: tfds builders are opened with `try_gcs=False` and never prepared implicitly.

Order and restore. The train stream is the whole split repeated, epoch e a permutation of it
drawn from (seed, e) (Grain's `shuffle` then `repeat`); the crop / flip randomness of the example
at stream position i comes from (seed, i), so from the example and its epoch. Global batch t is
stream positions [t B, (t + 1) B); process p of P reads its contiguous part
[t B + p B / P, t B + (p + 1) B / P). So the global batches depend on neither the process count
nor the number of decoding workers, and a run resumed at step k on another host count continues
the same stream. Restoring at step k reads nothing before batch k: the batch count is the whole
iterator state (saved with each checkpoint by the training loop).

Decoding: `num_threads` threads per process prepare upcoming batches (`prefetch` of them);
`num_workers` > 0 moves them into that many worker processes (Grain's `mp_prefetch`), 0 keeps
them in the training process (tests, the demo). With a sharding, the next global batch is
already on its way to the devices while the step runs (`TrainIterator`'s `device_prefetch`).

Corrupt images raise `CorruptImageError` naming the example (file path, tfds record or photo).
With `skip_corrupt=True` the example's slot in the batch is filled with a copy of the next good
example of the same batch (so batch positions, hence restore, are unaffected) and counted in
`TrainIterator.num_skipped` (this iterator's count since it was created); in eval such an example
is masked out (`_mask=False`) and counted in `EvalBatches.num_skipped`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import logging
import math
import os
from typing import Any, Callable, Iterator, Sequence

from absl import flags
import grain
import jax
import ml_collections
from ml_collections import config_dict
import numpy as np

from vfmtok_jax.data import demo_photos
from vfmtok_jax.data import transforms

ACCEPTED_DATASETS = ("'demo'", "'imagenet2012'", "'tfds:<name>'", "'folder:<path>'")
FOLDER_EXTS = (".jpg", ".jpeg", ".png")  # what tfds ImageFolder lists
FOLDER_LAYOUT = "<path>/<split>/<class_name>/<image>.jpg|.jpeg|.png (e.g. <path>/train/cat/1.jpg)"
_ORDER, _AUG, _DEMO_EVAL = 1, 2, 4  # tags that separate the seed streams


class CorruptImageError(ValueError):
  """An example whose image cannot be read or decoded."""


def default_input_config(dataset: str = "demo", image_size: int = 336,
                         **overrides) -> ml_collections.ConfigDict:
  """The `input` section of a training config, with the reference's defaults.

  Fields:
    dataset: "demo" | "imagenet2012" | "tfds:<name>" | "folder:<path>".
    split / eval_split: train and eval split names (eval_split defaults to "val" for folders,
      "validation" otherwise; ignored by "demo", whose eval set is the fixed crops).
    data_dir: tfds data dir (None: tfds' default, e.g. $TFDS_DATA_DIR).
    manual_dir: ImageNet tars for `prepare_dataset` only.
    image_size: output side S. min_crop_frac / max_crop_frac: ADM crop range. flip: hflip p=0.5.
    skip_corrupt: skip (and count) unreadable images instead of stopping.
    num_workers: decoding worker processes per training process (0 = decode in the training
      process). num_threads: threads preparing batches in each of them.
    prefetch: batches prepared ahead per process.
    demo_eval_crops / demo_eval_seed: the demo's held-out crops per photo and their seed.

  Args:
    dataset: the `dataset` field.
    image_size: the `image_size` field.
    **overrides: any other field; unknown names raise KeyError.
  """
  cfg = ml_collections.ConfigDict(dict(
      dataset=dataset, split="train",
      eval_split="val" if dataset.startswith("folder:") else "validation",
      data_dir=config_dict.placeholder(str), manual_dir=config_dict.placeholder(str),
      image_size=image_size, min_crop_frac=0.8, max_crop_frac=1.0, flip=True,
      skip_corrupt=False, num_workers=0, num_threads=4, prefetch=4,
      demo_eval_crops=2, demo_eval_seed=0))
  for k, v in overrides.items():
    if k not in cfg:
      raise KeyError(f"unknown input config field {k!r}; fields: {sorted(cfg)}")
    cfg[k] = v
  return cfg


def parse_dataset(spec: str) -> tuple[str, str | None]:
  """'demo' -> ('demo', None); 'imagenet2012' / 'tfds:<name>' -> ('tfds', name);
  'folder:<path>' -> ('folder', path). ValueError naming the accepted forms otherwise."""
  if spec == "demo":
    return "demo", None
  if spec == "imagenet2012":
    return "tfds", "imagenet2012"
  for prefix, kind in (("tfds:", "tfds"), ("folder:", "folder")):
    if spec.startswith(prefix) and len(spec) > len(prefix):
      return kind, spec[len(prefix):]
  raise ValueError(f"unknown input.dataset {spec!r}; accepted: {', '.join(ACCEPTED_DATASETS)} "
                   f"(tfds:<name> is any prepared tfds image dataset with image and label "
                   f"features; folder:<path> is laid out as {FOLDER_LAYOUT})")


def even_bounds(n: int, count: int, index: int) -> tuple[int, int]:
  """[start, end) of shard `index` of `count` contiguous shards of n items (sizes differ <= 1)."""
  return index * n // count, (index + 1) * n // count


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index {pi} is not in [0, process_count={pc})")
  return pi, pc


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of the "
                     f"process count {process_count}")
  return global_batch_size // process_count


def shard_sizes(n: int, count: int) -> list[int]:
  """Sizes of the `count` shards of `even_bounds`."""
  return [hi - lo for lo, hi in (even_bounds(n, count, i) for i in range(count))]


def seed32(*entropy: int) -> int:
  """A 32-bit seed (what Grain takes) mixed from any non-negative integers."""
  return int(np.random.SeedSequence([int(e) for e in entropy]).generate_state(1)[0])


def decode_image_bytes(data: bytes) -> np.ndarray:
  """Encoded image -> uint8 (H, W, 3) RGB (PIL, like the reference; no EXIF rotation)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(io.BytesIO(data)) as im:
    arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
  if arr.ndim != 3 or min(arr.shape[:2]) < 1:
    raise ValueError(f"decoded to an empty image of shape {arr.shape}")
  return arr


# ----------------------------------------------------------------------------------------------
# Sources: random access to one split's encoded examples, as Grain reads them.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Example:
  """One example as a source holds it: `name` identifies it in errors."""
  label: int
  name: str
  data: Any  # encoded bytes (tfds), file path (folder), uint8 (H, W, 3) array (demo)


class _ListSource:
  """A split held as a list of examples (demo, folder), decoded by `load(example)`."""

  def __init__(self, examples: Sequence[Example], load: Callable[[Example], np.ndarray]):
    self._examples, self.load = list(examples), load

  def __len__(self) -> int:
    return len(self._examples)

  def __getitem__(self, index: int) -> Example:
    return self._examples[index]


@functools.lru_cache(maxsize=2)
def _demo_photos() -> tuple[tuple[str, np.ndarray], ...]:
  return tuple(demo_photos.demo_photos())


@functools.lru_cache(maxsize=4)
def demo_eval_set(image_size: int, crops_per_photo: int, seed: int, min_crop_frac: float,
                  max_crop_frac: float) -> tuple[np.ndarray, np.ndarray]:
  """The demo's fixed held-out crops: uint8 (P*C, S, S, 3) and labels (P*C,) int32.

  Photo-major; crop 0 of each photo is the centre crop, crops 1.. ADM random crops drawn from
  (seed, photo, crop) without flip.
  """
  imgs, labels = [], []
  for p, (_, rgb) in enumerate(_demo_photos()):
    for c in range(crops_per_photo):
      if c == 0:
        imgs.append(transforms.center_crop_arr(rgb, image_size))
      else:
        rng = np.random.default_rng([seed, _DEMO_EVAL, p, c])
        imgs.append(transforms.random_crop_arr(rgb, image_size, rng, min_crop_frac,
                                               max_crop_frac))
      labels.append(p)
  return np.stack(imgs), np.asarray(labels, np.int32)


def _as_array(example: Example) -> np.ndarray:
  return example.data


def _demo_source(cfg, train: bool) -> _ListSource:
  photos = _demo_photos()
  if train:
    return _ListSource([Example(label=i, name=f"demo photo {i} ({name})", data=rgb)
                        for i, (name, rgb) in enumerate(photos)], _as_array)
  crops, labels = demo_eval_set(cfg.image_size, cfg.demo_eval_crops, cfg.demo_eval_seed,
                                cfg.min_crop_frac, cfg.max_crop_frac)
  per = cfg.demo_eval_crops
  return _ListSource([Example(label=int(labels[i]),
                              name=f"demo eval crop {i % per} of photo {photos[i // per][0]}",
                              data=crops[i]) for i in range(len(labels))], _as_array)


@functools.lru_cache(maxsize=1)
def _tf():
  """Imports tensorflow (once), keeping it off the accelerators."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass
  return tf


def _read_file(example: Example) -> np.ndarray:
  with open(example.data, "rb") as fh:
    return decode_image_bytes(fh.read())


def _folder_source(root: str, split: str) -> _ListSource:
  tf = _tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not tf.io.gfile.isdir(root):
    raise FileNotFoundError(f"image folder {root} does not exist; expected layout {FOLDER_LAYOUT}")
  builder = tfds.folder_dataset.ImageFolder(root)
  splits = sorted(builder.info.splits.keys())
  if split not in splits:
    raise ValueError(f"image folder {root} has no split {split!r} (found splits {splits}); "
                     f"expected layout {FOLDER_LAYOUT}")
  label_ids = {name: i for i, name in enumerate(builder.info.features["label"].names)}
  split_dir = os.path.join(root, split)
  examples = []
  for cls in sorted(d for d in tf.io.gfile.listdir(split_dir)
                    if tf.io.gfile.isdir(os.path.join(split_dir, d))):
    for f in sorted(tf.io.gfile.listdir(os.path.join(split_dir, cls))):
      if f.lower().endswith(FOLDER_EXTS):
        path = os.path.join(split_dir, cls, f)
        examples.append(Example(label=label_ids[cls], name=path, data=path))
  expected = builder.info.splits[split].num_examples
  if len(examples) != expected:
    raise RuntimeError(f"listed {len(examples)} images in {split_dir} but tfds ImageFolder "
                       f"found {expected}")
  if not examples:
    raise ValueError(f"image folder split {split_dir} holds no images; layout {FOLDER_LAYOUT}")
  return _ListSource(examples, _read_file)


def _not_prepared(name: str, data_dir: str | None) -> FileNotFoundError:
  where = data_dir or "tfds' default data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  how = (f"prepare it once (no network needed for imagenet2012): `tfds build imagenet2012 "
         f"--file_format=array_record --manual_dir=<dir with ILSVRC2012_img_train.tar, "
         f"ILSVRC2012_img_val.tar> --data_dir=<data_dir>` or `input_pipeline.prepare_dataset(cfg)`"
         f" with input.manual_dir set" if name == "imagenet2012" else
         f"prepare it on a machine with network access (`tfds build {name} "
         f"--file_format=array_record --data_dir=<data_dir>`) and copy the data dir here")
  return FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where}; {how}; then set "
                           f"input.data_dir. This pipeline never downloads.")


def _tfds_builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(f"unknown tfds dataset {name!r} (input.dataset='tfds:{name}'): tfds has no "
                     f"such builder; see `tfds.list_builders()`") from e
  features = builder.info.features
  keys = list(features.keys()) if hasattr(features, "keys") else []
  if "image" not in keys or "label" not in keys:
    raise ValueError(f"tfds dataset {name!r} needs 'image' and 'label' features; it has {keys}")
  if not isinstance(features["image"], tfds.features.Image):
    raise ValueError(f"tfds dataset {name!r}: feature 'image' is a "
                     f"{type(features['image']).__name__}, not a tfds Image")
  return builder


class _TfdsSource:
  """A split of a tfds dataset prepared in ArrayRecord format, read encoded, by index."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    _tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _tfds_builder(name, data_dir)
    self._label = f"tfds {name} {split}"
    try:
      self._source = builder.as_data_source(
          split=split, decoders={"image": tfds.decode.SkipDecoding()})
    except (NotImplementedError, AssertionError, FileNotFoundError) as e:
      # tfds: no random access for this file format, or no data where it looked.
      if not builder.is_prepared():
        raise _not_prepared(name, data_dir) from e
      file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
      raise ValueError(
          f"tfds dataset {name!r} in {builder.data_dir} is prepared as {file_format}, which "
          f"has no random access; re-prepare it in ArrayRecord format: `tfds build {name} "
          f"--file_format=array_record --data_dir=<data_dir>` (imagenet2012: "
          f"`input_pipeline.prepare_dataset`)") from e
    except ValueError as e:  # unknown split and the like
      raise ValueError(f"tfds dataset {name!r}, split {split!r}: {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    ex = self._source[index]
    return Example(label=int(ex["label"]), name=f"{self._label} record {index}",
                   data=ex["image"])

  @staticmethod
  def load(example: Example) -> np.ndarray:
    return decode_image_bytes(example.data)


def _open_source(cfg, *, train: bool):
  kind, arg = parse_dataset(cfg.dataset)
  split = cfg.split if train else cfg.eval_split
  if kind == "demo":
    return _demo_source(cfg, train)
  if kind == "folder":
    return _folder_source(arg, split)
  return _TfdsSource(arg, split, cfg.data_dir)


def prepare_dataset(cfg) -> None:
  """Prepares imagenet2012 in `cfg.data_dir`, in ArrayRecord format, from the tars in
  `cfg.manual_dir` (no download).

  Run once, on one machine, before training. Other tfds datasets are refused: preparing them
  would download.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kind, name = parse_dataset(cfg.dataset)
  if kind != "tfds" or name != "imagenet2012":
    raise ValueError(f"prepare_dataset only prepares imagenet2012 from manual_dir, not "
                     f"{cfg.dataset!r} (others would download)")
  if not cfg.manual_dir:
    raise ValueError("set input.manual_dir to the folder holding ILSVRC2012_img_train.tar and "
                     "ILSVRC2012_img_val.tar")
  builder = _tfds_builder(name, cfg.data_dir)
  builder.download_and_prepare(file_format="array_record",
                               download_config=tfds.download.DownloadConfig(
                                   manual_dir=cfg.manual_dir, try_download_gcs=False))


# ----------------------------------------------------------------------------------------------
# Batching.
# ----------------------------------------------------------------------------------------------

def _leaf_sharding(sharding, ndim: int):
  """The batch sharding for a leaf of rank `ndim`: the first spec entry, the rest replicated."""
  spec = sharding.spec
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(
      spec[0] if len(spec) else None, *([None] * (ndim - 1))))


def to_global(batch: dict, sharding) -> dict:
  """Process-local numpy batch -> global jax arrays, the leading axis over the batch axes."""
  if sharding is None:
    return batch
  return {k: jax.make_array_from_process_local_data(_leaf_sharding(sharding, v.ndim), v)
          for k, v in batch.items()}


def _input_cfg(cfg):
  return cfg.input if "dataset" not in cfg and "input" in cfg else cfg


def _corrupt_error(name: str, error: str) -> CorruptImageError:
  return CorruptImageError(f"corrupt image: {name}: {error} (set input.skip_corrupt=True to "
                           "skip such images)")


@dataclasses.dataclass(frozen=True)
class _Prepared:
  """An example after decoding and cropping: `image` (S, S, 3) float32, or None with `error`."""
  image: np.ndarray | None
  label: int
  name: str
  error: str = ""


class _TrainTransform:
  """(stream position, example) -> `_Prepared`: decode, then the ADM random crop and flip drawn
  from (seed, position). A picklable class, so decoding workers can run it."""

  def __init__(self, load, seed: int, cfg):
    self._load, self._seed = load, seed
    self._size, self._fracs, self._flip = (int(cfg.image_size),
                                           (cfg.min_crop_frac, cfg.max_crop_frac),
                                           bool(cfg.flip))

  def __call__(self, position: int, example: Example) -> _Prepared:
    try:
      rgb = self._load(example)
    except Exception as e:  # pylint: disable=broad-except  # reported by the batch
      return _Prepared(None, example.label, example.name, f"{type(e).__name__}: {e}")
    rng = np.random.default_rng([self._seed, _AUG, position])
    return _Prepared(transforms.train_transform(
        rgb, self._size, rng, min_crop_frac=self._fracs[0], max_crop_frac=self._fracs[1],
        flip=self._flip), example.label, example.name)


class _TrainBatch:
  """A list of `_Prepared` -> {'image', 'label', '_skipped'}; a corrupt example stops with its
  name, or with `skip_corrupt` takes a copy of the next good example of the batch (positions
  unchanged, so restore stays exact) and is counted in '_skipped'."""

  def __init__(self, skip_corrupt: bool):
    self._skip = skip_corrupt

  def __call__(self, items: Sequence[_Prepared]) -> dict:
    items = list(items)
    bad = [i for i, it in enumerate(items) if it.image is None]
    if bad and not self._skip:
      raise _corrupt_error(items[bad[0]].name, items[bad[0]].error)
    good = [i for i in range(len(items)) if items[i].image is not None]
    if bad and not good:
      raise CorruptImageError(f"every image of a local batch is unreadable, e.g. "
                              f"{items[0].name}: {items[0].error}")
    for i in bad:
      logging.warning("skipping corrupt image %s: %s", items[i].name, items[i].error)
      items[i] = items[next((g for g in good if g > i), good[0])]
    return {"image": np.stack([it.image for it in items]),
            "label": np.asarray([it.label for it in items], np.int32),
            "_skipped": np.int64(len(bad))}


def _read_options(cfg) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=int(cfg.num_threads),
                           prefetch_buffer_size=int(cfg.prefetch))


class TrainIterator:
  """Infinite iterator of train batches; `step` (batches produced so far) is its whole state.

  Yields {'image': (B, S, S, 3) float32 in [-1, 1], 'label': (B,) int32}, B = the local batch
  (numpy), or global jax arrays of the global batch when built with a sharding. With a sharding,
  `device_prefetch` further batches are already on their way to the devices while the caller
  uses one (an error in one of them, e.g. a corrupt image, surfaces that many calls early).
  Attributes: step, num_skipped, local_batch_size, num_examples (of the split).
  """

  def __init__(self, dataset: grain.IterDataset, *, start_step: int, local_batch_size: int,
               num_examples: int, sharding=None, device_prefetch: int = 1):
    self._iter, self._sharding = iter(dataset), sharding
    self._ahead: collections.deque = collections.deque()
    self._depth = max(0, int(device_prefetch)) if sharding is not None else 0
    self.step, self.num_skipped = int(start_step), 0
    self.local_batch_size, self.num_examples = local_batch_size, num_examples

  def __iter__(self):
    return self

  def _pull(self) -> tuple[int, dict]:
    batch = dict(next(self._iter))
    skipped = int(batch.pop("_skipped"))
    return skipped, to_global(batch, self._sharding)  # transfers start here, asynchronously

  def __next__(self) -> dict:
    while len(self._ahead) <= self._depth:
      self._ahead.append(self._pull())
    skipped, batch = self._ahead.popleft()
    self.num_skipped += skipped
    self.step += 1
    return batch

  def close(self):
    self._ahead.clear()
    close = getattr(self._iter, "close", None)
    if close is not None:
      close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def train_dataset(cfg, source, *, global_batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> grain.IterDataset:
  """This process's local batches from global batch `start_step` on (see the module docstring:
  global batch t is stream positions [t B, (t + 1) B), the process's part contiguous)."""
  local = _local_batch(global_batch_size, process_count)
  ds = grain.MapDataset.source(source).shuffle(seed=seed32(seed, _ORDER)).repeat()
  ds = ds.map_with_index(_TrainTransform(source.load, seed, cfg))
  ds = ds.batch(local, batch_fn=_TrainBatch(bool(cfg.skip_corrupt)))
  ds = ds[process_index::process_count][start_step:]
  out = ds.to_iter_dataset(_read_options(cfg))
  if int(cfg.num_workers) > 0:
    if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags (library use, tests)
      flags.FLAGS.mark_as_parsed()
    out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(cfg.num_workers)))
  return out


def make_train_iterator(cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                        sharding=None, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """The train stream of this process, positioned at batch `start_step`.

  Args:
    cfg: the input ConfigDict (`default_input_config`), or a config with an `input` field.
    global_batch_size: batch over all processes; must divide by the process count.
    seed: non-negative; fixes the order and the augmentations.
    start_step: batches already consumed (resume): the iterator yields batch start_step next,
      reading nothing before it.
    sharding: a NamedSharding whose first spec entry is the batch axes; None -> numpy batches.
    process_index / process_count: default jax's (overridable to simulate hosts in tests).

  Returns:
    A `TrainIterator` yielding {'image': (B, S, S, 3) f32 in [-1, 1], 'label': (B,) int32}.
  """
  cfg = _input_cfg(cfg)
  if seed < 0 or start_step < 0:
    raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0")
  pi, pc = _process(process_index, process_count)
  local = _local_batch(global_batch_size, pc)
  source = _open_source(cfg, train=True)
  if not len(source):
    raise ValueError(f"{cfg.dataset} {cfg.split} holds no examples")
  ds = train_dataset(cfg, source, global_batch_size=global_batch_size, seed=seed,
                     start_step=start_step, process_index=pi, process_count=pc)
  return TrainIterator(ds, start_step=start_step, local_batch_size=local,
                       num_examples=len(source), sharding=sharding)


class _EvalTransform:
  """Example -> `_Prepared` centre crop (or the error)."""

  def __init__(self, load, image_size: int):
    self._load, self._size = load, image_size

  def __call__(self, example: Example) -> _Prepared:
    try:
      return _Prepared(transforms.eval_transform(self._load(example), self._size),
                       example.label, example.name)
    except Exception as e:  # pylint: disable=broad-except  # reported by the batch
      return _Prepared(None, example.label, example.name, f"{type(e).__name__}: {e}")


class EvalBatches:
  """Re-iterable eval batches, padded so every process runs `num_batches` of them.

  Process p of P reads the contiguous shard `even_bounds(n, P, p)` of the split, so every example
  is read exactly once over the processes. Each batch: {'image': (B, S, S, 3) f32 in [-1, 1]
  (centre crop), 'label': (B,) int32, '_mask': (B,) bool}, padding (zeros) and skipped corrupt
  images having `_mask` False.
  Attributes: num_batches (same on every process), num_examples (all processes), num_skipped.
  """

  def __init__(self, source, cfg, *, local_batch_size: int, process_index: int,
               process_count: int, sharding=None):
    n = len(source)
    lo, hi = even_bounds(n, process_count, process_index)
    self._dataset = grain.MapDataset.source(source)[lo:hi].map(
        _EvalTransform(source.load, int(cfg.image_size)))
    self._cfg, self._sharding, self._size = cfg, sharding, int(cfg.image_size)
    self._skip = bool(cfg.skip_corrupt)
    self.local_batch_size = local_batch_size
    self.num_examples = n
    self.num_batches = math.ceil(max(shard_sizes(n, process_count)) / local_batch_size)
    self.num_skipped = 0

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[dict]:
    b, s = self.local_batch_size, self._size
    items = iter(self._dataset.to_iter_dataset(_read_options(self._cfg)))
    for _ in range(self.num_batches):
      image = np.zeros((b, s, s, 3), np.float32)
      label = np.zeros((b,), np.int32)
      mask = np.zeros((b,), bool)
      for i, item in zip(range(b), items):
        if item.image is None:
          if not self._skip:
            raise _corrupt_error(item.name, item.error)
          logging.warning("skipping corrupt eval image %s: %s", item.name, item.error)
          self.num_skipped += 1
          continue
        image[i], label[i], mask[i] = item.image, item.label, True
      yield to_global({"image": image, "label": label, "_mask": mask}, self._sharding)


def make_eval_batches(cfg, *, global_batch_size: int, sharding=None, split: str | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> EvalBatches:
  """Eval batches of this process (centre crops; the fixed held-out crops for "demo").

  Args:
    cfg: the input ConfigDict, or a config with an `input` field.
    global_batch_size: batch over all processes; must divide by the process count.
    sharding: as in `make_train_iterator`; None -> numpy batches.
    split: overrides `cfg.eval_split`.
    process_index / process_count: default jax's.

  Returns:
    `EvalBatches` (re-iterable; `num_batches` identical on every process).
  """
  cfg = _input_cfg(cfg)
  if split is not None:
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.eval_split = split
  pi, pc = _process(process_index, process_count)
  local = _local_batch(global_batch_size, pc)
  source = _open_source(cfg, train=False)
  return EvalBatches(source, cfg, local_batch_size=local, process_index=pi, process_count=pc,
                     sharding=sharding)
