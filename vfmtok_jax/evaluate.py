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
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import app
from absl import flags
from vfmtok_jax import cli_setup
from vfmtok_jax import compilation_cache
from vfmtok_jax.evaluators import inception
from vfmtok_jax.evaluators import suite

_INCEPTION = flags.DEFINE_string("inception", "", "FID Inception weights (pytorch-fid's "
                                 f"{inception.WEIGHTS_FILENAME}); default under "
                                 "$VFMTOK_JAX_WEIGHTS")
_JSON = flags.DEFINE_string("json", "", "also write the metrics to this JSON file")
_BATCH = flags.DEFINE_integer("batch_size", 64, "images per Inception call")
_CACHE = flags.DEFINE_string("compilation_cache", None, "JAX compilation cache dir; 'off' "
                             "disables it")

METRICS = suite.METRICS


def evaluate(ref_path: str, sample_path: str, extract, batch_size: int = 64
             ) -> tuple[dict, dict]:
  """({json key: value} of the metrics computed, {json key: why unavailable} of the rest).

  `extract`: uint8 images -> {"pool", "spatial", "logits"} (`InceptionFeatures`).
  """
  return suite.adm_metrics(suite.side_of_file(ref_path, extract, batch_size),
                           suite.side_of_file(sample_path, extract, batch_size))


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
  for line in suite.lines(results, why):
    print(line)
  if _JSON.value:
    out = {key: results.get(key) for _, key in METRICS}
    out["unavailable"] = why
    out["ref_batch"], out["sample_batch"] = os.path.abspath(ref_path), os.path.abspath(sample_path)
    with open(_JSON.value, "w") as f:
      json.dump(out, f, indent=2)


if __name__ == "__main__":
  cli_setup.run(main)
