"""Which numbers the ADM evaluator computes from which inputs, for files or in-memory samples.

A side (reference or samples) is its stored statistics (`mu`/`sigma`, `mu_s`/`sigma_s`) and the
Inception features of its images (None without images). As in ADM: FID and sFID use the stored
statistics when present, else those of the features; IS needs the samples' images;
precision/recall both sides' images. A metric the inputs cannot give is reported unavailable
with the reason. Feature extraction is split over the processes (every process extracts the
batches i with i % process_count == process_index) and gathered.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import jax
import numpy as np

from vfmtok_jax import distributed
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batches

# (printed name, JSON key), in ADM's printing order.
METRICS = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
           ("Precision", "precision"), ("Recall", "recall"))


@dataclasses.dataclass
class Side:
  """One input of the evaluator: a name for messages, stored statistics, image features."""
  name: str
  stats: dict[str, np.ndarray]
  feats: dict[str, np.ndarray] | None


def features(image_batches: Iterable[np.ndarray], extract: Callable[[np.ndarray], dict]
             ) -> dict[str, np.ndarray]:
  """Features of every image, each batch extracted by one process, gathered on all of them."""
  pi, pc = jax.process_index(), jax.process_count()
  parts = [extract(images) for i, images in enumerate(image_batches) if i % pc == pi]
  if not parts:
    parts = [extract(np.zeros((0, 8, 8, 3), np.uint8))]
  return {k: distributed.gather_rows(np.concatenate([p[k] for p in parts])) for k in parts[0]}


def side_of_file(path: str, extract, batch_size: int = 64) -> Side:
  """A side from an ADM batch file (features only when it holds images)."""
  info = batches.inspect(path)
  feats = None
  if info.image_shape is not None:
    feats = features(batches.iter_images(path, batch_size), extract)
    if not len(feats["pool"]):
      raise ValueError(f"{path}: {batches.IMAGES} holds no images")
  return Side(path, info.stats, feats)


def _stats(side: Side, kind: str) -> adm.Statistics | None:
  mu, sigma = ("mu", "sigma") if kind == "pool" else ("mu_s", "sigma_s")
  if mu in side.stats and sigma in side.stats:
    return adm.Statistics(side.stats[mu], side.stats[sigma])
  if side.feats is not None:
    return adm.statistics(side.feats[kind])
  return None


def adm_metrics(ref: Side, sample: Side) -> tuple[dict[str, float], dict[str, str]]:
  """({json key: value} of the metrics computed, {json key: why unavailable} of the rest)."""
  results, why = {}, {}
  if sample.feats is not None:
    results["inception_score"] = adm.inception_score(sample.feats["logits"])
  else:
    why["inception_score"] = f"{sample.name} has no images (arr_0)"
  for key, kind, names in (("fid", "pool", "mu/sigma"), ("sfid", "spatial", "mu_s/sigma_s")):
    a, b = _stats(ref, kind), _stats(sample, kind)
    if a is None or b is None:
      missing = [s.name for s, st in ((ref, a), (sample, b)) if st is None]
      why[key] = f"{' and '.join(missing)} has neither images (arr_0) nor {names}"
    else:
      try:
        results[key] = adm.frechet_distance(b, a)
      except ValueError as e:  # e.g. too few images for the covariances: ADM would stop here
        why[key] = str(e)
  if ref.feats is not None and sample.feats is not None:
    try:
      results["precision"], results["recall"] = adm.precision_recall(ref.feats["pool"],
                                                                     sample.feats["pool"])
    except ValueError as e:  # too few images for k = 3 neighbourhoods
      why["precision"] = why["recall"] = str(e)
  else:
    missing = [s.name for s in (ref, sample) if s.feats is None]
    for key in ("precision", "recall"):
      why[key] = f"{' and '.join(missing)} has no images (arr_0)"
  return results, why


def lines(results: dict, why: dict) -> list[str]:
  """ADM's printed lines (`FID: X`), unavailable ones with their reason."""
  return [f"{name}: {results[key]}" if key in results else f"{name}: unavailable ({why[key]})"
          for name, key in METRICS]
