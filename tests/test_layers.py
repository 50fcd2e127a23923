"""The layering of the package: no module imports from a layer above its own, and no
`vfmtok_jax` import hides inside a function."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "vfmtok_jax"

# Bottom to top; a module may import from its own layer and the ones before it.
LAYERS = (
    ("vfmtok_jax.ops", "vfmtok_jax.sharding", "vfmtok_jax.orbax_io", "vfmtok_jax.weights",
     "vfmtok_jax.distributed", "vfmtok_jax.compilation_cache", "vfmtok_jax.cli_setup",
     "vfmtok_jax.tpu_topology", "vfmtok_jax.compute_dtype"),
    ("vfmtok_jax.models",),
    ("vfmtok_jax.vfm_zoo", "vfmtok_jax.vfmtok", "vfmtok_jax.tokenizer_io", "vfmtok_jax.gpt_io"),
    ("vfmtok_jax.losses", "vfmtok_jax.data"),
    ("vfmtok_jax.evaluators",),
    ("vfmtok_jax.train",),
    ("vfmtok_jax.tasks",),
    ("vfmtok_jax.train_tokenizer", "vfmtok_jax.features", "vfmtok_jax.tokenize",
     "vfmtok_jax.convert", "vfmtok_jax.train_gpt", "vfmtok_jax.extract_codes",
     "vfmtok_jax.sample", "vfmtok_jax.demo", "vfmtok_jax.evaluate", "vfmtok_jax.eval_tokenizer",
     "vfmtok_jax.eval_generator", "vfmtok_jax.score_demo", "vfmtok_jax.linear_probe",
     "vfmtok_jax.aot"),
)


def _layer(module: str) -> int | None:
  for i, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  return None


def _modules():
  for path in sorted(PACKAGE.rglob("*.py")):
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    name = ".".join(rel.parts).removesuffix(".__init__")
    yield name, ast.parse(path.read_text(), str(path))


def _imports(tree):
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield node, alias.name
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        yield node, f"{node.module}.{alias.name}"


def test_every_module_has_a_layer():
  unplaced = [name for name, _ in _modules() if name != "vfmtok_jax" and _layer(name) is None]
  assert unplaced == []


def test_no_module_imports_from_a_higher_layer():
  problems = []
  for name, tree in _modules():
    own = _layer(name)
    for node, target in _imports(tree):
      if not target.startswith("vfmtok_jax."):
        continue
      other = _layer(target)
      if own is not None and other is not None and other > own:
        problems.append(f"{name}:{node.lineno} imports {target}")
  assert problems == []


def test_no_package_import_inside_a_function():
  problems = []
  for name, tree in _modules():
    for fn in ast.walk(tree):
      if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for node, target in _imports(fn):
          if target.startswith("vfmtok_jax"):
            problems.append(f"{name}:{node.lineno} imports {target} inside {fn.name}()")
  assert problems == []
