"""Tokenizer checkpoint folders: what `convert tokenizer` writes and `tokenize` / training read.

Layout of a folder DST:
  DST/tokenizer.json   {"model": VFMTokenizer kwargs, "vfm": {source, levels, size, resize,
                       num_heads}, "source": where the weights came from}
  DST/params/          Orbax checkpoint of the tokenizer params (restored only into the tree
                       that `model` describes)
  DST/vfm/             optional: the frozen VFM (`zoo.save_vfm`), when the source held it;
                       `vfm.source` is then "vfm" (relative to DST)
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import vfmtok
from vfmtok_jax.convert import common
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.models.vfm import zoo

TOKENIZER_JSON = "tokenizer.json"


def model_kwargs(model_cfg: Mapping[str, Any]) -> dict:
  """JSON/ConfigDict model block -> VFMTokenizer kwargs (dtype name -> dtype, lists -> tuples)."""
  kwargs = dict(model_cfg)
  kwargs["dtype"] = getattr(jnp, str(kwargs.get("dtype", "float32")))
  kwargs["pixel_ch_mult"] = tuple(kwargs.get("pixel_ch_mult", (1, 1, 2, 2, 4)))
  return kwargs


def model_json(model: tokenizer_lib.VFMTokenizer) -> dict:
  import dataclasses  # pylint: disable=g-import-not-at-top
  out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
         if f.name not in ("parent", "name")}
  out["dtype"] = np.dtype(out["dtype"]).name
  out["pixel_ch_mult"] = list(out["pixel_ch_mult"])
  return out


def save_tokenizer(path: str, model: tokenizer_lib.VFMTokenizer, params, vfm_cfg: Mapping,
                   *, vfm: zoo.VFM | None = None, source: str = "") -> None:
  """Writes a tokenizer folder (see module docstring)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  vfm_cfg = dict(vfm_cfg)
  vfm_cfg["levels"] = list(vfm_cfg["levels"])
  if vfm is not None:
    zoo.save_vfm(vfm, os.path.join(path, "vfm"))
    vfm_cfg["source"] = "vfm"
  with ocp.StandardCheckpointer() as ckptr:  # collective across processes
    ckptr.save(os.path.join(path, "params"), params, force=True)
  if jax.process_index() == 0:
    with open(os.path.join(path, TOKENIZER_JSON), "w") as f:
      json.dump({"model": model_json(model), "vfm": vfm_cfg, "source": source}, f, indent=2)


def _abstract(tree):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), tree)


def load_tokenizer(path: str, *, vfm_source: str | None = None) -> vfmtok.VFMTok:
  """Loads a tokenizer folder into a ready `VFMTok`.

  Args:
    path: the folder.
    vfm_source: overrides `vfm.source` in tokenizer.json (e.g. a DINOv2 .pth for checkpoints
      converted without their backbone).

  Raises:
    FileNotFoundError / WeightLoadError with the reason.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  meta_path = os.path.join(path, TOKENIZER_JSON)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(f"{path} is not a tokenizer checkpoint (no {TOKENIZER_JSON}); "
                            "make one with `python -m vfmtok_jax.convert tokenizer SRC DST`")
  with open(meta_path) as f:
    meta = json.load(f)
  try:
    model = tokenizer_lib.VFMTokenizer(**model_kwargs(meta["model"]))
  except TypeError as e:
    raise common.WeightLoadError(path, other=[f"{TOKENIZER_JSON} model block: {e}"]) from e
  from vfmtok_jax.convert import tokenizer as convert_tokenizer  # pylint: disable=g-import-not-at-top
  expected = convert_tokenizer.expected_params(model)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(path, "params"), _abstract(expected))
  except Exception as e:  # orbax raises several types for tree/shape mismatches
    raise common.WeightLoadError(path, other=[
        f"the Orbax params do not match the tokenizer in {TOKENIZER_JSON} ({e})"]) from e
  vfm_cfg = meta["vfm"]
  source = vfm_source or vfm_cfg["source"]
  if source == "vfm":
    source = os.path.join(path, "vfm")
  kwargs = {"num_heads": vfm_cfg["num_heads"]} if vfm_cfg.get("num_heads") else {}
  vfm = zoo.load_vfm(source, **kwargs)
  size = vfm_cfg.get("size")
  return vfmtok.VFMTok(vfm, model, params, tuple(vfm_cfg["levels"]),
                       (size, size) if size else None, vfm_cfg.get("resize", "kornia_bicubic"))
