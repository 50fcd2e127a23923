"""Linear probe of frozen features: how much class information the tokens carry.

Features per image (centre crops of a dataset split, as the tokenizer evaluation reads them):
  vfm    the frozen VFM's final-norm class token (FD-DINOv2's protocol: PIL bicubic to 224);
  slots  the tokenizer's region tokens before quantisation (B, n, dim), pooled;
  codes  the quantised, L2-normalised code vectors (B, n, e), pooled;
pooled by "mean" over the tokens or "flatten" (token order kept). An L2-regularised logistic
regression (`evaluators/linear_probe.py`) is fitted on the train split's features and its top-1
is reported on the eval split. Batches are padded and masked; each process extracts its rows
and the features are gathered, so every process fits the same probe.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from vfmtok_jax import distributed
from vfmtok_jax import sharding as shd
from vfmtok_jax import vfmtok
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.evaluators import linear_probe
from vfmtok_jax.evaluators import vfm_features
from vfmtok_jax.models import tokenizer as tokenizer_lib

FEATURES = ("vfm", "slots", "codes")
POOLS = ("mean", "flatten")


def _pool(tokens: jax.Array, pool: str) -> jax.Array:
  return tokens.mean(axis=1) if pool == "mean" else tokens.reshape(tokens.shape[0], -1)


def token_features_fn(tok: vfmtok.VFMTok, which: str, pool: str) -> Callable:
  """(params, vfm_params, images in [-1, 1]) -> {"features": (B, D)} for slots / codes."""
  key = {"slots": "slots", "codes": "quant"}[which]

  def fn(params, vfm_params, images):
    f = tok.features(vfm_params, images)
    enc = tok.model.apply({"params": params}, f["levels"], f["grids"],
                          method=tokenizer_lib.VFMTokenizer.encode)
    return {"features": _pool(enc[key].astype(np.float32), pool)}
  return fn


def extract(tok: vfmtok.VFMTok, batches, *, which: str, pool: str, mesh,
            log: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray]:
  """(features (N, D), labels (N,)) of every real example of `batches`, on every process."""
  if which not in FEATURES or pool not in POOLS:
    raise ValueError(f"features {which!r} / pool {pool!r}: expected one of {FEATURES} / {POOLS}")
  if which == "vfm":
    embed = vfm_features.VFMFeatures(tok.vfm)
  else:
    fn = jax.jit(token_features_fn(tok, which, pool))
    replicated = shd.replicated(mesh)
    params = jax.device_put(tok.params, replicated)
    vfm_params = jax.device_put(tok.vfm.params, replicated)
  feats, labels = [], []
  t0 = time.perf_counter()
  for i, batch in enumerate(batches):
    mask = distributed.local_rows(batch["_mask"]).astype(bool)
    if which == "vfm":
      images = image_io.to_uint8(distributed.local_rows(batch["image"])[mask])
      feats.append(embed(images))
    else:
      out = fn(params, vfm_params, batch["image"])
      feats.append(distributed.local_rows(out["features"])[mask])
    labels.append(distributed.local_rows(batch["label"])[mask])
    if (i + 1) % 50 == 0 or i + 1 == len(batches):
      log(f"features: batch {i + 1}/{len(batches)}, {time.perf_counter() - t0:.0f} s")
  return (distributed.gather_rows(np.concatenate(feats).astype(np.float32)),
          distributed.gather_rows(np.concatenate(labels)))


def run(tok: vfmtok.VFMTok, cfg, *, devices=None, log: Callable[[str], None] = print) -> dict:
  """Fits on `cfg.train_input`, scores on `cfg.eval_input`; returns the record.

  `cfg.num_classes` 0: the largest label seen plus one.
  """
  mesh = shd.make_mesh({"data": -1}, devices)
  sets = {}
  for name in ("train", "eval"):
    input_cfg = input_pipeline.default_input_config(**cfg[f"{name}_input"].to_dict())
    if not input_cfg.image_size:
      input_cfg.image_size = tok.model.image_size
    batches = input_pipeline.make_eval_batches(input_cfg, global_batch_size=cfg.batch_size,
                                               sharding=shd.batch_sharding(mesh, 4))
    sets[name] = extract(tok, batches, which=cfg.features, pool=cfg.pool, mesh=mesh, log=log)
  num_classes = cfg.num_classes or int(max(sets["train"][1].max(), sets["eval"][1].max())) + 1
  probe = linear_probe.fit(*sets["train"], num_classes=num_classes, l2=cfg.l2,
                           max_iterations=cfg.max_iterations)
  record = {"features": cfg.features, "pool": cfg.pool, "dim": int(sets["train"][0].shape[1]),
            "train_examples": len(sets["train"][1]), "eval_examples": len(sets["eval"][1]),
            "train_top1": linear_probe.accuracy(probe, *sets["train"]),
            "top1": linear_probe.accuracy(probe, *sets["eval"]), "l2": cfg.l2,
            "iterations": probe.iterations, "loss": probe.loss, "chance": 1.0 / num_classes}
  log(f"linear probe on {cfg.features} ({cfg.pool}, {record['dim']}-d): top-1 "
      f"{100 * record['top1']:.2f} % on {record['eval_examples']} eval images "
      f"(train {100 * record['train_top1']:.2f} % on {record['train_examples']}; chance "
      f"{100 * record['chance']:.2f} %)")
  return record
