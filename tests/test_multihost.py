"""Two real JAX processes on loopback (CPU, gloo) train, save, restore, and match one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import pytest

from tests import equivalence
from tests import tiny_gpt_config
from tests import tiny_training
from tests.test_train_gpt import codes_dir  # noqa: F401  (a fixture: the tiny GPT's codes)
from vfmtok_jax.tasks import gpt as gpt_task
from vfmtok_jax.tasks import tokenizer as tokenizer_task
from vfmtok_jax.train import checkpoint as ckpt_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "tiny_training_config.py")
GPT_CONFIG = os.path.join(ROOT, "tests", "tiny_gpt_config.py")
LR = 1e-4
GPT_LR = 1e-3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.update(extra)
  return env


def _multiprocess_cache() -> str:
  """JAX's persistent cache does not tell a 2-process executable from the same program compiled
  in one process with 8 devices: reusing one deadlocks gloo. Two-process runs keep their own."""
  base = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(ROOT, ".pytest_cache",
                                                                     "jax_cache")
  return os.path.join(base, "two_processes")


def _flags(vfm, total_steps, max_steps_per_run=0, flip=True):
  return [f"--config.vfm.source={vfm}", f"--config.total_steps={total_steps}",
          f"--config.input.flip={flip}", "--config.ckpt_every=2",
          "--config.log_every=1", f"--config.max_steps_per_run={max_steps_per_run}",
          "--config.optim.warmup_steps=0", f"--config.optim.lr={LR}",
          "--config.optim.decay=constant"]


def _gpt_flags(codes, total_steps, max_steps_per_run=0):
  return [f"--config.data.codes={codes}", f"--config.total_steps={total_steps}",
          "--config.ckpt_every=2", "--config.log_every=1", "--config.keep_every=0",
          f"--config.max_steps_per_run={max_steps_per_run}", f"--config.optim.lr={GPT_LR}"]


def _train_two_processes(workdir, flags, module="vfmtok_jax.train_tokenizer", config=CONFIG):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", module, "--config", config, "--workdir", str(workdir), *flags],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env(4, JAX_COMPILATION_CACHE_DIR=_multiprocess_cache(), VFMTOK_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), VFMTOK_CPU_COLLECTIVES="gloo"))
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for i, out in enumerate(outs):
    with open(os.path.join(str(workdir), f"process_{i}.log"), "a") as f:
      f.write(out)
  for i, (p, out) in enumerate(zip(procs, outs)):
    errors = [l for l in out.splitlines() if not l.startswith(("I1", "W1"))]
    assert p.returncode == 0, f"process {i}: " + "\n".join(errors)[-4000:]
  return outs


def _train_one_process(workdir, flags, module="vfmtok_jax.train_tokenizer", config=CONFIG):
  single = subprocess.run(
      [sys.executable, "-m", module, "--config", config, "--workdir", str(workdir), *flags],
      cwd=ROOT, capture_output=True, text=True, env=_env(8), timeout=600)
  assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-3000:]


def _run_record(workdir, program, init_params):
  """(per-step losses, [updates 0->2, 2->4]) of a finished 4-step run."""
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  losses = [l["loss"] for l in sorted((l for l in lines if "loss" in l), key=lambda l: l["step"])]
  with ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), save_every=2) as ckpt:
    assert {2, 4} <= set(ckpt.all_steps())
    params = [jax.device_get(ckpt.restore(program.abstract_state, s)[0].params) for s in (2, 4)]
  return losses, [equivalence.updates(init_params, params[0]),
                  equivalence.updates(params[0], params[1])]


def test_late_process_does_not_time_out_the_first_collective():
  """The CI failure of a 2-process run: one process compiled >30 s later than the other, whose
  first collective then timed out in gloo. Compiled steps wait at a barrier instead. (Run with
  `plain` instead of `synced`, the same script fails with "Gloo context initialization
  failed".)"""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.skewed_compile", "synced"], cwd=ROOT,
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env(2, VFMTOK_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i), VFMTOK_CPU_COLLECTIVES="gloo"))
           for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
    assert "sum=22.0" in out, out[-3000:]  # [0, 1] from process 0 + [10, 11] from process 1


def _compare(tmp_path, vfm, reference: str, other: str):
  config = tiny_training.tiny_config(tmp_path, **{
      "optim.warmup_steps": 0, "optim.lr": LR,
      "optim.decay": "constant"})
  zero_grad = equivalence.tokenizer_zero_gradient_paths(config)
  _, program = tokenizer_task.build(config)
  init = jax.device_get(program.init(jax.random.PRNGKey(config.seed)).params)
  ref, run = (_run_record(tmp_path / n, program, init) for n in (reference, other))
  return equivalence.compare_runs(*ref, *run, lr=LR, steps_per_interval=2, zero_grad=zero_grad)


def test_two_gpt_processes_match_one(codes_dir, tmp_path):  # noqa: F811
  """The fast set's multi-process check (the tokenizer's twin below is `slow`: its steps cost
  minutes here): 2 processes x 4 devices train, checkpoint, stop, restore and finish as one
  process with 8 devices does, dropout on. The codes loader gives every process count the
  same global batches, so only the reductions' order differs (tolerances in equivalence.py)."""
  outs = _train_two_processes(tmp_path / "multi", _gpt_flags(codes_dir, 4, 2),
                              "vfmtok_jax.train_gpt", GPT_CONFIG)
  assert "stopping after 2 steps" in outs[0]
  outs = _train_two_processes(tmp_path / "multi", _gpt_flags(codes_dir, 4),
                              "vfmtok_jax.train_gpt", GPT_CONFIG)
  assert "step 3/4" in outs[0] and "step 2/4" not in outs[0]
  _train_one_process(tmp_path / "single", _gpt_flags(codes_dir, 4), "vfmtok_jax.train_gpt",
                     GPT_CONFIG)
  config = tiny_gpt_config.get_config()
  with config.unlocked():
    config.data.codes = codes_dir
  _, program = gpt_task.build(config)
  init = jax.device_get(program.init(jax.random.PRNGKey(config.seed)).params)
  ref, run = (_run_record(tmp_path / n, program, init) for n in ("single", "multi"))
  assert equivalence.compare_runs(*ref, *run, lr=GPT_LR, steps_per_interval=2,
                                  zero_grad=set()) == []


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  vfm = tiny_training.golden_vfm_file(tmp_path)
  # Two processes x 4 devices: 2 steps, stop (checkpoint), restart and finish at step 4.
  outs = _train_two_processes(tmp_path / "multi", _flags(vfm, 4, max_steps_per_run=2))
  assert "stopping after 2 steps" in outs[0]
  outs = _train_two_processes(tmp_path / "multi", _flags(vfm, 4))
  assert "step 3/4" in outs[0] and "step 1/4" not in outs[0] and "step 2/4" not in outs[0]
  # One process x 8 devices, uninterrupted.
  _train_one_process(tmp_path / "single", _flags(vfm, 4))
  assert _compare(tmp_path, vfm, "single", "multi") == []


@pytest.mark.slow
def test_the_comparison_catches_other_data(tmp_path):
  """The check above can fail: one process reading other crops (no flips) differs from the
  run above in losses and updates."""
  vfm = tiny_training.golden_vfm_file(tmp_path)
  _train_one_process(tmp_path / "single", _flags(vfm, 4))
  _train_one_process(tmp_path / "wrong", _flags(vfm, 4, flip=False))
  problems = _compare(tmp_path, vfm, "single", "wrong")
  assert any("losses differ" in p for p in problems), problems
  assert any("update differs" in p for p in problems), problems
