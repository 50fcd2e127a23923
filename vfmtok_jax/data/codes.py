"""Pre-extracted tokenizer codes: ArrayRecord shards, their reader and the AR train iterator.

Folder layout (written by `extract_codes`):
  DIR/codes.json                       what the codes are (see `CodesInfo`), written last
  DIR/shard-00003-of-00016.arrayrecord one record per example
  DIR/shard-00003-of-00016.json        {"count", "max_label"}: the shard is complete
A record is `label` (int32, little-endian) followed by `num_variants x num_tokens` codes
(uint16, little-endian): variant 0 is the original crop, then the augmentations (h-flip; or
the ten crops). Fixed-size raw integers: nothing in a file is ever unpickled or evaluated.

Order (`CodesIterator`, on Grain): the stream is the training examples (all N, or those
`split_held_out` leaves) shuffled anew each epoch from (seed, epoch) (Grain's `shuffle` then
`repeat`), and position i of the stream uses the variant drawn from (seed, i) (mode "all"; one
per example per epoch) or 0 (mode "first"). The global batch of step s is positions
s*B .. s*B + B - 1 of that stream, and process p reads rows [p*B/P, (p+1)*B/P) of it. So the
global batches depend on (seed, B) only, never on the process or device count, the step is the
iterator's whole state (the loop checkpoints it), and resuming at step s reads only batch s.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Sequence

import grain
import jax
import numpy as np
from array_record.python import array_record_module

from vfmtok_jax.data import input_pipeline

CODES_JSON = "codes.json"
CODE_DTYPE = np.dtype("<u2")
LABEL_DTYPE = np.dtype("<i4")
VARIANT_MODES = ("all", "first")
_ORDER, _VARIANT = 1, 2  # tags that separate the seed streams


class CodesError(ValueError):
  """A codes folder that is missing, incomplete or does not match what reads it."""


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}"


@dataclasses.dataclass(frozen=True)
class CodesInfo:
  """codes.json: the codes' shape and provenance."""
  num_tokens: int
  num_variants: int
  variants: str               # "none" | "flip" | "ten_crop"
  codebook_size: int
  num_classes: int
  tokenizer: dict             # {"path", "fingerprint"}: which tokenizer made the codes
  source: dict                # dataset, split, image size, ...
  shards: tuple               # ((file name, count), ...)

  @property
  def num_examples(self) -> int:
    return sum(c for _, c in self.shards)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["shards"] = [list(s) for s in self.shards]
    return out


def encode_record(label: int, codes: np.ndarray) -> bytes:
  """One example: label and (num_variants, num_tokens) codes -> bytes."""
  if codes.min() < 0 or codes.max() > np.iinfo(CODE_DTYPE).max:
    raise ValueError(f"codes outside [0, {np.iinfo(CODE_DTYPE).max}]")
  return np.asarray(label, LABEL_DTYPE).tobytes() + np.asarray(codes, CODE_DTYPE).tobytes()


def decode_records(records: Sequence[bytes], num_variants: int, num_tokens: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """bytes -> labels (n,) int32, codes (n, num_variants, num_tokens) int32."""
  size = LABEL_DTYPE.itemsize + num_variants * num_tokens * CODE_DTYPE.itemsize
  bad = [len(r) for r in records if len(r) != size]
  if bad:
    raise CodesError(f"a record of {bad[0]} bytes where {size} were expected "
                     f"({num_variants} variants x {num_tokens} tokens)")
  raw = np.frombuffer(b"".join(records), np.uint8).reshape(len(records), size)
  labels = raw[:, :4].copy().view(LABEL_DTYPE)[:, 0].astype(np.int32)
  codes = raw[:, 4:].copy().view(CODE_DTYPE).reshape(len(records), num_variants, num_tokens)
  return labels, codes.astype(np.int32)


class ShardWriter:
  """Writes one shard as `<name>.arrayrecord.tmp`, renamed and marked complete on `close`."""

  def __init__(self, folder: str, name: str):
    self.path = os.path.join(folder, name + ".arrayrecord")
    self._done = os.path.join(folder, name + ".json")
    self._tmp = self.path + ".tmp"
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, "group_size:1")
    self.count, self.max_label = 0, -1

  def write(self, label: int, codes: np.ndarray) -> None:
    self._writer.write(encode_record(label, codes))
    self.count += 1
    self.max_label = max(self.max_label, int(label))

  def close(self) -> None:
    self._writer.close()
    os.replace(self._tmp, self.path)
    with open(self._done + ".tmp", "w") as f:
      json.dump({"count": self.count, "max_label": self.max_label}, f)
    os.replace(self._done + ".tmp", self._done)


def finished_shard(folder: str, name: str) -> dict | None:
  """{"count", "max_label"} of a complete shard, or None when it is absent or unfinished."""
  done = os.path.join(folder, name + ".json")
  if not (os.path.isfile(done) and os.path.isfile(os.path.join(folder, name + ".arrayrecord"))):
    return None
  with open(done) as f:
    return json.load(f)


def write_info(folder: str, info: CodesInfo) -> None:
  tmp = os.path.join(folder, CODES_JSON + ".tmp")
  with open(tmp, "w") as f:
    json.dump(info.to_json(), f, indent=1)
  os.replace(tmp, os.path.join(folder, CODES_JSON))


def read_info(folder: str) -> CodesInfo:
  path = os.path.join(folder, CODES_JSON)
  if not os.path.isfile(path):
    raise CodesError(f"{folder} is not a (finished) codes folder: no {CODES_JSON}; make one "
                     "with `python -m vfmtok_jax.extract_codes` (a killed extraction resumes "
                     "when run again)")
  with open(path) as f:
    raw = json.load(f)
  try:
    raw["shards"] = tuple((str(n), int(c)) for n, c in raw["shards"])
    return CodesInfo(**raw)
  except (KeyError, TypeError, ValueError) as e:
    raise CodesError(f"{path}: not a codes description ({e})") from e


class CodesDataset:
  """Random access to the examples of a codes folder (global index 0 .. N-1, shard order),
  through Grain's ArrayRecord source (thread-safe, picklable)."""

  def __init__(self, folder: str):
    self.folder = folder
    self.info = read_info(folder)
    paths = []
    for name, count in self.info.shards:
      path = os.path.join(folder, name)
      if not os.path.isfile(path):
        raise CodesError(f"{folder}: shard {name} listed in {CODES_JSON} is missing")
      reader = array_record_module.ArrayRecordReader(path)
      found = reader.num_records()
      reader.close()
      if found != count:
        raise CodesError(f"{path} holds {found} records, {CODES_JSON} says {count}")
      paths.append(path)
    self.source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self.source)

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """labels (n,) int32 and codes (n, num_variants, num_tokens) int32 of global indices."""
    return decode_records([self.source[int(i)] for i in indices], self.info.num_variants,
                          self.info.num_tokens)

  def close(self) -> None:
    """Nothing to release: Grain's source opens its readers on demand."""


def split_held_out(num_examples: int, held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, held-out indices): `held_out` examples drawn from `default_rng([seed, 2])`."""
  if not 0 <= held_out < num_examples:
    raise CodesError(f"data.held_out {held_out}: expected 0 <= held_out < {num_examples} "
                     "(the examples in the codes folder)")
  perm = np.random.default_rng([seed, 2]).permutation(num_examples)
  return np.sort(perm[held_out:]), np.sort(perm[:held_out])


class _ReadVariant:
  """(stream position, index into the training examples) -> {'codes': (T,), 'label': ()}:
  reads the example and keeps the variant drawn from (seed, position). Picklable."""

  def __init__(self, dataset: CodesDataset, examples: np.ndarray, seed: int, mode: str):
    self._ds, self._examples, self._seed, self._mode = dataset, examples, seed, mode

  def variant(self, position: int) -> int:
    if self._mode == "first":
      return 0
    rng = np.random.default_rng([self._seed, _VARIANT, position])
    return int(rng.integers(self._ds.info.num_variants))

  def __call__(self, position: int, j: int) -> dict:
    labels, codes = self._ds.read([self._examples[j]])
    return {"codes": codes[0, self.variant(position)], "label": labels[0]}


class CodesIterator:
  """Global train batches {'codes': (B, T) int32, 'label': (B,) int32} from step `start_step`.

  See the module docstring for the order. `sharding`: a batch sharding to assemble global jax
  arrays from the process-local rows (None: this process's numpy rows).
  Attributes: step (batches produced so far: the whole state).
  """

  def __init__(self, dataset: CodesDataset, *, global_batch: int, seed: int, start_step: int = 0,
               variants: str = "all", examples: np.ndarray | None = None, sharding=None,
               process_index: int | None = None, process_count: int | None = None,
               num_threads: int = 2, prefetch: int = 4):
    """`examples`: the global indices to train on (default all; see `split_held_out`)."""
    if variants not in VARIANT_MODES:
      raise CodesError(f"data.variants {variants!r}: expected one of {VARIANT_MODES}")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if global_batch % pc:
      raise CodesError(f"batch {global_batch} is not divisible by {pc} processes")
    examples = (np.arange(len(dataset)) if examples is None else np.asarray(examples, np.int64))
    if len(examples) == 0:
      raise CodesError(f"{dataset.folder}: no examples to train on")
    self._examples, self._batch = examples, global_batch
    self._order = grain.MapDataset.range(len(examples)).shuffle(
        seed=input_pipeline.seed32(seed, _ORDER)).repeat()
    self._read = _ReadVariant(dataset, examples, seed, variants)
    ds = self._order.map_with_index(self._read).batch(global_batch // pc)
    ds = ds[pi::pc][start_step:]
    self._iter = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                                           prefetch_buffer_size=prefetch)))
    self._sharding = sharding
    self.step = start_step

  def global_indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices (B,), variants (B,)) of the global batch of `step` (reads nothing)."""
    positions = range(step * self._batch, (step + 1) * self._batch)
    return (self._examples[[self._order[p] for p in positions]],
            np.asarray([self._read.variant(p) for p in positions]))

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    batch = next(self._iter)
    self.step += 1
    return input_pipeline.to_global(batch, self._sharding)

  def close(self) -> None:
    self._iter.close()
