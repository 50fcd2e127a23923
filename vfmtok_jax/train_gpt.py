r"""Train the class-conditional GPT on pre-extracted codes.

  python -m vfmtok_jax.train_gpt --config configs/gpt.py:demo \
      --config.data.codes=runs/demo/codes --config.tokenizer=runs/demo/tokenizer \
      --workdir runs/demo/gpt
  python -m vfmtok_jax.train_gpt --config configs/gpt.py:gpt_b \
      --config.data.codes=/data/codes --workdir runs/gpt_b

Re-running with the same workdir resumes from its latest complete checkpoint (data position
included); compiled steps are kept in a persistent cache (--compilation_cache, 'off' to
disable). Multi-host: as train_tokenizer (VFMTOK_DISTRIBUTED=1, launch/ scripts).
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
from vfmtok_jax.tasks import gpt as gpt_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/gpt.py:VARIANT",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, logs and images go")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cache = cli_setup.start(argv, _CACHE)
  logging.info("compilation cache: %s", cache or "off")
  final = gpt_task.train(_CONFIG.value, _WORKDIR.value)
  logging.info("finished: %s", final)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  cli_setup.run(main)
