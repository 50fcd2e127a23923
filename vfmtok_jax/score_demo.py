r"""Score the offline demo's tokenizer and GPT (after `python -m vfmtok_jax.demo`).

  python -m vfmtok_jax.score_demo --workdir runs/demo [--scales 1.0,1.5,2,3]

Reads WORKDIR/tokenizer/export and WORKDIR/gpt/gpt; writes WORKDIR/scores.json and
WORKDIR/scores.md (the README's table) and prints the table. What is measured and how:
`vfmtok_jax/tasks/demo_scoring.py`.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import app
from absl import flags
from absl import logging

from vfmtok_jax import cli_setup
from vfmtok_jax import gpt_io
from vfmtok_jax import tokenizer_io
from vfmtok_jax.tasks import demo_scoring
from vfmtok_jax.tasks import sampler

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "the demo's workdir")
_SCALES = flags.DEFINE_list("scales", ["1.0", "1.5", "2.0", "3.0"], "CFG scales to score")
_PER_CLASS = flags.DEFINE_integer("samples_per_class", 16, "samples per class and scale")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  cli_setup.start(argv, _CACHE, multi_host=False)
  tok_dir = os.path.join(_WORKDIR.value, "tokenizer", "export")
  gpt_dir = os.path.join(_WORKDIR.value, "gpt", "gpt")
  for what, path, name in (("tokenizer", tok_dir, tokenizer_io.TOKENIZER_JSON),
                           ("GPT", gpt_dir, gpt_io.GPT_JSON)):
    if not os.path.isfile(os.path.join(path, name)):
      raise app.UsageError(f"no demo {what} at {path}: run `python -m vfmtok_jax.demo "
                           f"--workdir {_WORKDIR.value}` first")
  try:
    scales = [float(s) for s in _SCALES.value]
  except ValueError:
    raise app.UsageError(f"--scales {_SCALES.value}: expected numbers") from None
  tok = tokenizer_io.load_tokenizer(tok_dir)
  model, params, meta = gpt_io.load_gpt(gpt_dir)
  sampler.check_pair(meta, model, tok)
  scores = demo_scoring.score(tok, model, params, scales=scales,
                              samples_per_class=_PER_CLASS.value,
                              log=lambda m: print(m, flush=True))
  table = demo_scoring.markdown(scores)
  with open(os.path.join(_WORKDIR.value, "scores.json"), "w") as f:
    json.dump(scores, f, indent=1)
  with open(os.path.join(_WORKDIR.value, "scores.md"), "w") as f:
    f.write(table + "\n")
  print(table)
  print(f"scored in {scores['total_s'] / 60:.1f} min")


if __name__ == "__main__":
  cli_setup.run(main)
