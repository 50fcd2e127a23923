"""The one Orbax layout: a folder of JSON descriptions next to Orbax trees, checked on restore.

Three folder kinds share it:
  training checkpoints  `ckpt/<step>/{state, meta}` (train/checkpoint.py, via a
                        CheckpointManager; `state` is a tree, `meta` JSON);
  tokenizer folders     `{tokenizer.json, params/, vfm/}` (tokenizer_io.py);
  VFM folders           `{vfm.json, params/}` (vfm_zoo.py).
Every restore first compares the stored tree (its Orbax metadata: paths, shapes, dtypes) with the
tree the caller expects and raises `TreeMismatchError` naming the first difference, so a
restore never half-fills a tree or fails deep inside Orbax.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


class TreeMismatchError(ValueError):
  """A stored tree that does not fit the expected one (names the first mismatch)."""


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def _flat(tree) -> dict[str, Any]:
  leaves = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
  return {_path_str(p): v for p, v in leaves}


def first_mismatch(stored, expected) -> str | None:
  """The first difference between two trees of shaped leaves, as one line, or None.

  Leaves need `.shape` and `.dtype` (arrays, ShapeDtypeStructs, Orbax ArrayMetadata). Paths
  are compared in sorted order: a path only one side has, then a shape, then a dtype.
  """
  a, b = _flat(stored), _flat(expected)
  for path in sorted(set(a) | set(b)):
    if path not in b:
      return f"{path}: stored in the checkpoint, not in the requested tree"
    if path not in a:
      return f"{path}: requested {tuple(b[path].shape)}, not in the checkpoint"
    sa, sb = tuple(a[path].shape), tuple(b[path].shape)
    if sa != sb:
      return f"{path}: stored shape {sa}, requested {sb}"
    if np.dtype(a[path].dtype) != np.dtype(b[path].dtype):
      return f"{path}: stored dtype {np.dtype(a[path].dtype)}, requested {np.dtype(b[path].dtype)}"
  return None


def check_tree(stored, expected, *, where: str) -> None:
  """Raises TreeMismatchError when `stored` and `expected` differ (see `first_mismatch`)."""
  problem = first_mismatch(stored, expected)
  if problem is not None:
    n_stored, n_expected = len(_flat(stored)), len(_flat(expected))
    raise TreeMismatchError(f"{where} does not fit: {problem} ({n_stored} stored arrays, "
                            f"{n_expected} requested)")


def abstract(tree, shardings=None):
  """ShapeDtypeStructs of `tree` (with `shardings`, a matching tree, when given)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def save_tree(path: str, tree) -> None:
  """Writes `tree` as an Orbax checkpoint at `path` (collective across processes)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.abspath(path), tree, force=True)


def tree_metadata(path: str):
  """The stored tree of shaped metadata leaves of an Orbax checkpoint at `path`."""
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.metadata(os.path.abspath(path)).item_metadata.tree


def restore_tree(path: str, expected, *, where: str | None = None):
  """Restores the Orbax tree at `path` into the structure, shapes and dtypes of `expected`.

  Raises:
    FileNotFoundError: nothing at `path`.
    TreeMismatchError: the stored tree differs (the first difference is named).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no Orbax tree at {path}")
  target = abstract(expected) if not _has_shardings(expected) else expected
  check_tree(tree_metadata(path), target, where=where or path)
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, target)


def _has_shardings(tree) -> bool:
  leaves = jax.tree.leaves(tree)
  return bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None
                              for x in leaves)


def write_json(path: str, value: Mapping) -> None:
  """Writes JSON on process 0 only (every process may call it)."""
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(value, f, indent=2)


def read_json(path: str, *, what: str, hint: str = "") -> dict:
  """Reads the JSON description of a folder; a FileNotFoundError names `what` and `hint`."""
  if not os.path.isfile(path):
    folder = os.path.dirname(os.path.abspath(path))
    raise FileNotFoundError(f"{folder} is not a {what} (no {os.path.basename(path)})"
                            + (f"; {hint}" if hint else ""))
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------------------------
# Folders: `<path>/<json_name>` describing `<path>/params` (tokenizer and VFM folders).
# ------------------------------------------------------------------------------------------------

PARAMS = "params"


def save_folder(path: str, params, json_name: str, description: Mapping) -> None:
  """Writes `path/params` (Orbax; collective) and `path/json_name` (process 0)."""
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  save_tree(os.path.join(path, PARAMS), params)
  write_json(os.path.join(path, json_name), description)


def read_folder(path: str, json_name: str, *, what: str, hint: str = "") -> dict:
  """The JSON description of a folder written by `save_folder`."""
  return read_json(os.path.join(os.path.abspath(path), json_name), what=what, hint=hint)


def restore_folder_params(path: str, expected, *, what: str):
  """`path/params` restored into `expected`'s tree (TreeMismatchError names the difference)."""
  return restore_tree(os.path.join(os.path.abspath(path), PARAMS), expected,
                      where=f"the params of the {what} in {os.path.abspath(path)}")
