"""`--config` file for subprocess tests: the tiny trainer (set --config.vfm.source)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests import tiny_training  # pylint: disable=g-import-not-at-top,wrong-import-position


def get_config(arg=None):
  del arg
  c = tiny_training.tiny_config(os.environ.get("TMPDIR", "/tmp"), total_steps=6)
  c.lock()
  return c
