"""GPT checkpoint folders: what `convert gpt` and `train_gpt` write, `sample` reads.

Layout of a folder DST:
  DST/gpt.json    {"model": GPT kwargs, "source": where the weights came from,
                   "tokenizer": optional description of the tokenizer whose codes it models
                   (codebook size, tokens, source)}
  DST/params/     Orbax checkpoint of the GPT params (restored only into the tree `model`
                  describes)

`gpt_from_state` builds a `GPT` from a reference (LlamaGen / VFMTok) state dict.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import orbax_io
from vfmtok_jax.models import gpt as gpt_lib
from vfmtok_jax.weights import files
from vfmtok_jax.weights import gpt as gpt_keys
from vfmtok_jax.weights import trees

GPT_JSON = "gpt.json"


def model_kwargs(model_cfg: Mapping[str, Any]) -> dict:
  """JSON/ConfigDict model block -> GPT kwargs (dtype name -> dtype)."""
  kwargs = dict(model_cfg)
  kwargs["dtype"] = getattr(jnp, str(kwargs.get("dtype", "float32")))
  return kwargs


def layer_loop_unroll(setting: int, num_layers: int, platform: str) -> int:
  """Layers per iteration of the layer loop; `setting` 0 = by platform.

  CPU: all layers, no loop. XLA:CPU runs a loop body's operations one iteration at a time and
  copies the stacked residuals in and out; the unrolled f32 train step was 5-6 % faster
  (`benchmarks/sampling.py`'s configuration, README). TPU and GPU: 1, so that compile time does
  not grow with depth (the AOT plans of GPT-XXL to 3B)."""
  if setting < 0:
    raise ValueError(f"model.scan_unroll {setting}: expected 0 (by platform) or >= 1")
  if setting:
    return setting
  return num_layers if platform == "cpu" else 1


def model_from_config(model_cfg: Mapping[str, Any], platform: str | None = None
                      ) -> gpt_lib.GPT:
  """A GPT from a config's `model` block (`multiple_of` and `ffn_dim_multiplier`, 0 = none,
  give the FFN width as the reference computes it; `scan_unroll` 0 is resolved for `platform`,
  default JAX's backend: `layer_loop_unroll`).

  Raises:
    ValueError: inconsistent sizes (named).
  """
  cfg = dict(model_cfg)
  multiple_of = int(cfg.pop("multiple_of"))
  multiplier = float(cfg.pop("ffn_dim_multiplier")) or None
  cfg["ffn_hidden"] = gpt_lib.ffn_hidden_dim(int(cfg["dim"]), multiple_of, multiplier)
  cfg["scan_unroll"] = layer_loop_unroll(int(cfg.get("scan_unroll", 1)), int(cfg["num_layers"]),
                                         platform or jax.default_backend())
  model = gpt_lib.GPT(**model_kwargs(cfg))
  model.check()
  return model


def model_json(model: gpt_lib.GPT) -> dict:
  out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
         if f.name not in ("parent", "name")}
  out["dtype"] = np.dtype(out["dtype"]).name
  return out


def expected_params(model: gpt_lib.GPT) -> dict:
  """Abstract params of `model`."""
  return trees.expected_params(model, jnp.zeros((1, 1), jnp.int32), jnp.zeros((1,), jnp.int32))


def gpt_from_state(state: Mapping[str, np.ndarray], *, source: str, num_heads: int,
                   block_size: int, **overrides) -> tuple[gpt_lib.GPT, dict]:
  """(GPT, params) from a reference state dict.

  Args:
    state: flat tensors (`Transformer.state_dict()`, optionally with wrapper prefixes).
    source: name for errors.
    num_heads, block_size: what the tensors cannot tell (heads; image tokens, a square).
    **overrides: other GPT fields (dropouts, rope_base, norm_eps, dtype).

  Raises:
    WeightLoadError: listing every missing, unexpected and mis-shaped tensor.
  """
  state = gpt_keys.strip_wrappers(state)
  sizes = gpt_keys.infer_config(state, num_heads=num_heads, source=source)
  try:
    model = gpt_lib.GPT(block_size=block_size, **sizes, **overrides)
    model.check()
  except (TypeError, ValueError) as e:
    raise files.WeightLoadError(source, other=[f"GPT config: {e}"]) from e
  keymap = gpt_keys.mapping(num_layers=model.num_layers, dim=model.dim,
                            num_heads=model.num_heads, num_kv_heads=model.num_kv_heads)
  params = trees.assemble(expected_params(model), keymap, state, source=source,
                          ignore=gpt_keys.dropped_keys(state))
  return model, params


def save_gpt(path: str, model: gpt_lib.GPT, params, *, source: str = "",
             tokenizer: Mapping[str, Any] | None = None) -> None:
  """Writes a GPT folder (see module docstring); collective: every process calls it."""
  meta = {"model": model_json(model), "source": source}
  if tokenizer is not None:
    meta["tokenizer"] = dict(tokenizer)
  orbax_io.save_folder(path, params, GPT_JSON, meta)


def load_gpt(path: str, *, dtype: str | None = None) -> tuple[gpt_lib.GPT, dict, dict]:
  """(GPT, params, gpt.json contents) of a GPT folder; `dtype` overrides the compute dtype.

  Raises:
    FileNotFoundError / WeightLoadError with the reason.
  """
  path = os.path.abspath(path)
  meta = orbax_io.read_folder(path, GPT_JSON, what="GPT checkpoint",
                              hint="make one with `python -m vfmtok_jax.convert gpt SRC DST` "
                                   "or `python -m vfmtok_jax.train_gpt`")
  cfg = dict(meta["model"])
  if dtype is not None:
    cfg["dtype"] = dtype
  try:
    model = gpt_lib.GPT(**model_kwargs(cfg))
    model.check()
  except (TypeError, ValueError) as e:
    raise files.WeightLoadError(path, other=[f"{GPT_JSON} model block: {e}"]) from e
  try:
    params = orbax_io.restore_folder_params(path, expected_params(model),
                                            what=f"GPT described in {GPT_JSON}")
  except orbax_io.TreeMismatchError as e:
    raise files.WeightLoadError(path, mismatched=[str(e)]) from e
  return model, params, meta
