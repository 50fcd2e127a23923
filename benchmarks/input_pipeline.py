r"""Input pipeline speed: the Grain pipeline against the hand-written one it replaced, side by side.

  python benchmarks/input_pipeline.py [--images 384] [--restore_images 4096] [--batch 32]
                                      [--batches 8] [--rounds 3] [--json out.json]

Data, made here from the offline demo photos (nothing downloads): --images JPEGs of 500 x 375
(ImageNet's typical size, quality 90, random crops of the 12 photos) as an image folder, and
--restore_images of them as a tfds dataset prepared twice, in TFRecord (what the old pipeline
read) and in ArrayRecord (what Grain reads).
  * throughput: images/s of one host's train stream at 336 px (read, decode, the reference's ADM
    crop and flip, resize), --batches batches of --batch after a warm-up batch, medians over
    --rounds interleaved rounds. Old: its thread pool with 1 (in the calling thread) and 2
    threads. New: decoding in the training process (no threads, and 4 threads), and in 1 and 2
    worker processes.
  * restore: seconds from building the iterator at step k to its first batch, on the tfds
    dataset, for k = 10, 100,000 and the last batch of an epoch (the old pipeline skipped the
    epoch's records before k; Grain reads only batch k).
The old pipeline is `vfmtok_jax/data/input_pipeline.py` at commit {OLD}, read from this
checkout's git history.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OLD = "7346d0c"  # the last commit with the hand-written pipeline
__doc__ = __doc__.replace("{OLD}", OLD)

from benchmarks import run_all  # noqa: E402  pylint: disable=g-import-not-at-top
from vfmtok_jax.data import demo_photos  # noqa: E402  pylint: disable=g-import-not-at-top
from vfmtok_jax.data import input_pipeline as new_ip  # noqa: E402  pylint: disable=g-import-not-at-top

SIZE = 336


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=384, help="images of the throughput folder")
  parser.add_argument("--restore_images", type=int, default=4096,
                      help="examples per epoch of the restore datasets")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--batches", type=int, default=8, help="timed batches per measurement")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--json", default="")
  return parser.parse_args()


def old_pipeline():
  """The replaced module, from git history (a clear error without it)."""
  try:
    source = subprocess.run(["git", "show", f"{OLD}:vfmtok_jax/data/input_pipeline.py"],
                            cwd=ROOT, check=True, capture_output=True, text=True).stdout
  except (OSError, subprocess.CalledProcessError) as e:
    raise SystemExit(f"the old pipeline is read from git history (commit {OLD}); this checkout "
                     f"has none: {e}") from e
  path = os.path.join(tempfile.mkdtemp(), "old_input_pipeline.py")
  with open(path, "w") as f:
    f.write(source)
  spec = importlib.util.spec_from_file_location("old_input_pipeline", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules["old_input_pipeline"] = module
  spec.loader.exec_module(module)
  return module


def make_jpegs(n: int, seed: int = 0) -> list[tuple[bytes, int]]:
  """n (JPEG bytes, label) of 500 x 375 random crops of the demo photos."""
  rng = np.random.default_rng(seed)
  photos = [rgb for _, rgb in demo_photos.demo_photos()]
  out = []
  for i in range(n):
    label = i % len(photos)
    img = Image.fromarray(photos[label])
    scale = rng.uniform(0.6, 1.0)
    w, h = int(img.width * scale), int(img.height * scale)
    left, top = rng.integers(0, img.width - w + 1), rng.integers(0, img.height - h + 1)
    img = img.crop((left, top, left + w, top + h)).resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    out.append((buf.getvalue(), label))
  return out


def write_folder(root: str, jpegs) -> str:
  for i, (data, label) in enumerate(jpegs):
    d = os.path.join(root, "train", f"class{label:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{i:05d}.jpg"), "wb") as f:
      f.write(data)
  return root


@functools.lru_cache(maxsize=1)
def _builder_class():
  """The benchmark's tfds builder (registered once); examples from its `jpegs` attribute."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class VfmtokBenchImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    jpegs = ()

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
          "label": tfds.features.ClassLabel(num_classes=12)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i, (data, label) in enumerate(self.jpegs):
        yield i, {"image": np.asarray(Image.open(io.BytesIO(data))), "label": label}

  return VfmtokBenchImages


def prepare_tfds(data_dir: str, jpegs, file_format: str) -> None:
  builder = _builder_class()
  builder.jpegs = tuple(jpegs)
  builder(data_dir=data_dir).download_and_prepare(file_format=file_format)


def _iterator(module, cfg, batch, start_step=0):
  return module.make_train_iterator(cfg, global_batch_size=batch, seed=0, start_step=start_step,
                                    process_index=0, process_count=1)


def throughput(module, cfg, batch: int, batches: int) -> float:
  it = _iterator(module, cfg, batch)
  try:
    next(it)  # warm-up: workers started, first reads
    t = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batch * batches / (time.perf_counter() - t)
  finally:
    it.close()


def restore_seconds(module, cfg, batch: int, step: int) -> float:
  t = time.perf_counter()
  it = _iterator(module, cfg, batch, start_step=step)
  try:
    next(it)
    return time.perf_counter() - t
  finally:
    it.close()


def main():
  args = _parse()
  old_ip = old_pipeline()
  work = tempfile.mkdtemp(prefix="vfmtok_input_bench_")
  t = time.perf_counter()
  jpegs = make_jpegs(max(args.images, args.restore_images))
  folder = write_folder(os.path.join(work, "folder"), jpegs[:args.images])
  for fmt in ("tfrecord", "array_record"):
    prepare_tfds(os.path.join(work, fmt), jpegs[:args.restore_images], fmt)
  print(f"JPEGs of 500 x 375 ({sum(len(d) for d, _ in jpegs) / len(jpegs) / 1e3:.0f} kB each): "
        f"a folder of {args.images}, two tfds datasets of {args.restore_images}, made in "
        f"{time.perf_counter() - t:.0f} s")

  variants = {
      "old, 1 thread (in the calling thread)": (old_ip, dict(num_workers=1)),
      "old, 2 threads": (old_ip, dict(num_workers=2)),
      "new, in-process, no threads": (new_ip, dict(num_workers=0, num_threads=0)),
      "new, in-process, 4 threads": (new_ip, dict(num_workers=0, num_threads=4)),
      "new, 1 worker process": (new_ip, dict(num_workers=1)),
      "new, 2 worker processes": (new_ip, dict(num_workers=2)),
  }
  rates = {name: [] for name in variants}
  for _ in range(args.rounds):
    for name, (module, kw) in variants.items():
      cfg = module.default_input_config(f"folder:{folder}", image_size=SIZE, **kw)
      rates[name].append(throughput(module, cfg, args.batch, args.batches))
  cpu = run_all.cpu_model()
  print(f"images/s at {SIZE} px, batch {args.batch}, medians of {args.rounds} rounds of "
        f"{args.batches} batches ({cpu}, {len(os.sched_getaffinity(0))} cores):")
  for name, r in rates.items():
    print(f"  {name:40s}{statistics.median(r):8.1f}   {[round(x, 1) for x in r]}")

  per_epoch = args.restore_images // args.batch
  steps = {"10": 10, "100,000": 100_000, f"{per_epoch - 1} (last batch of epoch 0)": per_epoch - 1}
  restore = {}
  for label, (module, data_dir, kw) in {
      "old (TFRecord, skips to the position)": (old_ip, os.path.join(work, "tfrecord"),
                                                 dict(num_workers=2, shuffle_buffer=64)),
      "new (ArrayRecord, Grain)": (new_ip, os.path.join(work, "array_record"), {})}.items():
    cfg = module.default_input_config("tfds:vfmtok_bench_images", image_size=SIZE,
                                      data_dir=data_dir, **kw)
    restore[label] = {}
    for name, step in steps.items():
      times = [restore_seconds(module, cfg, args.batch, step) for _ in range(args.rounds)]
      restore[label][name] = statistics.median(times)
  print(f"restore: seconds to the first batch when resuming at step k (batch {args.batch}, "
        f"{args.restore_images} examples per epoch; the old pipeline reads the k * batch mod "
        f"{args.restore_images} records before the position, Grain none):")
  for label, row in restore.items():
    print(f"  {label:40s}" + "".join(f"  k={k}: {v:.2f} s" for k, v in row.items()))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"images_per_s": {k: statistics.median(v) for k, v in rates.items()},
                 "runs": rates, "restore_s": restore, "cpu": cpu, "images": args.images,
                 "batch": args.batch}, f, indent=1)


if __name__ == "__main__":
  main()
