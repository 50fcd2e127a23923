r"""Score a class-conditional GPT as the paper does: sample, decode, ADM metrics.

  python -m vfmtok_jax.eval_generator --gpt GPT_DIR --tokenizer TOK_DIR \
      --config configs/eval_generator.py --config.ref_batch=VIRTUAL_imagenet256_labeled.npz \
      --config.sampling.cfg_scale=1.0 --workdir runs/eval_gpt

The protocol is in `vfmtok_jax/tasks/generator_eval.py`, the fields in
`configs/eval_generator.py`. Prints ADM's lines (`Inception Score`, `FID`, `sFID`,
`Precision`, `Recall`) and writes results.json (with the sampling settings), metrics.jsonl,
TensorBoard events, samples.png and samples.npz to --workdir. Multi-host as the trainers.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import flags
from ml_collections import config_flags

from vfmtok_jax import cli_setup
from vfmtok_jax import gpt_io
from vfmtok_jax import tokenizer_io
from vfmtok_jax.tasks import generator_eval
from vfmtok_jax.tasks import sampler

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval_generator.py:VARIANT",
                                          lock_config=True)
_GPT = flags.DEFINE_string("gpt", None, "GPT folder (train_gpt's workdir/gpt or convert gpt)")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer folder to decode with")
_DTYPE = flags.DEFINE_enum("dtype", "", ["", "float32", "bfloat16"], "GPT compute dtype "
                           "override (the reference samples in bf16)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where results.json, logs and samples go")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cli_setup.start(argv, _CACHE)
  model, params, meta = gpt_io.load_gpt(_GPT.value, dtype=_DTYPE.value or None)
  tok = tokenizer_io.load_tokenizer(_TOKENIZER.value)
  sampler.check_pair(meta, model, tok)
  generator_eval.run(model, params, tok, _CONFIG.value, _WORKDIR.value, gpt_path=_GPT.value,
                     tok_path=_TOKENIZER.value, log=lambda m: print(m, flush=True))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "gpt", "tokenizer", "workdir"])
  cli_setup.run(main)
