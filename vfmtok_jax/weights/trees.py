"""Key maps from Flax param paths to source tensors, and the one checked assembly.

A key map sends each flat Flax path ('blocks_0/attn/qkv/kernel') to (source key, transform)
or ((key1, key2, ...), combine). `assemble` walks the expected tree (from `expected_params`),
pulls every leaf from the source, checks its shape, and reports every missing, unexpected and
mis-shaped tensor in a single `WeightLoadError`. Nothing loads partially unless the caller
passes `allow_missing`/`allow_unexpected` explicitly.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import flax
import flax.linen as nn
import jax
import numpy as np

from vfmtok_jax.weights.files import WeightLoadError

Transform = Callable[[np.ndarray], np.ndarray]
Source = tuple  # (key, transform) or (tuple_of_keys, combine_fn)


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
  """Arrays joined along axis 0 (e.g. q, k, v biases -> one qkv bias)."""
  return np.concatenate(arrays, axis=0)


# ----------------------------------------------------------------------------------------------
# Key-map entries.
# ----------------------------------------------------------------------------------------------

def ln_entries(prefix: str) -> dict:
  """LayerNorm `prefix.weight/bias` -> {'scale', 'bias'}."""
  return {"scale": (f"{prefix}.weight", identity), "bias": (f"{prefix}.bias", identity)}


def dense_entries(prefix: str) -> dict:
  """Linear `prefix.weight/bias` -> {'kernel', 'bias'}."""
  return {"kernel": (f"{prefix}.weight", linear), "bias": (f"{prefix}.bias", identity)}


def nest(path: str, entries: Mapping[str, tuple]) -> dict:
  """Prefixes mapping entries with a Flax path."""
  return {f"{path}/{k}": v for k, v in entries.items()}


# ----------------------------------------------------------------------------------------------
# Trees.
# ----------------------------------------------------------------------------------------------

def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def expected_params(module: nn.Module, *args, rng_seed: int = 0, **kwargs) -> dict:
  """Unboxed abstract `params` tree of `module.init(rng, *args, **kwargs)` (no FLOPs spent)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(rng_seed), *args, **kwargs))
  return nn.unbox(shapes)["params"]


def assemble(expected: Mapping[str, Any], mapping: Mapping[str, Source],
             state: Mapping[str, np.ndarray], *, source: str,
             ignore: Iterable[str] = (), allow_missing: bool = False,
             allow_unexpected: bool = False) -> dict:
  """Builds a param tree from `state` following `mapping`, checking every tensor.

  Args:
    expected: the target tree (arrays or ShapeDtypeStructs), e.g. `expected_params(...)`.
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
    KeyError: `mapping` names a path that `expected` does not have (a key-map bug).
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
