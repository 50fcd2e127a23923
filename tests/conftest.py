"""Test setup: 8 fake CPU devices (set before jax is imported), fixture paths, markers."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

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
