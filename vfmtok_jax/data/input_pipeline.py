"""Per-process input pipeline: train iterator (restorable by step) and padded eval batches.

Pattern of big_vision `input_pipeline.py` / `datasets/tfds.py` (style guide 1.6, 8.4 item 10):
each process reads its own even share of the split, the local batch is global // process_count,
images are read encoded (`tfds.decode.SkipDecoding`) and decoded here with PIL so the reference's
ADM crops (`transforms.py`) apply exactly and a corrupt image can be named. Batches become global
arrays with `jax.make_array_from_process_local_data` when a sharding is given.

Sources (`input.dataset`):
  "demo"            the offline photos of `demo_photos.py` (12 photos; label = photo index).
                    Train: random crops of the whole photos. Eval: a fixed held-out set of
                    `demo_eval_crops` crops per photo: crop 0 is the standard centre crop
                    (`center_crop_arr`), crops 1.. are ADM random crops (train scale range, no
                    flip) drawn once from `demo_eval_seed`. "Held out" means fixed and separate
                    from the random train stream; the pixels come from the same 12 photos.
  "imagenet2012"    tfds imagenet2012 from `data_dir`. Must be prepared beforehand; see
                    `prepare_dataset` (reads the two ImageNet tars from `manual_dir`).
  "tfds:<name>"     any prepared tfds dataset with an `image` (tfds Image) and a `label` feature.
  "folder:<path>"   an image folder in the layout of `tfds.folder_dataset.ImageFolder`:
                      <path>/<split>/<class_name>/<image>.{jpg,jpeg,png}
                    e.g. <path>/train/cat/001.jpg, <path>/val/dog/002.png. Labels are the class
                    names (union over the splits) sorted, numbered from 0.
Nothing downloads: tfds builders are opened with `try_gcs=False` and never prepared implicitly.

Order and restore. The train stream is a sequence of local epochs; epoch e is a permutation of
the process's shard drawn from (seed, e, process_index): an exact permutation for demo and folder,
for tfds a file shuffle plus a `tf.data` shuffle buffer of `shuffle_buffer` examples, both seeded
with (seed, e, process_index) and not reshuffled. Batches run across epoch boundaries. The crop /
flip randomness of an example comes from (seed, epoch, example key), the key being a hash of the
tfds id or file path (the photo index for demo). So the number of batches produced is the whole
state: `make_train_iterator(..., start_step=k)` jumps to local example k * local_batch, skipping
encoded records (no decode) in its epoch, and yields exactly the batches an uninterrupted iterator
yields from step k on. Skipping costs reading up to one epoch of encoded records on restore.

Corrupt images raise `CorruptImageError` naming the example (file path, tfds id or photo). With
`skip_corrupt=True` the example's slot in the batch is filled with a copy of the next good example
of the same batch (so batch positions, hence restore, are unaffected) and counted in
`TrainIterator.num_skipped` (this iterator's count since it was created); in eval such an example
is masked out (`_mask=False`) and counted in `EvalBatches.num_skipped`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import io
import itertools
import logging
import math
import os
from typing import Any, Iterator, Sequence

import jax
import ml_collections
from ml_collections import config_dict
import numpy as np

from vfmtok_jax.data import demo_photos
from vfmtok_jax.data import transforms

ACCEPTED_DATASETS = ("'demo'", "'imagenet2012'", "'tfds:<name>'", "'folder:<path>'")
FOLDER_EXTS = (".jpg", ".jpeg", ".png")  # what tfds ImageFolder lists
FOLDER_LAYOUT = "<path>/<split>/<class_name>/<image>.jpg|.jpeg|.png (e.g. <path>/train/cat/1.jpg)"
_PERM, _AUG, _TFDS_SHUFFLE, _DEMO_EVAL = 1, 2, 3, 4  # tags that separate the seed streams


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
    shuffle_buffer: tfds shuffle buffer (encoded examples; ~110 kB each for ImageNet).
    skip_corrupt: skip (and count) unreadable images instead of stopping.
    num_workers: threads that decode and crop (1 = in the calling thread).
    demo_eval_crops / demo_eval_seed: the demo's held-out crops per photo and their seed.
    data_shards: how many shards the training stream is cut into (0 = one per process). With a
      fixed count the global batches do not depend on how many processes read them (each
      process reads data_shards / process_count shards), so a run can resume on another host
      count with the same data order.

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
      shuffle_buffer=50_000, skip_corrupt=False, num_workers=4, data_shards=0,
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


def _key(text: str | bytes) -> int:
  """Stable 64-bit key of an example id (the augmentation seed's example part)."""
  data = text.encode() if isinstance(text, str) else bytes(text)
  return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _seed32(*entropy: int) -> int:
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
# Sources: a process's shard as records, in train (epoch-shuffled) or eval (fixed) order.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Record:
  """One encoded example: `key` seeds its augmentation, `name` identifies it in errors."""
  key: int
  label: int
  name: str
  data: Any  # encoded bytes (tfds), file path (folder), photo index or uint8 array (demo)


class _IndexedSource:
  """A shard held as a list of records (demo, folder): exact per-epoch permutations."""

  def __init__(self, records: Sequence[Record], counts: Sequence[int], process_index: int,
               load):
    self.records, self.counts = list(records), list(counts)
    self._pi, self._load = process_index, load
    self.num_local = len(self.records)

  def iter_records(self, epoch: int, offset: int, seed: int, shuffle: bool) -> Iterator[Record]:
    order = (np.random.default_rng([seed, _PERM, epoch, self._pi]).permutation(self.num_local)
             if shuffle else np.arange(self.num_local))
    for i in order[offset:]:
      yield self.records[i]

  def load(self, rec: Record) -> np.ndarray:
    return self._load(rec)


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


def _demo_source(cfg, train: bool, pi: int, pc: int) -> _IndexedSource:
  photos = _demo_photos()
  if train:
    records = [Record(key=i, label=i, name=f"demo photo {i} ({name})", data=i)
               for i, (name, _) in enumerate(photos)]
    load = lambda rec: photos[rec.data][1]
  else:
    crops, labels = demo_eval_set(cfg.image_size, cfg.demo_eval_crops, cfg.demo_eval_seed,
                                  cfg.min_crop_frac, cfg.max_crop_frac)
    per = cfg.demo_eval_crops
    records = [Record(key=i, label=int(labels[i]),
                      name=f"demo eval crop {i % per} of photo {photos[i // per][0]}",
                      data=crops[i]) for i in range(len(labels))]
    load = lambda rec: rec.data
  n = len(records)
  lo, hi = even_bounds(n, pc, pi)
  return _IndexedSource(records[lo:hi], shard_sizes(n, pc), pi, load)


@functools.lru_cache(maxsize=1)
def _tf():
  """Imports tensorflow (once), keeping it off the accelerators."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # already initialised
    pass
  return tf


def _folder_source(root: str, split: str, pi: int, pc: int) -> _IndexedSource:
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
  records = []
  for cls in sorted(d for d in tf.io.gfile.listdir(split_dir)
                    if tf.io.gfile.isdir(os.path.join(split_dir, d))):
    for f in sorted(tf.io.gfile.listdir(os.path.join(split_dir, cls))):
      if f.lower().endswith(FOLDER_EXTS):
        path = os.path.join(split_dir, cls, f)
        records.append(Record(key=_key(f"{split}/{cls}/{f}"), label=label_ids[cls], name=path,
                              data=path))
  expected = builder.info.splits[split].num_examples
  if len(records) != expected:
    raise RuntimeError(f"listed {len(records)} images in {split_dir} but tfds ImageFolder "
                       f"found {expected}")
  if not records:
    raise ValueError(f"image folder split {split_dir} holds no images; layout {FOLDER_LAYOUT}")
  lo, hi = even_bounds(len(records), pc, pi)

  def load(rec):
    with tf.io.gfile.GFile(rec.data, "rb") as fh:
      return decode_image_bytes(fh.read())

  return _IndexedSource(records[lo:hi], shard_sizes(len(records), pc), pi, load)


def _not_prepared(name: str, data_dir: str | None) -> FileNotFoundError:
  where = data_dir or "tfds' default data dir ($TFDS_DATA_DIR or ~/tensorflow_datasets)"
  how = (f"prepare it once (no network needed for imagenet2012): `tfds build imagenet2012 "
         f"--manual_dir=<dir with ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar> "
         f"--data_dir=<data_dir>` or `input_pipeline.prepare_dataset(cfg)` with "
         f"input.manual_dir set" if name == "imagenet2012" else
         f"prepare it on a machine with network access (`tfds build {name} "
         f"--data_dir=<data_dir>`) and copy the data dir here")
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
  """A process's `tfds.even_splits` share, read encoded; shuffled by file order + buffer."""

  def __init__(self, name: str, split: str, cfg, pi: int, pc: int):
    _tf()
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds, self._name, self._data_dir, self._pi = tfds, name, cfg.data_dir, pi
    self._split_name = split
    self._buffer = int(cfg.shuffle_buffer)
    self._builder = _tfds_builder(name, cfg.data_dir)
    subsplits = tfds.even_splits(split, pc)
    self.split = subsplits[pi]
    self.counts = [self._count(s) for s in subsplits]
    self.num_local = self.counts[pi]

  def _as_dataset(self, split, shuffle_files: bool, seed: int | None):
    tfds = self._tfds
    read_config = tfds.ReadConfig(shuffle_seed=seed, add_tfds_id=True, skip_prefetch=True,
                                  try_autocache=False)
    try:
      return self._builder.as_dataset(split=split, shuffle_files=shuffle_files,
                                      decoders={"image": tfds.decode.SkipDecoding()},
                                      read_config=read_config)
    except AssertionError as e:  # tfds: "could not find data in ..."
      raise _not_prepared(self._name, self._data_dir) from e
    except ValueError as e:  # unknown split and the like
      raise ValueError(f"tfds dataset {self._name!r}, split {self._split_name!r}: {e}") from e

  def _count(self, split) -> int:
    try:
      return int(self._builder.info.splits[split].num_examples)
    except Exception:  # pylint: disable=broad-except  # e.g. splits not known (mocked tfds)
      n = int(self._as_dataset(split, False, None).cardinality())
      if n < 0:
        raise RuntimeError(f"cannot count the examples of tfds {self._name} {split}") from None
      return n

  def iter_records(self, epoch: int, offset: int, seed: int, shuffle: bool) -> Iterator[Record]:
    tf = _tf()
    s = _seed32(seed, _TFDS_SHUFFLE, epoch, self._pi) if shuffle else None
    ds = self._as_dataset(self.split, shuffle, s)
    ds = ds.map(lambda ex: {"image": ex["image"], "label": ex["label"], "id": ex["tfds_id"]})
    if shuffle:
      ds = ds.shuffle(self._buffer, seed=s, reshuffle_each_iteration=False)
    if offset:
      ds = ds.skip(offset)
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options).prefetch(256)
    for ex in ds.as_numpy_iterator():
      tid = ex["id"].decode()
      yield Record(key=_key(tid), label=int(ex["label"]), name=f"tfds {self._name} example {tid}",
                   data=ex["image"])

  def load(self, rec: Record) -> np.ndarray:
    return decode_image_bytes(rec.data)


def _open_source(cfg, *, train: bool, pi: int, pc: int):
  kind, arg = parse_dataset(cfg.dataset)
  split = cfg.split if train else cfg.eval_split
  if kind == "demo":
    return _demo_source(cfg, train, pi, pc)
  if kind == "folder":
    return _folder_source(arg, split, pi, pc)
  return _TfdsSource(arg, split, cfg, pi, pc)


def prepare_dataset(cfg) -> None:
  """Prepares imagenet2012 in `cfg.data_dir` from the tars in `cfg.manual_dir` (no download).

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
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
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


class _Worker:
  """Runs the decode + transform of records, in a thread pool when num_workers > 1."""

  def __init__(self, num_workers: int):
    self._pool = (concurrent.futures.ThreadPoolExecutor(num_workers, "vfmtok-input")
                  if num_workers > 1 else None)

  def map(self, fn, items):
    """fn(item) for each item, in order; an exception is returned in place of the result."""
    def safe(item):
      try:
        return fn(item)
      except Exception as e:  # pylint: disable=broad-except  # reported by the caller
        return e
    return list(self._pool.map(safe, items)) if self._pool else [safe(i) for i in items]

  def close(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)
      self._pool = None


def _corrupt_error(rec: Record, e: BaseException) -> CorruptImageError:
  return CorruptImageError(f"corrupt image: {rec.name}: {type(e).__name__}: {e} (set "
                           "input.skip_corrupt=True to skip such images)")


class TrainIterator:
  """Infinite iterator of train batches; `step` (batches produced so far) is its whole state.

  Yields {'image': (B, S, S, 3) float32 in [-1, 1], 'label': (B,) int32}, B = the local batch
  (numpy), or global jax arrays of the global batch when built with a sharding.
  Attributes: step, num_skipped, local_batch_size, num_local_examples.
  """

  def __init__(self, source, cfg, *, local_batch_size: int, seed: int, start_step: int,
               sharding=None):
    if seed < 0 or start_step < 0:
      raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0")
    self._source, self._sharding, self._seed = source, sharding, int(seed)
    self._size, self._fracs = int(cfg.image_size), (cfg.min_crop_frac, cfg.max_crop_frac)
    self._flip, self._skip = bool(cfg.flip), bool(cfg.skip_corrupt)
    self.local_batch_size, self.num_local_examples = local_batch_size, source.num_local
    self.step, self.num_skipped = int(start_step), 0
    self._worker = _Worker(int(cfg.num_workers))
    self._stream = self._records(self.step * local_batch_size)

  def _records(self, position: int) -> Iterator[tuple[int, Record]]:
    n = self.num_local_examples
    epoch, offset = divmod(position, n)
    while True:
      count = offset
      for rec in self._source.iter_records(epoch, offset, self._seed, shuffle=True):
        yield epoch, rec
        count += 1
      if count != n:
        raise RuntimeError(f"epoch {epoch} of the local shard held {count} examples, expected "
                           f"{n}: the dataset changed while reading")
      epoch, offset = epoch + 1, 0

  def _transform(self, item):
    epoch, rec = item
    rgb = self._source.load(rec)
    rng = np.random.default_rng([self._seed, _AUG, epoch, rec.key])
    return transforms.train_transform(rgb, self._size, rng, min_crop_frac=self._fracs[0],
                                      max_crop_frac=self._fracs[1], flip=self._flip)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    items = list(itertools.islice(self._stream, self.local_batch_size))
    outs = self._worker.map(self._transform, items)
    labels = [rec.label for _, rec in items]
    bad = [i for i, o in enumerate(outs) if isinstance(o, Exception)]
    if bad:
      if not self._skip:
        raise _corrupt_error(items[bad[0]][1], outs[bad[0]]) from outs[bad[0]]
      good = [i for i in range(len(outs)) if i not in set(bad)]
      if not good:
        raise CorruptImageError(f"every image of local batch {self.step} is unreadable, e.g. "
                                f"{items[0][1].name}: {outs[0]}")
      for i in bad:
        logging.warning("skipping corrupt image %s: %s", items[i][1].name, outs[i])
        j = next((g for g in good if g > i), good[0])
        outs[i], labels[i] = outs[j], labels[j]
      self.num_skipped += len(bad)
    batch = {"image": np.stack(outs), "label": np.asarray(labels, np.int32)}
    self.step += 1
    return to_global(batch, self._sharding)

  def close(self):
    self._worker.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def make_train_iterator(cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                        sharding=None, process_index: int | None = None,
                        process_count: int | None = None) -> TrainIterator:
  """The train stream of this process, positioned at batch `start_step`.

  Args:
    cfg: the input ConfigDict (`default_input_config`), or a config with an `input` field.
    global_batch_size: batch over all processes; must divide by the process count.
    seed: non-negative; fixes the order and the augmentations.
    start_step: batches already consumed (resume): the iterator yields batch start_step next.
    sharding: a NamedSharding whose first spec entry is the batch axes; None -> numpy batches.
    process_index / process_count: default jax's (overridable to simulate hosts in tests).

  Returns:
    A `TrainIterator` yielding {'image': (B, S, S, 3) f32 in [-1, 1], 'label': (B,) int32}.
  """
  cfg = _input_cfg(cfg)
  pi, pc = _process(process_index, process_count)
  shards = int(cfg.get("data_shards", 0)) or pc
  if shards % pc:
    raise ValueError(f"input.data_shards={shards} is not a multiple of the {pc} processes")
  local = _local_batch(global_batch_size, shards)
  iterators = []
  for shard in range(pi * (shards // pc), (pi + 1) * (shards // pc)):
    source = _open_source(cfg, train=True, pi=shard, pc=shards)
    if source.num_local == 0:
      raise ValueError(f"data shard {shard} of {shards} gets no examples of {cfg.dataset} "
                       f"{cfg.split}")
    iterators.append(TrainIterator(source, cfg, local_batch_size=local, seed=seed,
                                   start_step=start_step,
                                   sharding=sharding if len(iterators) == 0 and shards == pc
                                   else None))
  if len(iterators) == 1 and shards == pc:
    return iterators[0]
  return _ConcatIterator(iterators, sharding)


class _ConcatIterator:
  """Several shard iterators of one process, concatenated along the batch (shard order)."""

  def __init__(self, iterators, sharding):
    self._iterators, self._sharding = iterators, sharding
    self.local_batch_size = sum(it.local_batch_size for it in iterators)

  @property
  def step(self) -> int:
    return self._iterators[0].step

  @property
  def num_skipped(self) -> int:
    return sum(it.num_skipped for it in self._iterators)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(it) for it in self._iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return to_global(batch, self._sharding)

  def close(self):
    for it in self._iterators:
      it.close()


class EvalBatches:
  """Re-iterable eval batches, padded so every process runs `num_batches` of them.

  Each batch: {'image': (B, S, S, 3) f32 in [-1, 1] (centre crop), 'label': (B,) int32,
  '_mask': (B,) bool}, padding (zeros) and skipped corrupt images having `_mask` False.
  Attributes: num_batches (same on every process), num_examples (all processes), num_skipped.
  """

  def __init__(self, source, cfg, *, local_batch_size: int, sharding=None):
    self._source, self._sharding, self._size = source, sharding, int(cfg.image_size)
    self._skip = bool(cfg.skip_corrupt)
    self.local_batch_size = local_batch_size
    self.num_examples = int(sum(source.counts))
    self.num_batches = math.ceil(max(source.counts) / local_batch_size)
    self.num_skipped = 0
    self._num_workers = int(cfg.num_workers)

  def __len__(self) -> int:
    return self.num_batches

  def _transform(self, rec: Record) -> np.ndarray:
    return transforms.eval_transform(self._source.load(rec), self._size)

  def __iter__(self) -> Iterator[dict]:
    b, s = self.local_batch_size, self._size
    records = self._source.iter_records(0, 0, 0, shuffle=False)
    worker = _Worker(self._num_workers)
    try:
      for _ in range(self.num_batches):
        recs = list(itertools.islice(records, b))
        outs = worker.map(self._transform, recs)
        image = np.zeros((b, s, s, 3), np.float32)
        label = np.zeros((b,), np.int32)
        mask = np.zeros((b,), bool)
        for i, (rec, out) in enumerate(zip(recs, outs)):
          if isinstance(out, Exception):
            if not self._skip:
              raise _corrupt_error(rec, out) from out
            logging.warning("skipping corrupt eval image %s: %s", rec.name, out)
            self.num_skipped += 1
            continue
          image[i], label[i], mask[i] = out, rec.label, True
        yield to_global({"image": image, "label": label, "_mask": mask}, self._sharding)
    finally:
      worker.close()


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
  source = _open_source(cfg, train=False, pi=pi, pc=pc)
  return EvalBatches(source, cfg, local_batch_size=local, sharding=sharding)
