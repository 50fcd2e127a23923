r"""Will a config fit a TPU slice, and what will a step cost? Compiled ahead of time, anywhere.

  python -m vfmtok_jax.aot --config configs/tokenizer.py:official --topology v5p:2x2x2
  python -m vfmtok_jax.aot --config configs/gpt.py:gpt_xxl --topology v5p:4x4x8 \
      --mesh.data=1 --mesh.fsdp=128 --what train,sample --json plan.json

Lowers and compiles, for the devices libtpu describes for `--topology` (v4, v5e, v5p, v6e;
`pip install "jax[tpu]"`), the train step the trainer runs (tokenizer or GPT, told apart by the
config) with its shardings and, for a GPT, the sampler's generation (`--sample_batch` images,
classifier-free guidance at `--cfg_scale`, 1 for CFG-free). Prints per-chip memory against the
chip's HBM, FLOPs and bytes per step and a roofline estimate of the step time and MFU
(see `tasks/aot_plan.py`). Exits with status 1, and the change that would make it fit, when a
program does not fit. `--mesh.*` and `--sharding` override the config's (as
`--config.mesh.fsdp=...` does).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow comes in with the input pipeline's imports and runs nothing here; without this it
# announces its oneDNN kernels.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only TPU devices need no accelerator
# Compiling for a described topology never touches a chip: do not contend for libtpu's lock
# with a job (or a test) that holds it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# pylint: disable=wrong-import-position

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags

from vfmtok_jax import cli_setup
from vfmtok_jax import tpu_topology
from vfmtok_jax.tasks import aot_plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/{tokenizer,gpt}.py:VARIANT",
                                          lock_config=True)
_MESH = config_flags.DEFINE_config_dict(
    "mesh", ml_collections.ConfigDict(dict(data=0, fsdp=0, tensor=0)),
    "mesh axes overriding config.mesh (0: the config's; -1: the rest of the chips)")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x8, v4:2x2x4, v5e:4x4, "
                                "v6e:8x16")
_SHARDING = flags.DEFINE_string("sharding", "", "sharding preset overriding config.sharding")
_WHAT = flags.DEFINE_list("what", ["train"], "programs to plan: train, sample (GPT only)")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 0, "images per sampling batch (default: "
                                     "one per chip)")
_CFG = flags.DEFINE_float("cfg_scale", 1.5, "sampler guidance scale (1: CFG-free)")
_VFM_ARCH = flags.DEFINE_string("vfm_arch", "", "tokenizer VFM architecture when config.vfm."
                                "source does not name one (vitl14_reg4, vitb14, ...)")
_JSON = flags.DEFINE_string("json", "", "also write the plans here as JSON")


def _configured(config):
  overrides = {k: int(v) for k, v in _MESH.value.items() if v != 0}
  with config.unlocked():
    config.mesh.update(overrides)
    if _SHARDING.value:
      config.sharding = _SHARDING.value
  return config


def _plans(config, topo, devices):
  is_tokenizer = "vfm" in config
  unknown = set(_WHAT.value) - {"train", "sample"}
  if unknown:
    raise app.UsageError(f"--what {sorted(unknown)}: expected train and/or sample")
  if is_tokenizer and "sample" in _WHAT.value:
    raise app.UsageError("--what=sample plans the GPT's sampler; this is a tokenizer config")
  if "train" in _WHAT.value:
    yield (aot_plan.tokenizer_train_plan(config, topo, devices,
                                         aot_plan.abstract_vfm(config, _VFM_ARCH.value))
           if is_tokenizer else aot_plan.gpt_train_plan(config, topo, devices))
  if "sample" in _WHAT.value:
    yield aot_plan.decode_plan(config, topo, devices, batch=_SAMPLE_BATCH.value or len(devices),
                               cfg_scale=_CFG.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Executables compiled for a described topology cannot be loaded back from a cache.
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    topo = tpu_topology.parse(_TOPOLOGY.value)
    devices = tpu_topology.devices(topo)
  except tpu_topology.TopologyError as e:
    sys.exit(f"error: {e}")
  config = _configured(_CONFIG.value)
  plans, failed = [], []
  try:
    for plan in _plans(config, topo, devices):
      print(aot_plan.describe(plan), flush=True)
      plans.append(plan)
      if not plan.fits:
        failed.append(plan)
        print(f"  suggestion: {aot_plan.suggestion(plan)}", flush=True)
  except (aot_plan.PlanError, ValueError) as e:
    sys.exit(f"error: {e}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump([p.as_dict() for p in plans], f, indent=1)
  if failed:
    sys.exit(f"does not fit on {topo.name}: " + ", ".join(p.program for p in failed))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "topology"])
  cli_setup.run(main)
