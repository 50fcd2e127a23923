"""Reading weight files, and the one error for weights that do not fit.

State dicts are read without unpickling arbitrary objects: safetensors directly, `.npz` with
`allow_pickle=False`, and every `.pt`/`.pth`/`.bin`/`.ckpt` through `load_torch_file`
(`torch.load(weights_only=True)`, which admits tensors and plain containers, plus
`argparse.Namespace` for the `args` entry of the reference's training checkpoints).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Iterable, Mapping

import numpy as np
from safetensors.numpy import load_file as _load_safetensors

# Where locally provided auxiliary weights (LPIPS VGG16, the discriminator's DINO) are looked up.
WEIGHTS_ENV = "VFMTOK_JAX_WEIGHTS"
TORCH_EXTENSIONS = (".pt", ".pth", ".bin", ".ckpt")
# The only non-container class a torch checkpoint may hold: the reference training scripts
# (`vq_train.py`, `train_c2i.py`) save their parsed command line as {'args': Namespace(...)}.
TORCH_SAFE_GLOBALS = (argparse.Namespace,)


def weights_dir() -> str:
  """Folder of locally provided weights: $VFMTOK_JAX_WEIGHTS, else ~/.cache/vfmtok_jax."""
  return os.environ.get(WEIGHTS_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "vfmtok_jax")


class WeightLoadError(ValueError):
  """Weights that do not fit the model: lists every problem at once."""

  def __init__(self, source: str, *, missing: Iterable[str] = (),
               unexpected: Iterable[str] = (), mismatched: Iterable[str] = (),
               other: Iterable[str] = ()):
    self.source = source
    self.missing = sorted(missing)
    self.unexpected = sorted(unexpected)
    self.mismatched = list(mismatched)
    self.other = list(other)
    lines = [f"cannot load weights from {source}:"]
    for title, items in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                         ("mis-shaped tensors", self.mismatched), ("problems", self.other)):
      if items:
        lines.append(f"  {len(items)} {title}:")
        lines.extend(f"    {item}" for item in items[:50])
        if len(items) > 50:
          lines.append(f"    ... and {len(items) - 50} more")
    super().__init__("\n".join(lines))


def torch_module():
  """torch, imported on first use: it is optional (needed only for torch checkpoint files)."""
  import torch  # pylint: disable=g-import-not-at-top
  return torch


def load_torch_file(path: str) -> Any:
  """The object in a torch checkpoint, unpickled with `weights_only=True`.

  Admits tensors, plain containers and numbers (optimizer state dicts included) and
  `argparse.Namespace`; any other class or callable is refused before it is constructed.

  Raises:
    WeightLoadError: the file is absent, unreadable, or holds anything else.
  """
  if not os.path.isfile(path):
    raise WeightLoadError(path, other=["no such file"])
  torch = torch_module()
  try:
    with torch.serialization.safe_globals(list(TORCH_SAFE_GLOBALS)):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # UnpicklingError for refused globals; several types for bad files
    first_line = str(e).splitlines()[0] if str(e) else ""
    raise WeightLoadError(path, other=[
        f"torch.load(weights_only=True) refused or failed ({type(e).__name__}: {first_line}); "
        "only tensors, plain containers and argparse.Namespace load"]) from e


def torch_to_numpy(value) -> np.ndarray:
  if value.dtype == torch_module().bfloat16:
    value = value.float()
  return value.detach().cpu().numpy()


def read_state_dict(path: str, *, subkey: str | None = None,
                    prefer: tuple[str, ...] = ("model",)) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} dict from .safetensors, .pt/.pth/.bin/.ckpt or .npz.

  Args:
    path: the file.
    subkey: for torch checkpoints that wrap the state dict (e.g. {'model': ..., 'ema': ...}),
      which entry to take. None takes the dict itself when all its values are tensors, else
      the first entry of `prefer` that it has.
    prefer: wrapper entries to try, in order, when `subkey` is None.

  Raises:
    WeightLoadError: unknown format, unreadable file, or non-tensor content.
  """
  if not os.path.isfile(path):
    raise WeightLoadError(path, other=["no such file"])
  ext = os.path.splitext(path)[1].lower()
  if ext == ".safetensors":
    try:
      return dict(_load_safetensors(path))
    except Exception as e:  # safetensors raises several types for corrupt files
      raise WeightLoadError(path, other=[f"not a readable safetensors file ({e})"]) from e
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except Exception as e:
      raise WeightLoadError(path, other=[f"not a readable .npz file ({e})"]) from e
  if ext in TORCH_EXTENSIONS:
    obj, tensor = load_torch_file(path), torch_module().Tensor
    if not isinstance(obj, Mapping):
      raise WeightLoadError(path, other=[f"expected a dict of tensors, got {type(obj).__name__}"])
    if subkey is None and not all(isinstance(v, tensor) for v in obj.values()):
      subkey = next((k for k in prefer if k in obj), prefer[0])
    if subkey is not None:
      if subkey not in obj:
        raise WeightLoadError(path, other=[
            f"checkpoint has no entry {subkey!r}; entries: {sorted(map(str, obj))}"])
      obj = obj[subkey]
      if not isinstance(obj, Mapping):
        raise WeightLoadError(path, other=[
            f"entry {subkey!r} is a {type(obj).__name__}, not a dict of tensors"])
    out, bad = {}, []
    for k, v in obj.items():
      if isinstance(v, tensor):
        out[k] = torch_to_numpy(v)
      else:
        bad.append(f"{k}: not a tensor ({type(v).__name__})")
    if bad:
      raise WeightLoadError(path, other=bad)
    return out
  raise WeightLoadError(path, other=[
      f"unknown weight format {ext!r}; expected .safetensors, .pt/.pth/.bin/.ckpt or .npz"])


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keeps the keys under `prefix` (with the prefix removed)."""
  if not prefix:
    return dict(state)
  if not prefix.endswith("."):
    prefix += "."
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_hf_config(path: str) -> dict:
  """config.json of a Hugging Face `save_pretrained` folder."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise WeightLoadError(path, other=["no config.json: not a Hugging Face model folder"])
  with open(cfg_path) as f:
    return json.load(f)


def read_hf_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, tensors) of a `save_pretrained` folder.

  Reads every *.safetensors file (shards included), else `pytorch_model.bin` (weights_only).
  """
  config = read_hf_config(path)
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    files = ["pytorch_model.bin"]
  if not files:
    raise WeightLoadError(path, other=["no *.safetensors or pytorch_model.bin weights"])
  state = {}
  for name in files:
    state.update(read_state_dict(os.path.join(path, name)))
  return config, state
