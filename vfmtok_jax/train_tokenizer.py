r"""Train the VFMTok tokenizer.

  python -m vfmtok_jax.train_tokenizer --config configs/tokenizer.py:demo --workdir runs/demo
  python -m vfmtok_jax.train_tokenizer --config configs/tokenizer.py:official \
      --config.vfm.source=dinov2_vitl14_reg4_pretrain.pth \
      --config.input.data_dir=gs://bucket/tfds --workdir gs://bucket/runs/vfmtok

Re-running with the same workdir resumes from its latest complete checkpoint; compiled steps
are kept in a persistent cache (--compilation_cache, 'off' to disable). Multi-host:
set VFMTOK_DISTRIBUTED=1 (launch/ scripts do) and, off TPU, JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import flags
from absl import logging
from ml_collections import config_flags

from vfmtok_jax import cli_setup
from vfmtok_jax.tasks import tokenizer as tokenizer_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/tokenizer.py:VARIANT",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and images go")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cache = cli_setup.start(argv, _CACHE)
  logging.info("compilation cache: %s", cache or "off")
  final = tokenizer_task.train(_CONFIG.value, _WORKDIR.value)
  logging.info("finished: %s", final)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli_setup.run(main)
