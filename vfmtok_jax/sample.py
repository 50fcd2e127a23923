r"""Sample images from a trained or converted GPT.

  python -m vfmtok_jax.sample --gpt GPT_DIR [--tokenizer TOK_DIR] \
      (--labels 3,7,7 | --num N [--per_class]) --cfg 2.0 [--cfg_interval K] \
      [--cfg_schedule constant|linear] --temperature 1.0 --top_k 0 --top_p 1.0 --seed 0 \
      --out samples.npz

`--num N` draws N labels uniformly at random from the seed, as the reference's `test_net.py`
does (`--per_class`: N of every class instead); `--cfg` <= 1 samples CFG-free. The .npz holds
`indices` (B, T) int32 (what `python -m vfmtok_jax.tokenize decode` reads) and `labels`; with
`--tokenizer` also the images in the ADM sample format, `arr_0` uint8 (B, H, W, 3) and `arr_1`
labels, decoded as the reference does (a 336 px tokenizer resized bicubically to 256 px, others
kept at their size unless --image_size says otherwise), and a PNG grid beside it. Row r's
randomness depends only on (seed, r), so samples do not change with --batch_size or the
number of devices. Throughput (tokens/s, images/s) is measured after compilation.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF (tfds, TensorBoard) quiet at import

# pylint: disable=wrong-import-position

from absl import flags
import jax
import numpy as np

from vfmtok_jax import cli_setup
from vfmtok_jax import compute_dtype
from vfmtok_jax import gpt_io
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import images as image_io
from vfmtok_jax.tasks import sampler

_GPT = flags.DEFINE_string("gpt", None, "GPT folder (train_gpt's workdir/gpt or convert gpt)")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer folder to decode images with")
_LABELS = flags.DEFINE_string("labels", "", "comma-separated class ids")
_NUM = flags.DEFINE_integer("num", 0, "number of samples with uniform random labels")
_PER_CLASS = flags.DEFINE_bool("per_class", False, "--num samples of every class")
_CFG = flags.DEFINE_float("cfg", 1.0, "guidance scale (<= 1: CFG-free)")
_CFG_INTERVAL = flags.DEFINE_integer("cfg_interval", -1, "guide tokens <= K + 1 only (-1: all)")
_CFG_SCHEDULE = flags.DEFINE_enum("cfg_schedule", "constant", list(sampler.CFG_SCHEDULES),
                                  "guidance scale per token")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "softmax temperature")
_TOP_K = flags.DEFINE_integer("top_k", 0, "keep the k most likely tokens (0: all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus mass (1: all)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_BATCH = flags.DEFINE_integer("batch_size", 32, "rows per compiled call (x2 with guidance)")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "decoded image size (0: 256 for a 336 px "
                                   "tokenizer, else its own size)")
_DTYPE = flags.DEFINE_enum("dtype", "auto", ["auto", "model", "float32", "bfloat16"],
                           "GPT compute dtype: auto (bfloat16 on TPU, GPU and CPUs with AMX, "
                           "else float32), model (the GPT folder's), or one (the reference "
                           "samples in bfloat16)")
_OUT = flags.DEFINE_string("out", None, "output .npz")
_CACHE = cli_setup.define_cache_flag()


def main(argv):
  cli_setup.start(argv, _CACHE)
  dtype = None if _DTYPE.value == "model" else _DTYPE.value
  if dtype == "auto":
    dtype, why = compute_dtype.auto()
    print(f"compute dtype {dtype}: {why} (--dtype to choose)", flush=True)
  model, params, meta = gpt_io.load_gpt(_GPT.value, dtype=dtype)
  tok = None
  if _TOKENIZER.value:
    tok = tokenizer_io.load_tokenizer(_TOKENIZER.value)
    sampler.check_pair(meta, model, tok)
  labels = sampler.choose_labels(labels=_LABELS.value, num=_NUM.value,
                                 per_class=_PER_CLASS.value, num_classes=model.num_classes,
                                 seed=_SEED.value)
  settings = sampler.SamplingSettings(cfg_scale=_CFG.value, cfg_interval=_CFG_INTERVAL.value,
                                      cfg_schedule=_CFG_SCHEDULE.value,
                                      temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                                      top_p=_TOP_P.value)
  tokens, compile_s, sample_s, rows = sampler.generate_all(
      model, params, labels, settings, seed=_SEED.value, batch_size=_BATCH.value)
  tps = rows * model.block_size / sample_s
  print(f"sampled {len(labels)} x {model.block_size} tokens "
        f"({'CFG ' + str(settings.cfg_scale) if settings.guided else 'CFG-free'}): "
        f"{tps:,.0f} tokens/s, {rows / sample_s:.2f} images/s after compilation "
        f"({compile_s:.1f} s compile + first batch)", flush=True)
  out = {"indices": tokens.astype(np.int32), "labels": labels}
  if tok is not None:
    size = sampler.output_size(tok, _IMAGE_SIZE.value)
    out["arr_0"] = sampler.decode_to_uint8(tok, tokens, size, batch_size=_BATCH.value)
    out["arr_1"] = labels
  if jax.process_index() == 0:
    np.savez(_OUT.value, **out)
    msg = f"wrote {_OUT.value}"
    if tok is not None:
      grid = os.path.splitext(_OUT.value)[0] + ".png"
      imgs = out["arr_0"]
      cols = min(8, len(imgs))
      image_io.save_png(grid, image_io.image_grid(
          [imgs[i:i + cols] for i in range(0, len(imgs) // cols * cols, cols)]))
      msg += f" and {grid}"
    print(msg)


if __name__ == "__main__":
  flags.mark_flags_as_required(["gpt", "out"])
  cli_setup.run(main)
