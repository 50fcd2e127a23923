r"""Run a trained tokenizer over a dataset once and store the codes for AR training.

  python -m vfmtok_jax.extract_codes --tokenizer runs/demo/tokenizer/export \
      --config configs/extract_codes.py:demo --out runs/demo/codes
  python -m vfmtok_jax.extract_codes --tokenizer TOK_DIR \
      --config configs/extract_codes.py:imagenet --config.input.data_dir=gs://bucket/tfds \
      --config.variants=ten_crop --out /data/codes

Writes `data/codes.py`'s folder (`tasks/code_extraction.py`): ArrayRecord shards, one writer per
process, then codes.json. Running it again on the same --out keeps the finished shards and
redoes the rest; a folder made with other settings or another tokenizer is refused.
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
from vfmtok_jax.tasks import code_extraction

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/extract_codes.py:VARIANT",
                                          lock_config=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer folder (convert / train_tokenizer)")
_VFM = flags.DEFINE_string("vfm", "", "VFM source overriding the tokenizer folder's")
_OUT = flags.DEFINE_string("out", None, "codes folder to write (or finish)")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cli_setup.start(argv, _CACHE)
  tok = tokenizer_io.load_tokenizer(_TOKENIZER.value, vfm_source=_VFM.value or None)
  info = code_extraction.extract(tok, _CONFIG.value, _OUT.value, tok_path=_TOKENIZER.value)
  print(f"codes: {info.num_examples} examples x {info.num_variants} variants x "
        f"{info.num_tokens} tokens, {info.num_classes} classes -> {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "tokenizer", "out"])
  cli_setup.run(main)
