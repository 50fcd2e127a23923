r"""The ADM evaluator's command line, in JAX: IS, FID, sFID, precision, recall of a sample batch.

  python -m vfmtok_jax.evaluate REF_BATCH.npz SAMPLE_BATCH.npz [--inception PATH] [--json OUT]

Both files are ADM batches (`evaluators/batches.py`). As in ADM, a file's stored `mu`/`sigma`
(`mu_s`/`sigma_s`) are used for FID (sFID) when present, else the statistics of its `arr_0`
images' features; IS needs the sample images, precision/recall both files' images. A metric the
files cannot give is printed as unavailable with the reason (and is null in --json). The same
lines as ADM's evaluator are printed: `Inception Score: X`, `FID: X`, `sFID: X`,
`Precision: X`, `Recall: X`.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=wrong-import-position

from absl import app
from absl import flags
import numpy as np

from vfmtok_jax import compilation_cache
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batches
from vfmtok_jax.evaluators import inception

_INCEPTION = flags.DEFINE_string("inception", "", "FID Inception weights (pytorch-fid's "
                                 f"{inception.WEIGHTS_FILENAME}); default under "
                                 "$VFMTOK_JAX_WEIGHTS")
_JSON = flags.DEFINE_string("json", "", "also write the metrics to this JSON file")
_BATCH = flags.DEFINE_integer("batch_size", 64, "images per Inception call")
_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX compilation cache dir; 'off' "
                             "disables it")

# (printed name, JSON key)
METRICS = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"),
           ("Precision", "precision"), ("Recall", "recall"))


def features_of(path: str, batch: batches.BatchFile, extract, batch_size: int) -> dict | None:
  """Inception features of the file's images, None without images."""
  if batch.image_shape is None:
    return None
  parts = [extract(images) for images in batches.iter_images(path, batch_size)]
  if not parts:
    raise ValueError(f"{path}: {batches.IMAGES} holds no images")
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def stats_of(batch: batches.BatchFile, feats: dict | None, kind: str):
  """Stored statistics first (ADM), else those of the features; None if neither exists."""
  mu, sigma = ("mu", "sigma") if kind == "pool" else ("mu_s", "sigma_s")
  if mu in batch.stats and sigma in batch.stats:
    return adm.Statistics(batch.stats[mu], batch.stats[sigma])
  if feats is not None:
    return adm.statistics(feats[kind])
  return None


def evaluate(ref_path: str, sample_path: str, extract, batch_size: int = 64
             ) -> tuple[dict, dict]:
  """({json key: value} of the metrics computed, {json key: why unavailable} of the rest).

  `extract`: uint8 images -> {"pool", "spatial", "logits"} (`InceptionFeatures`).
  """
  ref, sample = batches.inspect(ref_path), batches.inspect(sample_path)
  ref_feats = features_of(ref_path, ref, extract, batch_size)
  sample_feats = features_of(sample_path, sample, extract, batch_size)
  results, why = {}, {}
  if sample_feats is not None:
    results["inception_score"] = adm.inception_score(sample_feats["logits"])
  else:
    why["inception_score"] = f"{sample_path} has no images (arr_0)"
  for key, kind, names in (("fid", "pool", "mu/sigma"), ("sfid", "spatial", "mu_s/sigma_s")):
    a, b = stats_of(ref, ref_feats, kind), stats_of(sample, sample_feats, kind)
    if a is None or b is None:
      missing = [p for p, s in ((ref_path, a), (sample_path, b)) if s is None]
      why[key] = f"{' and '.join(missing)} has neither images (arr_0) nor {names}"
    else:
      try:
        results[key] = adm.frechet_distance(b, a)
      except ValueError as e:  # e.g. too few images for the covariances: ADM would stop here
        why[key] = str(e)
  if ref_feats is not None and sample_feats is not None:
    try:
      results["precision"], results["recall"] = adm.precision_recall(ref_feats["pool"],
                                                                     sample_feats["pool"])
    except ValueError as e:  # too few images for k = 3 neighbourhoods
      why["precision"] = why["recall"] = str(e)
  else:
    missing = [p for p, f in ((ref_path, ref_feats), (sample_path, sample_feats)) if f is None]
    for key in ("precision", "recall"):
      why[key] = f"{' and '.join(missing)} has no images (arr_0)"
  return results, why


def main(argv):
  if len(argv) != 3:
    raise app.UsageError("usage: python -m vfmtok_jax.evaluate REF_BATCH.npz SAMPLE_BATCH.npz "
                         "[--inception PATH] [--json OUT]")
  ref_path, sample_path = argv[1], argv[2]
  compilation_cache.enable(_CACHE.value)
  for p in (ref_path, sample_path):
    if not os.path.isfile(p):
      raise app.UsageError(f"batch file {p} does not exist")
  model, params = inception.load_inception(_INCEPTION.value or None)
  extract = inception.InceptionFeatures(model, params, batch_size=_BATCH.value)
  results, why = evaluate(ref_path, sample_path, extract, _BATCH.value)
  for name, key in METRICS:
    print(f"{name}: {results[key]}" if key in results else f"{name}: unavailable ({why[key]})")
  if _JSON.value:
    out = {key: results.get(key) for _, key in METRICS}
    out["unavailable"] = why
    out["ref_batch"], out["sample_batch"] = os.path.abspath(ref_path), os.path.abspath(sample_path)
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  app.run(main)
