"""Tokenizer checkpoint folders: what `convert tokenizer` writes and `tokenize` / training read.

Layout of a folder DST:
  DST/tokenizer.json   {"model": VFMTokenizer kwargs, "vfm": {source, levels, size, resize,
                       num_heads}, "source": where the weights came from}
  DST/params/          Orbax checkpoint of the tokenizer params (restored only into the tree
                       that `model` describes)
  DST/vfm/             optional: the frozen VFM (`vfm_zoo.save_vfm`), when the source held it;
                       `vfm.source` is then "vfm" (relative to DST)

`tokenizer_from_state` builds a `VFMTokenizer` from an official state dict (the key map and
config inference are `weights.tokenizer`'s).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from vfmtok_jax import orbax_io
from vfmtok_jax import vfm_zoo
from vfmtok_jax import vfmtok
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.weights import files
from vfmtok_jax.weights import tokenizer as tokenizer_keys
from vfmtok_jax.weights import trees

TOKENIZER_JSON = "tokenizer.json"


def model_kwargs(model_cfg: Mapping[str, Any]) -> dict:
  """JSON/ConfigDict model block -> VFMTokenizer kwargs (dtype name -> dtype, lists -> tuples)."""
  kwargs = dict(model_cfg)
  kwargs["dtype"] = getattr(jnp, str(kwargs.get("dtype", "float32")))
  kwargs["pixel_ch_mult"] = tuple(kwargs.get("pixel_ch_mult", (1, 1, 2, 2, 4)))
  return kwargs


def model_json(model: tokenizer_lib.VFMTokenizer) -> dict:
  """VFMTokenizer fields as JSON (the inverse of `model_kwargs`)."""
  out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
         if f.name not in ("parent", "name")}
  out["dtype"] = np.dtype(out["dtype"]).name
  out["pixel_ch_mult"] = list(out["pixel_ch_mult"])
  return out


def save_tokenizer(path: str, model: tokenizer_lib.VFMTokenizer, params, vfm_cfg: Mapping,
                   *, vfm: vfm_zoo.VFM | None = None, source: str = "") -> None:
  """Writes a tokenizer folder (see module docstring)."""
  vfm_cfg = dict(vfm_cfg)
  vfm_cfg["levels"] = list(vfm_cfg["levels"])
  if vfm is not None:
    vfm_zoo.save_vfm(vfm, os.path.join(path, "vfm"))
    vfm_cfg["source"] = "vfm"
  orbax_io.save_folder(path, params, TOKENIZER_JSON,
                       {"model": model_json(model), "vfm": vfm_cfg, "source": source})


def expected_params(model: tokenizer_lib.VFMTokenizer) -> dict:
  """Abstract params of `model` (built with the smallest consistent VFM input)."""
  t = model.decoder_pos_table
  feats = [np.zeros((1, t * t, model.vfm_width), np.float32)] * model.num_levels
  return trees.expected_params(model, feats, [(t, t)] * model.num_levels, train=False)


def tokenizer_from_state(state: Mapping[str, np.ndarray], *, source: str, **overrides):
  """(VFMTokenizer, params) from an official state dict (backbone keys are skipped).

  Args:
    state: flat tensors (a bare tokenizer state dict, or one with the DINOv2 backbone).
    source: name for errors.
    **overrides: VFMTokenizer kwargs the tensors cannot tell (head counts, decoder grid, ...;
      `weights.tokenizer.REFERENCE_DEFAULTS` otherwise) or that replace inferred ones.

  Raises:
    WeightLoadError: listing every missing, unexpected and mis-shaped tensor.
  """
  state = tokenizer_keys.without_backbone(state)
  model = tokenizer_lib.VFMTokenizer(
      **tokenizer_keys.infer_config(state, source=source, **overrides))
  return model, params_from_state(state, expected_params(model), source=source)


def params_from_state(state: Mapping[str, np.ndarray], expected, *, source: str) -> dict:
  """A Flax param tree shaped like `expected` from official-layout tensors.

  `state` is a tokenizer state dict (backbone keys and the unused `codebook_used` buffer are
  skipped) or anything laid out like one, e.g. Adam moments named after the parameters.

  Raises:
    WeightLoadError: listing every missing, unexpected and mis-shaped tensor.
  """
  state = tokenizer_keys.without_backbone(state)
  return trees.assemble(expected, tokenizer_keys.mapping_for(expected), state, source=source,
                        ignore=tokenizer_keys.DROPPED_KEYS)


def load_tokenizer(path: str, *, vfm_source: str | None = None) -> vfmtok.VFMTok:
  """Loads a tokenizer folder into a ready `VFMTok`.

  Args:
    path: the folder.
    vfm_source: overrides `vfm.source` in tokenizer.json (e.g. a DINOv2 .pth for checkpoints
      converted without their backbone).

  Raises:
    FileNotFoundError / WeightLoadError with the reason.
  """
  path = os.path.abspath(path)
  meta = orbax_io.read_folder(path, TOKENIZER_JSON, what="tokenizer checkpoint",
                              hint="make one with `python -m vfmtok_jax.convert tokenizer SRC DST`")
  try:
    model = tokenizer_lib.VFMTokenizer(**model_kwargs(meta["model"]))
  except TypeError as e:
    raise files.WeightLoadError(path, other=[f"{TOKENIZER_JSON} model block: {e}"]) from e
  try:
    params = orbax_io.restore_folder_params(path, expected_params(model),
                                            what=f"tokenizer described in {TOKENIZER_JSON}")
  except orbax_io.TreeMismatchError as e:
    raise files.WeightLoadError(path, mismatched=[str(e)]) from e
  vfm_cfg = meta["vfm"]
  source = vfm_source or vfm_cfg["source"]
  if source == "vfm":
    source = os.path.join(path, "vfm")
  kwargs = {"num_heads": vfm_cfg["num_heads"]} if vfm_cfg.get("num_heads") else {}
  vfm = vfm_zoo.load_vfm(source, **kwargs)
  size = vfm_cfg.get("size")
  return vfmtok.VFMTok(vfm, model, params, tuple(vfm_cfg["levels"]),
                       (size, size) if size else None, vfm_cfg.get("resize", "kornia_bicubic"))


def fingerprint(tok: vfmtok.VFMTok) -> str:
  """sha256 (16 hex digits) of the tokenizer's codebook: codes mean something only with it."""
  codebook = np.asarray(tok.params["slot_quantize"]["embedding"], np.float32)
  return hashlib.sha256(codebook.tobytes()).hexdigest()[:16]
