r"""Weight conversion command line.

  python -m vfmtok_jax.convert vfm SRC DST [--num_heads N]
      SRC: anything `vfm_zoo.load_vfm` reads (HF folder, official DINOv2 .pth/.safetensors, .onnx,
      "default"); DST: a folder with the Orbax params and `vfm.json`.

  python -m vfmtok_jax.convert tokenizer SRC DST [--checkpoint_entry E] [--config.KEY=VALUE ...]
      SRC: an official VFMTok tokenizer checkpoint (`.pt` as released or as the reference's
      training scripts save it, {'model', 'ema', 'optimizer', ..., 'args': Namespace}, whose
      'ema' entry is converted unless --checkpoint_entry says otherwise; a bare state dict; or
      `.safetensors`). Every size the tensors determine is inferred;
      head counts, the decoder grid, dropout and the VFM (source, levels, size, resize) come
      from the config (default configs/tokenizer.py:official), e.g.
      --config.model.decoder_heads=4 --config.vfm.levels="(0,1,2,3)". When SRC contains the
      DINOv2 backbone it is converted too and stored in DST/vfm.

  python -m vfmtok_jax.convert gpt SRC DST [--checkpoint_entry E] [--config.KEY=VALUE ...]
      SRC: a released AR checkpoint (`.pt` with 'model'/'ema' entries, 'ema' preferred; a bare
      state dict; or `.safetensors`). Vocabulary, classes (the class table's rows minus the
      null class), width, depth, KV heads and FFN width come from the tensors; the head count
      and the image-token count (a square grid) from the config (default configs/gpt.py:gpt_b):
      --config.model.num_heads=N --config.model.block_size=T; dropouts, RoPE base, norm eps and
      the compute dtype too.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from vfmtok_jax import cli_setup
from vfmtok_jax import gpt_io
from vfmtok_jax import tokenizer_io
from vfmtok_jax import vfm_zoo
from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights import files

_CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
DEFAULT_CONFIGS = {
    "tokenizer": os.path.normpath(os.path.join(_CONFIGS, "tokenizer.py")) + ":official",
    "gpt": os.path.normpath(os.path.join(_CONFIGS, "gpt.py")) + ":gpt_b",
}
_NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "heads of a DINOv2 of a non-published width")
_ENTRY = flags.DEFINE_string("checkpoint_entry", "",
                             "entry of a {'model', 'ema'} checkpoint to convert (default: ema "
                             "when present, else model)")
_CONFIG = None  # defined in `run` with the subcommand's default config


def define_config_flag(argv) -> None:
  """`--config`, defaulting to the subcommand's config (so `--config.KEY=VALUE` overrides work
  without naming a config file)."""
  global _CONFIG
  what = next((a for a in argv[1:] if not a.startswith("-")), "tokenizer")
  _CONFIG = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIGS.get(what, DEFAULT_CONFIGS["tokenizer"]),
      "tokenizer config (model/vfm blocks) or, for `gpt`, a GPT config (model block)",
      lock_config=True)

# Settings the tensors cannot tell; taken from the config.
NON_INFERABLE = ("encoder_heads", "encoder_self_attn_heads", "decoder_heads", "decoder_grid",
                 "attn_dropout", "commit_beta", "entropy_weight", "dtype")


def _n_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def convert_vfm(src: str, dst: str, num_heads: int = 0) -> None:
  """`vfm_zoo.load_vfm(src)` saved as a VFM folder `dst`."""
  vfm = vfm_zoo.load_vfm(src, **({"num_heads": num_heads} if num_heads else {}))
  vfm_zoo.save_vfm(vfm, dst)
  print(f"converted {vfm.kind} ({vfm.depth} blocks, width {vfm.width}, "
        f"{_n_params(vfm.params):,} params) from {src} -> {dst}")


def read_tokenizer_state(src: str, entry: str = "") -> dict:
  """Flat tensors of an official tokenizer checkpoint (the EMA weights when it has them)."""
  return files.read_state_dict(src, subkey=entry or None, prefer=("ema", "model"))


def convert_tokenizer(src: str, dst: str, config, entry: str = "") -> None:
  """Converts a tokenizer checkpoint (and the DINOv2 backbone in it, if any) to folder `dst`.

  Args:
    src: the checkpoint (see the module docstring).
    dst: the tokenizer folder to write (`tokenizer_io` layout).
    config: a tokenizer config; its `model` block supplies NON_INFERABLE, its `vfm` block is
      stored (and `vfm.num_heads` used for the backbone).
    entry: the checkpoint entry to convert ("" = ema when present, else model).
  """
  state = read_tokenizer_state(src, entry)
  overrides = tokenizer_io.model_kwargs({k: config.model[k] for k in NON_INFERABLE})
  overrides = {k: overrides[k] for k in NON_INFERABLE}
  model, params = tokenizer_io.tokenizer_from_state(state, source=src, **overrides)
  vfm = None
  if any(k.startswith(dinov2_keys.VFMTOK_PREFIX) for k in state):
    heads = config.vfm.num_heads or None
    module, vfm_params = vfm_zoo.dinov2_from_official_state(state, source=src, num_heads=heads)
    vfm = vfm_zoo.dinov2_vfm(module, vfm_params, src)
  vfm_cfg = dict(config.vfm)
  tokenizer_io.save_tokenizer(dst, model, params, vfm_cfg, vfm=vfm, source=src)
  print(f"converted tokenizer ({_n_params(params):,} params; {model.num_queries} queries, "
        f"codebook {model.codebook_size}x{model.code_dim}, {model.image_size} px output)"
        f"{' + DINOv2 backbone' if vfm else ''} from {src} -> {dst}")


# GPT fields the tensors cannot tell; taken from the config's model block.
GPT_NON_INFERABLE = ("block_size", "rope_base", "norm_eps", "token_dropout", "attn_dropout",
                     "resid_dropout", "ffn_dropout", "class_dropout", "remat", "dtype")


def convert_gpt(src: str, dst: str, config, entry: str = "") -> None:
  """Converts a released AR checkpoint to the GPT folder `dst` (`gpt_io` layout)."""
  state = files.read_state_dict(src, subkey=entry or None, prefer=("ema", "model"))
  overrides = gpt_io.model_kwargs({k: config.model[k] for k in GPT_NON_INFERABLE})
  model, params = gpt_io.gpt_from_state(state, source=src, num_heads=config.model.num_heads,
                                        **overrides)
  gpt_io.save_gpt(dst, model, params, source=os.path.abspath(src))
  print(f"converted GPT ({_n_params(params):,} params; {model.num_layers} layers, dim "
        f"{model.dim}, {model.num_heads} heads / {model.num_kv_heads} kv, FFN "
        f"{model.ffn_hidden}, vocab {model.vocab_size}, {model.num_classes} classes, "
        f"{model.block_size} tokens) from {src} -> {dst}")


def main(argv):
  if len(argv) != 4 or argv[1] not in ("vfm", "tokenizer", "gpt"):
    raise app.UsageError("usage: python -m vfmtok_jax.convert {vfm,tokenizer,gpt} SRC DST "
                         "[flags]")
  _, what, src, dst = argv
  if what == "vfm":
    convert_vfm(src, dst, _NUM_HEADS.value)
  elif what == "gpt":
    convert_gpt(src, dst, _CONFIG.value, _ENTRY.value)
  else:
    convert_tokenizer(src, dst, _CONFIG.value, _ENTRY.value)


if __name__ == "__main__":
  define_config_flag(sys.argv)
  cli_setup.run(main)
