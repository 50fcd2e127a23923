"""One way to read foreign weights and one way to report what does not fit.

A converter is a mapping from our Flax param paths to (source key, transform). `assemble`
walks the expected tree (from `jax.eval_shape(model.init, ...)`), pulls every leaf from the
source, checks its shape, and reports every missing, unexpected and mis-shaped tensor in a
single `WeightLoadError`. Nothing loads partially unless the caller passes `allow_missing`/
`allow_unexpected` explicitly.

State dicts are read without unpickling arbitrary objects: safetensors directly, `.pt`/`.pth`
with `torch.load(weights_only=True)`, `.npz` with `allow_pickle=False`.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import flax
import jax
import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]

# Where locally provided auxiliary weights (LPIPS VGG16, the discriminator's DINO) are looked up.
WEIGHTS_ENV = "VFMTOK_JAX_WEIGHTS"


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


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------

def _torch_to_numpy(value) -> np.ndarray:
  import torch  # pylint: disable=g-import-not-at-top
  if value.dtype == torch.bfloat16:
    value = value.float()
  return value.detach().cpu().numpy()


def read_state_dict(path: str, *, subkey: str | None = None,
                    prefer: tuple[str, ...] = ("model",)) -> dict[str, np.ndarray]:
  """Reads a flat {name: array} dict from .safetensors, .pt/.pth/.bin or .npz.

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
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    try:
      return dict(load_file(path))
    except Exception as e:  # safetensors raises several types for corrupt files
      raise WeightLoadError(path, other=[f"not a readable safetensors file ({e})"]) from e
  if ext == ".npz":
    try:
      with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
    except Exception as e:
      raise WeightLoadError(path, other=[f"not a readable .npz file ({e})"]) from e
  if ext in (".pt", ".pth", ".bin", ".ckpt"):
    import torch  # pylint: disable=g-import-not-at-top
    try:
      obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
      raise WeightLoadError(path, other=[
          f"torch.load(weights_only=True) refused or failed ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}); only plain tensor state dicts load"]
                            ) from e
    if not isinstance(obj, Mapping):
      raise WeightLoadError(path, other=[f"expected a dict of tensors, got {type(obj).__name__}"])
    if subkey is None and not all(isinstance(v, torch.Tensor) for v in obj.values()):
      subkey = next((k for k in prefer if k in obj), prefer[0])
    if subkey is not None:
      if subkey not in obj:
        raise WeightLoadError(path, other=[
            f"checkpoint has no entry {subkey!r}; entries: {sorted(map(str, obj))}"])
      obj = obj[subkey]
    out, bad = {}, []
    for k, v in obj.items():
      if isinstance(v, torch.Tensor):
        out[k] = _torch_to_numpy(v)
      else:
        bad.append(f"{k}: not a tensor ({type(v).__name__})")
    if bad:
      raise WeightLoadError(path, other=bad)
    return out
  raise WeightLoadError(path, other=[
      f"unknown weight format {ext!r}; expected .safetensors, .pt/.pth/.bin or .npz"])


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """Keeps the keys under `prefix` (with the prefix removed)."""
  if not prefix:
    return dict(state)
  if not prefix.endswith("."):
    prefix += "."
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------
# Transforms.
# ----------------------------------------------------------------------------------------------

def identity(x: np.ndarray) -> np.ndarray:
  return x


def linear(x: np.ndarray) -> np.ndarray:
  """PyTorch Linear (out, in) -> Flax kernel (in, out)."""
  return np.ascontiguousarray(x.T)


def conv(x: np.ndarray) -> np.ndarray:
  """PyTorch conv OIHW -> Flax HWIO."""
  return np.ascontiguousarray(x.transpose(2, 3, 1, 0))


def concat_linear(*weights: np.ndarray) -> np.ndarray:
  """Several PyTorch Linear weights (out_i, in) -> one Flax kernel (in, sum out_i)."""
  return np.concatenate([linear(w) for w in weights], axis=1)


def concat(*arrays: np.ndarray) -> np.ndarray:
  return np.concatenate(arrays, axis=0)


def ln_entries(prefix: str) -> dict:
  """LayerNorm `prefix.weight/bias` -> {'scale', 'bias'}."""
  return {"scale": (f"{prefix}.weight", identity), "bias": (f"{prefix}.bias", identity)}


def dense_entries(prefix: str) -> dict:
  """Linear `prefix.weight/bias` -> {'kernel', 'bias'}."""
  return {"kernel": (f"{prefix}.weight", linear), "bias": (f"{prefix}.bias", identity)}


def nest(path: str, entries: Mapping[str, tuple]) -> dict:
  """Prefixes mapping entries with a Flax path."""
  return {f"{path}/{k}": v for k, v in entries.items()}


def read_hf_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json dict, tensors) of a `save_pretrained` folder.

  Reads every *.safetensors file (shards included), else `pytorch_model.bin` (weights_only).
  """
  import json  # pylint: disable=g-import-not-at-top
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise WeightLoadError(path, other=["no config.json: not a Hugging Face model folder"])
  with open(cfg_path) as f:
    config = json.load(f)
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files and os.path.isfile(os.path.join(path, "pytorch_model.bin")):
    files = ["pytorch_model.bin"]
  if not files:
    raise WeightLoadError(path, other=["no *.safetensors or pytorch_model.bin weights"])
  state = {}
  for name in files:
    state.update(read_state_dict(os.path.join(path, name)))
  return config, state


# ----------------------------------------------------------------------------------------------
# Assembly.
# ----------------------------------------------------------------------------------------------

Source = tuple  # (key, transform) or (tuple_of_keys, combine_fn)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def assemble(expected: Mapping[str, Any], mapping: Mapping[str, Source],
             state: Mapping[str, np.ndarray], *, source: str,
             ignore: Iterable[str] = (), allow_missing: bool = False,
             allow_unexpected: bool = False) -> dict:
  """Builds a param tree from `state` following `mapping`, checking every tensor.

  Args:
    expected: the target tree (arrays or ShapeDtypeStructs), e.g. unboxed `eval_shape(init)`.
    mapping: flat target path ('a/b/kernel') -> (source key, transform) or
      ((key1, key2, ...), combine) where combine takes the arrays in that order.
    state: flat source tensors.
    source: a name for error messages (file path).
    ignore: source keys that are known and deliberately dropped.
    allow_missing: leave unmapped/missing leaves out instead of raising (partial load).
    allow_unexpected: do not raise on unused source keys.

  Returns:
    A nested dict of float32 numpy arrays with exactly the expected structure (minus the
    missing leaves when `allow_missing`).

  Raises:
    WeightLoadError: listing every missing, unexpected and mis-shaped tensor.
  """
  flat_expected = flatten(expected)
  missing, mismatched, used = [], [], set(ignore)
  out = {}
  unmapped = sorted(set(flat_expected) - set(mapping))
  if unmapped:
    missing.extend(f"{p} (no source mapping)" for p in unmapped)
  for path, (keys, fn) in mapping.items():
    if path not in flat_expected:
      raise KeyError(f"converter maps {path!r}, which the model does not have")
    key_tuple = (keys,) if isinstance(keys, str) else tuple(keys)
    absent = [k for k in key_tuple if k not in state]
    if absent:
      missing.extend(f"{k} (for {path})" for k in absent)
      continue
    used.update(key_tuple)
    try:
      value = fn(*[np.asarray(state[k]) for k in key_tuple])
    except Exception as e:  # a transform that cannot apply means a wrong shape
      mismatched.append(f"{' + '.join(key_tuple)}: "
                        f"{[tuple(np.shape(state[k])) for k in key_tuple]} cannot be "
                        f"converted for {path} ({e})")
      continue
    want = tuple(flat_expected[path].shape)
    if tuple(value.shape) != want:
      shapes = [tuple(np.shape(state[k])) for k in key_tuple]
      mismatched.append(f"{' + '.join(key_tuple)}: source {shapes} -> {tuple(value.shape)}, "
                        f"model {path} expects {want}")
      continue
    out[path] = np.asarray(value, dtype=np.float32)
  unexpected = sorted(set(state) - used)
  problems_missing = [] if allow_missing else missing
  problems_unexpected = [] if allow_unexpected else unexpected
  if problems_missing or problems_unexpected or mismatched:
    raise WeightLoadError(source, missing=problems_missing, unexpected=problems_unexpected,
                          mismatched=mismatched)
  return unflatten(out)


def expected_params(model, *args, rng_seed: int = 0, **kwargs) -> dict:
  """Unboxed abstract `params` tree of `model.init(rng, *args, **kwargs)`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(rng_seed), *args, **kwargs))
  return nn.unbox(shapes)["params"]
