"""Test setup: 8 fake CPU devices (set before jax is imported), fixture paths, markers."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Identical programs (the same tiny trainer in several tests and subprocesses) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# XLA:CPU compile time dominates this suite (tiny shapes); skip most optimisation passes.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# The AOT tests load libtpu for compile-only TPU descriptions (no chips), possibly in both
# pytest-xdist workers at once; without this the second fails on libtpu's lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import pathlib  # pylint: disable=g-import-not-at-top

import numpy as np  # pylint: disable=g-import-not-at-top
import pytest  # pylint: disable=g-import-not-at-top

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> pathlib.Path:
  return FIXTURES


@pytest.fixture(scope="session")
def tokenizer_io():
  with np.load(FIXTURES / "tokenizer_io.npz") as f:
    return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def tokenizer_state():
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(str(FIXTURES / "tokenizer.safetensors"))


@pytest.fixture(scope="session")
def golden_tokenizer(tmp_path_factory):
  """(folder, VFMTok) of the golden tokenizer, its VFM read at 112 px (8 x 8 patches: fast)."""
  from tests import tiny_training  # pylint: disable=g-import-not-at-top
  from vfmtok_jax import tokenizer_io as tok_io  # pylint: disable=g-import-not-at-top
  from vfmtok_jax.convert import __main__ as convert_cli  # pylint: disable=g-import-not-at-top
  c = tiny_training.golden_tokenizer_config(vfm_size=112)
  path = str(tmp_path_factory.mktemp("tok") / "tok")
  convert_cli.convert_tokenizer(str(FIXTURES / "tokenizer.safetensors"), path, c)
  return path, tok_io.load_tokenizer(path)


@pytest.fixture(scope="session")
def golden_gpt(tmp_path_factory):
  """(folder, model, params) of the golden GPT (vocab 512, 16 tokens, 10 classes)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  from vfmtok_jax import gpt_io  # pylint: disable=g-import-not-at-top
  state = load_file(str(FIXTURES / "gpt.safetensors"))
  model, params = gpt_io.gpt_from_state(state, source="golden", num_heads=4, block_size=16)
  path = str(tmp_path_factory.mktemp("gpt") / "gpt")
  gpt_io.save_gpt(path, model, params, source="golden")
  return path, model, params


# The longest tests (multi-process and subprocess trainings) start first, so that with
# `-n 2` the other worker runs the short ones alongside instead of both waiting at the end.
LONGEST_FIRST = (
    "tests/test_multihost.py::test_two_processes_match_one",
    "tests/test_train_tokenizer.py::test_resume_is_bitwise",
    "tests/test_multihost.py::test_late_process_does_not_time_out_the_first_collective",
    "tests/test_train_tokenizer.py::test_outputs_logs_images_export",
)


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.nodeid, len(rank)))  # stable: the rest keep order
