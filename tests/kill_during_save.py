"""A trainer's command line, SIGKILLed while the async save of one step is written.

  python tests/kill_during_save.py tokenizer|gpt --kill_during_save=3 --config ... --workdir ...

A watcher thread polls the checkpoint folder and kills this process as soon as the temporary
directory of that step's save appears (Orbax renames it when complete).
"""

import importlib
import os
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

# The trainer is the first argument: each defines --config/--workdir, so only one is imported.
_TRAINERS = {"tokenizer": "vfmtok_jax.train_tokenizer", "gpt": "vfmtok_jax.train_gpt"}
if len(sys.argv) < 2 or sys.argv[1] not in _TRAINERS:
  sys.exit(f"usage: {sys.argv[0]} {'|'.join(_TRAINERS)} --kill_during_save=STEP ...")
trainer = importlib.import_module(_TRAINERS[sys.argv.pop(1)])

_STEP = flags.DEFINE_integer("kill_during_save", 0, "step whose save is interrupted")


def _watch(directory: str, step: int) -> None:
  while True:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if any(n.startswith(f"{step}.") and "tmp" in n for n in names):
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.0005)


def main(argv):
  ckpt_dir = os.path.join(flags.FLAGS.workdir, "ckpt")
  threading.Thread(target=_watch, args=(ckpt_dir, _STEP.value), daemon=True).start()
  trainer.main(argv)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
