r"""Score a tokenizer the way the paper does (rFID, rIS, PSNR, SSIM, FD-VFM, codebook usage).

  python -m vfmtok_jax.eval_tokenizer --tokenizer TOK_DIR --config configs/eval_tokenizer.py \
      --config.input.data_dir=/data/tfds --workdir runs/eval_tok
  python -m vfmtok_jax.eval_tokenizer --tokenizer runs/demo/tokenizer/export \
      --config configs/eval_tokenizer.py:demo --workdir runs/demo/eval_tokenizer

The protocol and metrics are in `vfmtok_jax/tasks/tokenizer_eval.py`; the fields in
`configs/eval_tokenizer.py`. Writes results.json, metrics.jsonl, TensorBoard events and
recon.png (inputs above reconstructions) to --workdir and prints the table. Multi-host as the
trainers (VFMTOK_DISTRIBUTED=1): every process scores its share of the split.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import flags
from ml_collections import config_flags

from vfmtok_jax import cli_setup
from vfmtok_jax import tokenizer_io
from vfmtok_jax.tasks import tokenizer_eval

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/eval_tokenizer.py:VARIANT",
                                          lock_config=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer folder (convert / train_tokenizer)")
_VFM = flags.DEFINE_string("vfm", "", "VFM source overriding the tokenizer folder's")
_WORKDIR = flags.DEFINE_string("workdir", None, "where results.json, logs and recon.png go")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cli_setup.start(argv, _CACHE)
  tok = tokenizer_io.load_tokenizer(_TOKENIZER.value, vfm_source=_VFM.value or None)
  tokenizer_eval.run(tok, _CONFIG.value, _WORKDIR.value, tok_path=_TOKENIZER.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "tokenizer", "workdir"])
  cli_setup.run(main)
