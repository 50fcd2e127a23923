"""The reference's tokenizer evaluation (`vqgan_test.py`), sharded over devices and processes.

For every image of the split: the centre crop (`center_crop_arr`, `input_pipeline.EvalBatches`),
encoded with the tokenizer's weights (a tokenizer folder holds the EMA weights) and decoded
from the code indices; the input and the reconstruction both to uint8 as the reference does
(`clamp(127.5 x + 128)`, truncating cast), then each resized to `eval_size` with PIL's bicubic
(336 -> 256 in the paper's protocol). On those pairs:
  psnr, ssim, ssim_reference   per image, averaged (`evaluators/recon.py`);
  lpips                        per image, averaged (with LPIPS weights);
  rfid, ris                    FID(reconstructions, inputs) and IS of the reconstructions with
                               the ADM Inception (with its weights);
  fd_vfm                       Fréchet distance of the two sets in a VFM's embedding space
                               (FD-DINOv2 with DINOv2 weights; labelled by the tower);
  codebook_usage / _perplexity / _unused   over all the split's code indices.
Batches are padded to one size and masked (`_mask`), so no image is dropped or counted twice
whatever the batch size and device count; each process scores its own rows and the per-image
values, features and code counts are gathered at the end.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import distributed
from vfmtok_jax import sharding as shd
from vfmtok_jax import vfm_zoo
from vfmtok_jax import vfmtok
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batched
from vfmtok_jax.evaluators import inception as inception_lib
from vfmtok_jax.evaluators import recon
from vfmtok_jax.evaluators import vfm_features
from vfmtok_jax.losses import lpips as lpips_lib
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.train import metric_writer

PER_IMAGE = ("psnr", "ssim", "ssim_reference", "lpips")


@dataclasses.dataclass
class Scorers:
  """What to score with; a missing scorer's metrics are reported unavailable with the reason.

  inception: uint8 images -> {"pool", "logits", ...} (`evaluators.inception.InceptionFeatures`).
  fd: `evaluators.vfm_features.VFMFeatures`.
  lpips: (uint8 a, uint8 b) -> (N,) distances.
  why_missing: {"inception" | "fd" | "lpips": reason} for the ones left out.
  """
  inception: Callable[[np.ndarray], dict] | None = None
  fd: vfm_features.VFMFeatures | None = None
  lpips: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
  why_missing: dict[str, str] = dataclasses.field(default_factory=dict)


def lpips_scorer(model, params, *, batch_size: int = 32):
  """(uint8 a, uint8 b) -> (N,) LPIPS of the pairs read as [-1, 1] images."""
  def fn(p, a, b):
    signed = lambda x: x.astype(jnp.float32) / 127.5 - 1.0  # noqa: E731
    return {"lpips": model.apply({"params": p}, signed(a), signed(b))}
  apply = batched.PaddedApply(fn, params, batch_size=batch_size)
  return lambda a, b: apply(a, b)["lpips"]


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] -> uint8 as the reference: clamp(127.5 x + 128, 0, 255), then truncate."""
  return jnp.clip(images.astype(jnp.float32) * 127.5 + 128.0, 0.0, 255.0).astype(jnp.uint8)


def reconstruct_fn(tok: vfmtok.VFMTok) -> Callable:
  """(params, vfm_params, images in [-1, 1]) -> {"input", "recon": uint8, "indices"}."""
  def fn(params, vfm_params, images):
    f = tok.features(vfm_params, images)
    enc = tok.model.apply({"params": params}, f["levels"], f["grids"],
                          method=tokenizer_lib.VFMTokenizer.encode)
    out = tok.model.apply({"params": params}, enc["indices"],
                          method=tokenizer_lib.VFMTokenizer.decode_indices)
    return {"input": to_uint8(images), "recon": to_uint8(out), "indices": enc["indices"]}
  return fn


def _pairs_fn(_, a, b):
  return recon.pair_metrics(a, b)


@functools.lru_cache(maxsize=8)
def _pair_metrics(batch_size: int) -> batched.PaddedApply:
  """One compiled per-image metrics program per batch size, shared by every evaluation."""
  return batched.PaddedApply(_pairs_fn, (), batch_size=batch_size)


class ReconAccumulator:
  """Scores uint8 (input, reconstruction) pairs batch by batch; `result()` over all processes."""

  def __init__(self, scorers: Scorers, *, codebook_size: int, batch_size: int = 64):
    self.scorers = scorers
    self._pairs = _pair_metrics(batch_size)
    self._per_image: dict[str, list] = {k: [] for k in PER_IMAGE}
    self._feats: dict[str, list] = {}
    self.counts = np.zeros(codebook_size, np.int64)
    self.num_examples = 0

  def _keep(self, key: str, value: np.ndarray) -> None:
    self._feats.setdefault(key, []).append(np.asarray(value, np.float32))

  def add(self, inputs: np.ndarray, recons: np.ndarray, indices: np.ndarray) -> None:
    """Real (unpadded) rows of this process: uint8 (n, S, S, 3) pairs and (n, T) indices."""
    if not len(inputs):
      return
    self.num_examples += len(inputs)
    self.counts += np.bincount(np.asarray(indices).ravel(), minlength=len(self.counts))
    for k, v in self._pairs(recons, inputs).items():
      self._per_image[k].append(v)
    if self.scorers.lpips is not None:
      self._per_image["lpips"].append(self.scorers.lpips(recons, inputs))
    if self.scorers.inception is not None:
      r, i = self.scorers.inception(recons), self.scorers.inception(inputs)
      self._keep("recon_pool", r["pool"])
      self._keep("recon_logits", r["logits"])
      self._keep("input_pool", i["pool"])
    if self.scorers.fd is not None:
      self._keep("recon_fd", self.scorers.fd(recons))
      self._keep("input_fd", self.scorers.fd(inputs))

  def _gathered(self, parts: list, width: tuple = ()) -> np.ndarray:
    local = np.concatenate(parts) if parts else np.zeros((0, *width), np.float32)
    return distributed.gather_rows(local)

  def result(self) -> tuple[dict[str, float], dict[str, str]]:
    """({metric: value}, {metric: why unavailable}); the same on every process."""
    results: dict[str, float] = {}
    why = {}
    n = int(distributed.gather_rows(np.asarray([self.num_examples])).sum())
    results["num_examples"] = float(n)
    for k in PER_IMAGE:
      if k == "lpips" and self.scorers.lpips is None:
        why[k] = self.scorers.why_missing.get("lpips", "no LPIPS weights")
        continue
      values = self._gathered(self._per_image[k])
      if len(values):
        results[k] = float(np.mean(values.astype(np.float64)))
    counts = distributed.gather_rows(self.counts[None]).sum(0)
    probs = counts / max(counts.sum(), 1)
    nz = probs[probs > 0]
    results["codebook_usage"] = float((counts > 0).mean())
    results["codebook_unused"] = float((counts == 0).sum())
    results["codebook_perplexity"] = float(np.exp(-(nz * np.log(nz)).sum()))
    if self.scorers.inception is None:
      why["rfid"] = why["ris"] = self.scorers.why_missing.get("inception", "no Inception")
    else:
      rec, inp = (self._gathered(self._feats.get(k, []), (2048,))
                  for k in ("recon_pool", "input_pool"))
      try:
        results["rfid"] = adm.frechet_distance(adm.statistics(rec), adm.statistics(inp))
      except ValueError as e:
        why["rfid"] = str(e)
      logits = self._gathered(self._feats.get("recon_logits", []), (1008,))
      results["ris"] = adm.inception_score(logits) if len(logits) else float("nan")
    if self.scorers.fd is None:
      why["fd_vfm"] = self.scorers.why_missing.get("fd", "no VFM for FD")
    else:
      rec, inp = (self._gathered(self._feats.get(k, [])) for k in ("recon_fd", "input_fd"))
      try:
        results["fd_vfm"] = vfm_features.frechet_distance(rec, inp)
      except ValueError as e:
        why["fd_vfm"] = str(e)
    return results, why


def evaluate(tok: vfmtok.VFMTok, batches, scorers: Scorers, *, mesh, eval_size: int = 256,
             grid_images: int = 8, log: Callable[[str], None] = print,
             log_every_s: float = 30.0) -> tuple[dict, dict, np.ndarray | None]:
  """Scores a tokenizer on eval batches (`input_pipeline.make_eval_batches` on `mesh`).

  Returns (results, why unavailable, a uint8 grid of the first inputs above their
  reconstructions at `eval_size`, or None without examples).
  """
  fn = jax.jit(reconstruct_fn(tok))
  replicated = shd.replicated(mesh)
  params = jax.device_put(tok.params, replicated)
  vfm_params = jax.device_put(tok.vfm.params, replicated)
  acc = ReconAccumulator(scorers, codebook_size=tok.model.codebook_size)
  shown_in, shown_rec = [], []
  t0 = last = time.perf_counter()
  total = len(batches)
  for i, batch in enumerate(batches):
    out = fn(params, vfm_params, batch["image"])
    mask = distributed.local_rows(batch["_mask"]).astype(bool)
    inputs = distributed.local_rows(out["input"])[mask]
    recons = distributed.local_rows(out["recon"])[mask]
    if eval_size:
      inputs, recons = image_io.pil_resize(inputs, eval_size), image_io.pil_resize(recons,
                                                                                    eval_size)
    acc.add(inputs, recons, distributed.local_rows(out["indices"])[mask])
    if sum(len(x) for x in shown_in) < grid_images:
      shown_in.append(inputs)
      shown_rec.append(recons)
    now = time.perf_counter()
    if now - last >= log_every_s or i + 1 == total:
      rate = (i + 1) / (now - t0)
      eta = (total - i - 1) / rate if rate > 0 else float("inf")
      log(f"eval batch {i + 1}/{total}: {acc.num_examples} images on this process, "
          f"{rate:.2f} batches/s, ETA {eta:.0f} s")
      last = now
  results, why = acc.result()
  grid = None
  if shown_in:
    grid = image_io.image_grid([np.concatenate(shown_in)[:grid_images],
                                np.concatenate(shown_rec)[:grid_images]])
  return results, why, grid


# ------------------------------------------------------------------------------------------------
# The eval_tokenizer command line (configs/eval_tokenizer.py).
# ------------------------------------------------------------------------------------------------

# Printed order and names of the results table.
TABLE = (("rfid", "rFID"), ("ris", "rIS"), ("psnr", "PSNR (dB)"), ("ssim", "SSIM"),
         ("ssim_reference", "SSIM, data_range 2.0 (the reference's)"), ("lpips", "LPIPS"),
         ("fd_vfm", "FD-VFM"), ("codebook_usage", "codebook usage"),
         ("codebook_perplexity", "codebook perplexity"), ("num_examples", "images"))


def scorers_from_config(cfg, tok: vfmtok.VFMTok | None = None) -> Scorers:
  """The scorers `cfg` asks for (fields `inception`, `fd_vfm`, `fd_size`, `lpips`, `lpips_lin`).

  A "default" or explicit weights path that does not exist raises FileNotFoundError with the
  loader's help text; "off" leaves the metric out with that reason.
  """
  s = Scorers()
  if cfg.inception == "off":
    s.why_missing["inception"] = "Inception turned off (inception=off)"
  else:
    model, params = inception_lib.load_inception(
        None if cfg.inception == "default" else cfg.inception)
    s.inception = inception_lib.InceptionFeatures(model, params)
  if cfg.fd_vfm == "off":
    s.why_missing["fd"] = "FD turned off (fd_vfm=off)"
  else:
    same = tok is not None and cfg.fd_vfm in ("default", tok.vfm.source) and (
        cfg.fd_vfm != "default" or tok.vfm.source == vfm_zoo.default_onnx_path())
    vfm = tok.vfm if same else vfm_zoo.load_vfm(cfg.fd_vfm)
    s.fd = vfm_features.VFMFeatures(vfm, size=cfg.fd_size)
  if cfg.lpips == "off":
    s.why_missing["lpips"] = "LPIPS turned off (lpips=off)"
  else:
    model, params = lpips_lib.load_lpips(None if cfg.lpips == "default" else cfg.lpips,
                                         cfg.lpips_lin or None)
    s.lpips = lpips_scorer(model, params)
  return s


def table(results: dict, why: dict, fd_label: str = "") -> str:
  """The results as aligned text lines (unavailable metrics with their reason)."""
  lines = []
  for key, name in TABLE:
    if key == "fd_vfm" and fd_label:
      name = fd_label
    if key in results:
      value = results[key]
      text = f"{value:.0f}" if key == "num_examples" else f"{value:.4f}"
    elif key in why:
      text = f"unavailable ({why[key]})"
    else:
      continue
    lines.append(f"{name:<40} {text}")
  return "\n".join(lines)


def run(tok: vfmtok.VFMTok, cfg, workdir: str, *, tok_path: str = "",
        devices=None) -> dict:
  """Scores `tok` as `cfg` says and writes workdir/{results.json, metrics.jsonl, tensorboard/,
  recon.png}; returns the results (same on every process)."""
  input_cfg = input_pipeline.default_input_config(**cfg.input.to_dict())
  if not input_cfg.image_size:
    input_cfg.image_size = tok.model.image_size
  if input_cfg.image_size != tok.model.image_size:
    raise ValueError(f"input.image_size {input_cfg.image_size} is not the tokenizer's "
                     f"{tok.model.image_size} px")
  scorers = scorers_from_config(cfg, tok)
  mesh = shd.make_mesh({"data": -1}, devices)
  batches = input_pipeline.make_eval_batches(input_cfg, global_batch_size=cfg.batch_size,
                                             sharding=shd.batch_sharding(mesh, 4))
  print(f"evaluating {tok_path or 'the tokenizer'} on {batches.num_examples} images of "
        f"{input_cfg.dataset} ({input_cfg.eval_split}), {len(batches)} batches of "
        f"{cfg.batch_size}", flush=True)
  results, why, grid = evaluate(tok, batches, scorers, mesh=mesh, eval_size=cfg.eval_size,
                                grid_images=cfg.grid_images,
                                log=lambda m: print(m, flush=True))
  if batches.num_skipped:
    results["num_skipped_corrupt"] = float(batches.num_skipped)
  fd_label = scorers.fd.label if scorers.fd is not None else ""
  if jax.process_index() == 0:
    writer = metric_writer.MetricWriter(workdir)
    writer.scalars(0, {f"eval/{k}": v for k, v in results.items()})
    if grid is not None:
      writer.image(0, "eval/recon", grid)
      image_io.save_png(os.path.join(workdir, "recon.png"), grid)
    writer.close()
    record = {"results": results, "unavailable": why, "fd_vfm": fd_label,
              "tokenizer": tok_path, "dataset": input_cfg.dataset,
              "split": input_cfg.eval_split, "image_size": input_cfg.image_size,
              "eval_size": cfg.eval_size, "config": cfg.to_dict()}
    tmp = os.path.join(workdir, "results.json.tmp")
    with open(tmp, "w") as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(workdir, "results.json"))
  print(table(results, why, fd_label), flush=True)
  return results
