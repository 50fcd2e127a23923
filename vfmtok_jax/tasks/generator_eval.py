"""The reference's generator evaluation (`test_net.py` + the ADM evaluator), sharded.

N labels (uniform random from the seed as the reference, or N per class), sampled with the
KV-cache sampler over all devices and processes (row r's randomness depends on (seed, r) only);
decoded as `decode_codes_to_img` does (bicubic to the eval size without antialias, uint8); each
process decodes and scores its share of the samples and the Inception features are gathered;
then IS, FID, sFID, precision and recall against an ADM reference batch exactly as the ADM
evaluator computes them (`evaluators/suite.py`). The sampling settings are recorded with the
results; optionally FD in a VFM's space against the reference images.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import numpy as np

from vfmtok_jax import distributed
from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.evaluators import batches
from vfmtok_jax.evaluators import inception as inception_lib
from vfmtok_jax.evaluators import suite
from vfmtok_jax.evaluators import vfm_features
from vfmtok_jax.tasks import sampler
from vfmtok_jax.train import metric_writer


def settings_from_config(cfg) -> sampler.SamplingSettings:
  s = cfg.sampling
  return sampler.SamplingSettings(cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval,
                                  cfg_schedule=s.cfg_schedule, temperature=s.temperature,
                                  top_k=s.top_k, top_p=s.top_p)


def _in_chunks(images: np.ndarray, size: int):
  for start in range(0, len(images), size):
    yield images[start:start + size]


def own_features(images: np.ndarray, extract, chunk: int) -> dict[str, np.ndarray]:
  """Features of this process' images (in chunks of `chunk`), gathered over the processes."""
  parts = [extract(x) for x in _in_chunks(images, chunk)] or [extract(images)]
  return {k: distributed.gather_rows(np.concatenate([p[k] for p in parts])) for k in parts[0]}


def sample_images(model, params, tok, labels: np.ndarray, settings, *, seed: int,
                  batch_size: int, image_size: int, log: Callable[[str], None] = print,
                  devices=None):
  """(this process' uint8 images, their labels, throughput record) of all `labels`' samples,
  the rows split over `devices` (default: all)."""
  tokens, compile_s, sample_s, rows = sampler.generate_all(
      model, params, labels, settings, seed=seed, batch_size=batch_size, devices=devices)
  tps = rows * model.block_size / sample_s
  log(f"sampled {len(labels)} x {model.block_size} tokens: {tps:,.0f} tokens/s after "
      f"compilation ({compile_s:.1f} s compile + first batch)")
  lo, hi = input_pipeline.even_bounds(len(labels), jax.process_count(), jax.process_index())
  size = sampler.output_size(tok, image_size)
  images = sampler.decode_to_uint8(tok, tokens[lo:hi], size, batch_size=batch_size)
  return images, labels[lo:hi], {"tokens_per_sec": tps, "compile_sec": compile_s}


def run(model, params, tok, cfg, workdir: str, *, gpt_path: str = "",
        tok_path: str = "", extract=None, log: Callable[[str], None] = print,
        devices=None) -> dict:
  """Samples, scores against `cfg.ref_batch`, writes workdir/{results.json, metrics.jsonl,
  tensorboard/, samples.png[, samples.npz]}; returns the results (same on every process).

  `extract`: Inception features (uint8 -> {"pool", "spatial", "logits"}); default: loaded as
  `cfg.inception` says. `devices`: those sampling splits its rows over (default: all).
  """
  if not cfg.ref_batch:
    raise ValueError("set --config.ref_batch to an ADM reference batch (.npz), e.g. "
                     "VIRTUAL_imagenet256_labeled.npz")
  ref_info = batches.inspect(cfg.ref_batch)  # a missing or unreadable file fails before sampling
  if extract is None:
    net, net_params = inception_lib.load_inception(
        None if cfg.inception == "default" else cfg.inception)
    extract = inception_lib.InceptionFeatures(net, net_params)
  fd = None if cfg.fd_vfm == "off" else vfm_features.VFMFeatures(
      tok.vfm if cfg.fd_vfm == tok.vfm.source else vfm_zoo.load_vfm(cfg.fd_vfm),
      size=cfg.fd_size)
  labels = sampler.choose_labels(labels="", num=cfg.num_samples, per_class=cfg.per_class,
                                 num_classes=model.num_classes, seed=cfg.seed)
  settings = settings_from_config(cfg)
  images, own_labels, speed = sample_images(model, params, tok, labels, settings, seed=cfg.seed,
                                            batch_size=cfg.batch_size,
                                            image_size=cfg.image_size, log=log,
                                            devices=devices)
  chunk = cfg.batch_size
  sample_feats = own_features(images, extract, chunk)
  ref = suite.side_of_file(cfg.ref_batch, extract, chunk)
  results, why = suite.adm_metrics(ref, suite.Side("the samples", {}, sample_feats))
  fd_label = ""
  if fd is not None:
    fd_label = fd.label
    if ref_info.image_shape is None:
      why["fd_vfm"] = f"{cfg.ref_batch} has no images (arr_0)"
    else:
      mine = own_features(images, lambda x: {"e": fd(x)}, chunk)["e"]
      theirs = suite.features(batches.iter_images(cfg.ref_batch, chunk),
                              lambda x: {"e": fd(x)})["e"]
      results["fd_vfm"] = vfm_features.frechet_distance(mine, theirs)
  results["num_samples"] = float(len(labels))
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    writer = metric_writer.MetricWriter(workdir)
    writer.scalars(0, {f"eval/{k}": v for k, v in {**results, **speed}.items()})
    cols = min(8, len(images))
    if cols:
      grid = image_io.image_grid([images[i:i + cols]
                                  for i in range(0, min(len(images), 32) // cols * cols, cols)])
      writer.image(0, "eval/samples", grid)
      image_io.save_png(os.path.join(workdir, "samples.png"), grid)
    writer.close()
  if cfg.save_samples:  # the ADM sample format; one file per process
    name = ("samples.npz" if jax.process_count() == 1 else
            f"samples_{jax.process_index():03d}of{jax.process_count():03d}.npz")
    batches.save(os.path.join(workdir, name), images=images, labels=own_labels)
  record = {"results": results, "unavailable": why, "fd_vfm": fd_label,
            "sampling": dataclasses.asdict(settings), "seed": cfg.seed,
            "per_class": cfg.per_class, "ref_batch": os.path.abspath(cfg.ref_batch),
            "gpt": gpt_path, "tokenizer": tok_path, "speed": speed, "config": cfg.to_dict()}
  if jax.process_index() == 0:
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "results.json"))
  for line in suite.lines(results, why):
    log(line)
  if fd_label:
    log(f"{fd_label}: {results['fd_vfm']}" if "fd_vfm" in results
        else f"{fd_label}: unavailable ({why['fd_vfm']})")
  return results
