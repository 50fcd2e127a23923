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
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
import jax
import numpy as np
from ml_collections import config_flags

from vfmtok_jax import tokenizer_io
from vfmtok_jax import vfm_zoo
from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights import files

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                               "tokenizer.py") + ":official"
_CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT_CONFIG),
                                          "tokenizer config (model/vfm blocks)", lock_config=True)
_NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "heads of a DINOv2 of a non-published width")
_ENTRY = flags.DEFINE_string("checkpoint_entry", "",
                             "entry of a {'model', 'ema'} checkpoint to convert (default: ema "
                             "when present, else model)")

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


def main(argv):
  if len(argv) != 4 or argv[1] not in ("vfm", "tokenizer"):
    raise app.UsageError("usage: python -m vfmtok_jax.convert {vfm,tokenizer} SRC DST [flags]")
  _, what, src, dst = argv
  if what == "vfm":
    convert_vfm(src, dst, _NUM_HEADS.value)
  else:
    convert_tokenizer(src, dst, _CONFIG.value, _ENTRY.value)


if __name__ == "__main__":
  app.run(main)
