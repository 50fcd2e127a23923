"""The weights layer: safe torch loading (reference training checkpoints load, nothing else
unpickles), and the package layering (models below weights' users, weights at the bottom)."""

from __future__ import annotations

import argparse
import ast
import collections
import functools
import os
import pathlib
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from tests import tiny_training
from vfmtok_jax import tokenizer_io
from vfmtok_jax.convert import __main__ as convert_cli
from vfmtok_jax.weights import files

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vfmtok_jax"


# ----------------------------------------------------------------------------------------------
# Reference-format training checkpoints.
# ----------------------------------------------------------------------------------------------

def _adam_state() -> dict:
  """A real `torch.optim.Adam` state dict after one step over two tensors."""
  params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
  opt = torch.optim.Adam(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
  sum((p ** 2).sum() for p in params).backward()
  opt.step()
  return opt.state_dict()


def _golden_config():
  return tiny_training.golden_tokenizer_config()


@pytest.fixture(scope="module")
def training_ckpt(tmp_path_factory, fixtures_dir):
  """The golden weights saved as the reference's `vq_train.py` saves a training checkpoint."""
  state = load_file(str(fixtures_dir / "tokenizer.safetensors"))
  ema = {k: torch.from_numpy(v) for k, v in state.items()}
  model = {k: v + 1.0 if k == "post_slots_quant.bias" else v for k, v in ema.items()}
  torch.manual_seed(0)
  ckpt = {
      "model": model, "ema": ema, "optimizer": _adam_state(),
      "discriminator": {"heads.0.0.0.bias": torch.zeros(4)}, "optimizer_disc": _adam_state(),
      "steps": 1234,
      "args": argparse.Namespace(vq_model="VQ-16", image_size=256, lr=1e-4, betas=(0.9, 0.95),
                                 results_dir="results", mixed_precision="bf16",
                                 no_local_save=False, vq_ckpt=None),
  }
  path = tmp_path_factory.mktemp("train") / "0001234.pt"
  torch.save(ckpt, path)
  return path


def test_training_checkpoint_loads_whole(training_ckpt):
  obj = files.load_torch_file(str(training_ckpt))
  assert obj["steps"] == 1234 and isinstance(obj["args"], argparse.Namespace)
  assert obj["args"].betas == (0.9, 0.95) and obj["args"].vq_ckpt is None
  assert obj["optimizer"]["param_groups"][0]["lr"] == 1e-4
  state = obj["optimizer"]["state"][0]
  assert set(state) == {"step", "exp_avg", "exp_avg_sq"} and state["exp_avg"].shape == (3, 4)


def test_training_checkpoint_converts_like_the_bare_state(training_ckpt, fixtures_dir, tmp_path,
                                                          capsys):
  config = _golden_config()
  convert_cli.convert_tokenizer(str(training_ckpt), str(tmp_path / "from_ckpt"), config)
  assert "DINOv2 backbone" in capsys.readouterr().out
  convert_cli.convert_tokenizer(str(fixtures_dir / "tokenizer.safetensors"),
                                str(tmp_path / "from_bare"), config)
  got = tokenizer_io.load_tokenizer(str(tmp_path / "from_ckpt"))
  want = tokenizer_io.load_tokenizer(str(tmp_path / "from_bare"))
  assert got.model == want.model and got.vfm.module == want.vfm.module
  jax.tree.map(np.testing.assert_array_equal, got.params, want.params)  # the EMA entry
  jax.tree.map(np.testing.assert_array_equal, got.vfm.params, want.vfm.params)
  model_entry = convert_cli.read_tokenizer_state(str(training_ckpt), "model")
  ema_entry = convert_cli.read_tokenizer_state(str(training_ckpt))
  np.testing.assert_array_equal(model_entry["post_slots_quant.bias"],
                                ema_entry["post_slots_quant.bias"] + 1.0)


# ----------------------------------------------------------------------------------------------
# Anything else in a torch file is refused before it runs.
# ----------------------------------------------------------------------------------------------

class _RunsCommand:
  """Unpickling calls os.system(command)."""

  def __init__(self, command: str):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _WritesFile:
  """Unpickling constructs this test class, whose __setstate__ writes a file."""

  def __init__(self, path: str):
    self.path = path

  def __setstate__(self, state):
    pathlib.Path(state["path"]).write_text("unpickled")


class _OrderedSubclass(collections.OrderedDict):
  pass


def _payloads(marker: pathlib.Path) -> dict:
  return {
      "os.system": {"model": {"w": torch.zeros(2)}, "x": _RunsCommand(f"touch {marker}")},
      "test class": {"model": {"w": torch.zeros(2)}, "x": _WritesFile(str(marker))},
      "OrderedDict subclass": _OrderedSubclass(w=torch.zeros(2)),
      "functools.partial": {"model": {"w": torch.zeros(2)},
                            "x": functools.partial(os.system, f"touch {marker}")},
      "inside a Namespace": {"model": {"w": torch.zeros(2)},
                             "args": argparse.Namespace(x=_RunsCommand(f"touch {marker}"))},
  }


@pytest.mark.parametrize("kind", list(_payloads(pathlib.Path("m"))))
def test_other_pickled_objects_are_refused(tmp_path, kind):
  marker = tmp_path / "marker"
  path = tmp_path / "evil.pt"
  torch.save(_payloads(marker)[kind], path)
  assert not marker.exists()
  with pytest.raises(files.WeightLoadError, match="weights_only"):
    files.read_state_dict(str(path))
  with pytest.raises(files.WeightLoadError, match="weights_only"):
    files.load_torch_file(str(path))
  assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# Layering.
# ----------------------------------------------------------------------------------------------

def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, node: ast.AST | None = None):
  """(line, imported name) for every import under `node` (default: the whole file).

  `from a.b import c` yields `a.b.c` (a submodule or an attribute of a.b: either way it starts
  with the module it comes from); relative imports are resolved against the file's package.
  """
  tree = node or ast.parse(path.read_text(), str(path))
  package = _module_name(path)
  if path.name != "__init__.py":
    package = package.rpartition(".")[0]
  for n in ast.walk(tree):
    if isinstance(n, ast.Import):
      for alias in n.names:
        yield n.lineno, alias.name
    elif isinstance(n, ast.ImportFrom):
      base = n.module or ""
      if n.level:
        anchor = package.split(".")[:len(package.split(".")) - (n.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      for alias in n.names:
        yield n.lineno, f"{base}.{alias.name}" if base else alias.name


def _under(name: str, prefixes) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _sources(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(folder.rglob("*.py"))


def test_models_import_no_weights_loaders_or_losses():
  forbidden = [f"vfmtok_jax.{m}" for m in ("weights", "convert", "losses", "vfm_zoo",
                                           "tokenizer_io", "vfmtok")]
  bad = [f"{p.relative_to(PACKAGE.parent)}:{line}: {name}"
         for p in _sources(PACKAGE / "models") for line, name in _imports(p)
         if _under(name, forbidden)]
  assert not bad, "models/ must not import these layers:\n" + "\n".join(bad)


def test_weights_is_the_bottom_layer():
  third_party = ("numpy", "flax", "jax", "safetensors", "torch", "onnx")
  bad = []
  for p in _sources(PACKAGE / "weights"):
    for line, name in _imports(p):
      top = name.split(".")[0]
      if top == "vfmtok_jax":
        ok = _under(name, ["vfmtok_jax.weights"])
      else:
        ok = top in third_party or top in sys.stdlib_module_names or top == "__future__"
      if not ok:
        bad.append(f"{p.relative_to(PACKAGE.parent)}:{line}: {name}")
  assert not bad, ("weights/ may import only the standard library, "
                   f"{', '.join(third_party)} and vfmtok_jax.weights:\n" + "\n".join(bad))


def test_no_package_imports_inside_functions():
  bad = {}
  for p in _sources(PACKAGE):
    tree = ast.parse(p.read_text(), str(p))
    for fn in ast.walk(tree):  # outer functions first, so a nested import names its outermost
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for line, name in _imports(p, fn):
          if _under(name, ["vfmtok_jax"]):
            bad.setdefault((str(p.relative_to(PACKAGE.parent)), line, name), fn.name)
  assert not bad, "vfmtok_jax imports belong at the top of the module:\n" + "\n".join(
      f"{f}:{line}: {name} (in {fn})" for (f, line, name), fn in sorted(bad.items()))
