r"""Linear probe of a tokenizer's tokens (or its VFM's features): top-1 of a logistic regression.

  python -m vfmtok_jax.linear_probe --tokenizer TOK_DIR --config configs/linear_probe.py:features=slots \
      --config.train_input.data_dir=/data/tfds --out probe.json
  python -m vfmtok_jax.linear_probe --tokenizer runs/demo/tokenizer/export \
      --config configs/linear_probe.py:demo,features=codes

What is fitted and scored: `vfmtok_jax/tasks/probe_job.py`. Prints the top-1 and writes the
record to --out (JSON) when given.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import flags
from ml_collections import config_flags

from vfmtok_jax import cli_setup
from vfmtok_jax import tokenizer_io
from vfmtok_jax.tasks import probe_job

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/linear_probe.py:VARIANT",
                                          lock_config=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer folder (convert / train_tokenizer)")
_VFM = flags.DEFINE_string("vfm", "", "VFM source overriding the tokenizer folder's")
_OUT = flags.DEFINE_string("out", "", "JSON file for the record")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cli_setup.start(argv, _CACHE)
  tok = tokenizer_io.load_tokenizer(_TOKENIZER.value, vfm_source=_VFM.value or None)
  record = probe_job.run(tok, _CONFIG.value, log=lambda m: print(m, flush=True))
  record["tokenizer"] = _TOKENIZER.value
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(record, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "tokenizer"])
  cli_setup.run(main)
