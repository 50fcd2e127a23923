"""Code extraction: a trained tokenizer over a dataset, once, into a codes folder.

`extract(tok, config, out)` writes `data/codes.py`'s layout: the dataset is cut into
`config.num_shards` fixed shards (each read as one of `num_shards` readers of the split, so the
layout does not depend on the process count); process p writes the shards s with
s % process_count == p, each as one ArrayRecord file completed by its marker; then process 0
writes codes.json. A re-run keeps the finished shards and redoes the rest; a folder made with
other settings or another tokenizer is refused (`extract.json` records the settings).
Variants per example: "none", "flip" (original, h-flip) or "ten_crop" (torchvision TenCrop of a
centre crop at `ten_crop_range` x the size), as LlamaGen's extractor.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from vfmtok_jax import distributed
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import codes as codes_lib
from vfmtok_jax.data import input_pipeline

SETTINGS_JSON = "extract.json"
VARIANTS = {"none": 1, "flip": 2, "ten_crop": 10}


def five_crops(images: np.ndarray, size: int) -> list[np.ndarray]:
  """torchvision `five_crop` order: top-left, top-right, bottom-left, bottom-right, centre."""
  h, w = images.shape[1:3]
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return [images[:, :size, :size], images[:, :size, w - size:],
          images[:, h - size:, :size], images[:, h - size:, w - size:],
          images[:, top:top + size, left:left + size]]


def variant_images(images: np.ndarray, variants: str, size: int) -> np.ndarray:
  """(B, H, W, 3) crops -> (B, V, size, size, 3): variant 0 the original crop."""
  flip = lambda x: x[:, :, ::-1]  # noqa: E731
  if variants == "none":
    out = [images]
  elif variants == "flip":
    out = [images, flip(images)]
  elif variants == "ten_crop":
    out = five_crops(images, size) + five_crops(flip(images), size)
  else:
    raise ValueError(f"variants {variants!r}: expected one of {sorted(VARIANTS)}")
  return np.stack(out, axis=1)


def _settings(config, tok_path: str, fingerprint: str, tok) -> dict:
  return {"tokenizer": {"path": os.path.abspath(tok_path), "fingerprint": fingerprint},
          "codebook_size": tok.model.codebook_size, "num_tokens": tok.model.num_queries,
          "input": config.input.to_dict(), "split": config.split, "variants": config.variants,
          "ten_crop_range": config.ten_crop_range, "num_shards": config.num_shards}


def _check_or_record(out: str, settings: dict) -> None:
  path = os.path.join(out, SETTINGS_JSON)
  if os.path.isfile(path):
    with open(path) as f:
      old = json.load(f)
    if old != settings:
      diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
      raise codes_lib.CodesError(f"{out} holds codes extracted with other settings ({diff}); "
                                 "use another --out or delete it")
    return
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(settings, f, indent=1)
    os.replace(path + ".tmp", path)


def extract(tok, config, out: str, *, tok_path: str) -> codes_lib.CodesInfo:
  """Extracts (or finishes extracting) the codes of `config` into `out`; returns codes.json."""
  if config.variants not in VARIANTS:
    raise ValueError(f"variants {config.variants!r}: expected one of {sorted(VARIANTS)}")
  if config.num_shards < 1 or config.batch_size < 1:
    raise ValueError(f"num_shards {config.num_shards} and batch_size {config.batch_size} must "
                     "be positive")
  size = tok.model.image_size
  fingerprint = tokenizer_io.fingerprint(tok)
  settings = _settings(config, tok_path, fingerprint, tok)
  os.makedirs(out, exist_ok=True)
  distributed.barrier("vfmtok_extract_start")
  _check_or_record(out, settings)
  distributed.barrier("vfmtok_extract_settings")
  input_cfg = config.input.copy_and_resolve_references()
  input_cfg.image_size = (int(size * config.ten_crop_range) if config.variants == "ten_crop"
                          else size)
  n_var, shards = VARIANTS[config.variants], config.num_shards
  pi, pc = jax.process_index(), jax.process_count()
  start = time.time()
  for shard in range(pi, shards, pc):
    name = codes_lib.shard_name(shard, shards)
    if codes_lib.finished_shard(out, name) is not None:
      print(f"{name}: finished earlier, kept", flush=True)
      continue
    batches = input_pipeline.make_eval_batches(
        input_cfg, global_batch_size=config.batch_size * shards, split=config.split,
        process_index=shard, process_count=shards)
    writer = codes_lib.ShardWriter(out, name)
    for batch in batches:
      keep = batch["_mask"]
      if not keep.any():
        continue
      images = variant_images(batch["image"][keep], config.variants, size)
      b = images.shape[0]
      indices = np.asarray(tok.encode(images.reshape(b * n_var, size, size, 3)))
      indices = indices.reshape(b, n_var, -1)
      for label, codes in zip(batch["label"][keep], indices):
        writer.write(int(label), codes)
    writer.close()
    print(f"{name}: {writer.count} examples x {n_var} variants "
          f"({time.time() - start:.0f} s so far)", flush=True)
  distributed.barrier("vfmtok_extract_done")
  counts, max_label = [], -1
  for shard in range(shards):
    name = codes_lib.shard_name(shard, shards)
    done = codes_lib.finished_shard(out, name)
    if done is None:
      raise codes_lib.CodesError(f"{out}: shard {name} did not finish")
    counts.append((name + ".arrayrecord", int(done["count"])))
    max_label = max(max_label, int(done["max_label"]))
  info = codes_lib.CodesInfo(
      num_tokens=tok.model.num_queries, num_variants=n_var, variants=config.variants,
      codebook_size=tok.model.codebook_size, num_classes=max_label + 1,
      tokenizer=settings["tokenizer"],
      source={"dataset": input_cfg.dataset, "split": config.split, "image_size": size},
      shards=tuple(counts))
  if jax.process_index() == 0:
    codes_lib.write_info(out, info)
  distributed.barrier("vfmtok_extract_info")
  return info
