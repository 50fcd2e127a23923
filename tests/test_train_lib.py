"""The training library on a toy task (linear regression): it knows nothing of tokenizers, so any
trainer (the GPT next) plugs in the same way."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vfmtok_jax import sharding as shd
from vfmtok_jax.train import checkpoint as ckpt_lib
from vfmtok_jax.train import loop
from vfmtok_jax.train import program as program_lib
from vfmtok_jax.train import state as state_lib
from vfmtok_jax.train import task as task_lib


class Linear(nn.Module):
  width: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                ("embed", "mlp")),
                        (x.shape[-1], self.width))
    return x @ kernel


class ToyTask(task_lib.Task):
  """y = x @ W_true + frozen offset; the offset is the step's constant."""
  rule_families = ("tokenizer",)

  def __init__(self, width=8, batch=8, nan_steps=()):
    self.model, self.width, self.batch = Linear(width), width, batch
    self.tx = optax.adam(1e-2)
    self.nan_steps = set(nan_steps)
    self.true_w = np.random.default_rng(0).normal(size=(4, width)).astype(np.float32)

  def init_state(self, rng):
    params = self.model.init(rng, jnp.zeros((1, 4)))["params"]
    return state_lib.new_state(params, self.tx.init(params), rng)

  def abstract_constants(self):
    return {"offset": jax.ShapeDtypeStruct((self.width,), jnp.float32)}

  def load_constants(self):
    return {"offset": np.full((self.width,), 0.5, np.float32)}

  def batch_shapes(self):
    return {"x": jax.ShapeDtypeStruct((self.batch, 4), jnp.float32),
            "y": jax.ShapeDtypeStruct((self.batch, self.width), jnp.float32)}

  def train_step(self, state, constants, batch):
    def loss_fn(p):
      pred = self.model.apply({"params": p}, batch["x"]) + constants["offset"]
      return jnp.mean((pred - batch["y"]) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    new = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
    return new, {"loss": loss}, jnp.isfinite(loss)

  def train_iterator(self, start_position, batch_shardings):
    step = start_position
    while True:
      step += 1
      x = np.random.default_rng(step).normal(size=(self.batch, 4)).astype(np.float32)
      y = x @ self.true_w + 0.5
      if step in self.nan_steps:
        x = x * np.nan
      yield jax.device_put({"x": x, "y": y}, batch_shardings)

  def evaluate(self, program, state, constants, step):
    err = float(np.abs(np.asarray(state.params["kernel"]) - self.true_w).mean())
    return {"eval_err": err}, {"kernel": np.zeros((4, 4, 3), np.uint8) + step % 255}

  def export(self, state, workdir):
    path = os.path.join(workdir, "export.npy")
    np.save(path, np.asarray(state.params["kernel"]))
    return {"export": path}


def _settings(**kw):
  base = dict(total_steps=6, log_every=1, eval_every=3, ckpt_every=2, keep_last=10,
              async_checkpoint=False)
  base.update(kw)
  return loop.LoopSettings(**base)


def _program(task, preset="fsdp", devices=None):
  mesh = shd.make_mesh(dict(data=2, fsdp=4, tensor=1) if devices is None else dict(data=1),
                       devices)
  return program_lib.make_program(task, mesh, preset)


def test_shardings_come_from_shapes_and_the_step_lowers():
  task = ToyTask()
  program = _program(task)
  assert program.state_shardings.params["kernel"].spec == jax.sharding.PartitionSpec("fsdp", None)
  assert program.batch_shardings["x"].spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  assert isinstance(program.abstract_state.params["kernel"], jax.ShapeDtypeStruct)
  compiled = program.lower().compile()  # from shapes only: nothing was initialised or loaded
  assert compiled.cost_analysis()["flops"] > 0


def test_matmul_precision_reaches_the_traced_step():
  mesh = shd.make_mesh(dict(data=2, fsdp=4, tensor=1))
  def dot_precisions(precision):
    text = program_lib.make_program(ToyTask(), mesh, "fsdp",
                                    matmul_precision=precision).lower().as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) >= 2  # forward and backward
    return {line.split("precision = ")[1].split("]")[0] + "]" if "precision = " in line else None
            for line in dots}
  assert dot_precisions("float32") == {"[HIGHEST, HIGHEST]"}
  assert dot_precisions("tensorfloat32") == {"[HIGH, HIGH]"}
  assert dot_precisions("default") == dot_precisions(None) == {"[DEFAULT, DEFAULT]"}
  with pytest.raises(ValueError, match="matmul_precision 'tf32'"):
    program_lib.make_program(ToyTask(), mesh, "fsdp", matmul_precision="tf32")


def test_trains_logs_evaluates_exports(tmp_path):
  task = ToyTask()
  final = loop.run(task, _program(task), str(tmp_path), _settings(), config_json='{"a": 1}')
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  losses = [l["loss"] for l in lines if "loss" in l]
  assert len(losses) == 6 and all(np.isfinite(losses))
  errs = {l["step"]: l["eval_err"] for l in lines if "eval_err" in l}
  assert list(errs) == [0, 3, 6] and errs[0] > errs[3] > errs[6]  # it learns W
  assert final["eval_err"] == errs[6] and final["eval_err_start"] == errs[0]
  assert sorted(os.listdir(tmp_path / "images")) == [f"kernel_{s:06d}.png" for s in (0, 3, 6)]
  np.testing.assert_array_equal(np.load(final["export"]).shape, (4, 8))
  assert json.loads((tmp_path / "config.json").read_text()) == {"a": 1}


def test_nonfinite_guard_skips_counts_and_stops(tmp_path):
  task = ToyTask(nan_steps={2})
  program = _program(task)
  final = loop.run(task, program, str(tmp_path / "a"), _settings(total_steps=3, eval_every=0))
  assert final["nonfinite_total"] == 1 and final["nonfinite_streak"] == 0
  lines = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
  assert lines[1]["param_norm"] == lines[0]["param_norm"] != lines[2]["param_norm"]
  task = ToyTask(nan_steps={2, 3, 4})
  with pytest.raises(loop.NonFiniteError, match="3 consecutive"):
    loop.run(task, _program(task), str(tmp_path / "b"),
             _settings(eval_every=0, max_nonfinite_streak=2))


def test_resume_is_bitwise_and_a_changed_config_is_recorded_apart(tmp_path):
  task = ToyTask()
  loop.run(task, _program(task), str(tmp_path / "a"), _settings(), config_json='{"v": 1}')
  for _ in range(3):
    loop.run(task, _program(task), str(tmp_path / "b"), _settings(max_steps_per_run=2),
             config_json='{"v": 1}' if _ == 0 else '{"v": 2}')
  program = _program(task)
  with ckpt_lib.Checkpointer(str(tmp_path / "a" / "ckpt"), save_every=2) as c:
    a, _ = c.restore(program.abstract_state)
  with ckpt_lib.Checkpointer(str(tmp_path / "b" / "ckpt"), save_every=2) as c:
    b, meta = c.restore(program.abstract_state)
  assert meta["step"] == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  assert json.loads((tmp_path / "b" / "config.json").read_text()) == {"v": 1}
  assert json.loads((tmp_path / "b" / "config.resumed_at_2.json").read_text()) == {"v": 2}


def test_mismatched_checkpoint_names_the_array_and_writes_nothing(tmp_path):
  task = ToyTask(width=8)
  loop.run(task, _program(task), str(tmp_path), _settings(total_steps=2, eval_every=0),
           config_json='{"width": 8}')
  before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  other = ToyTask(width=4)
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match=r"ema_params/kernel: stored shape \(4, 8\), requested \(4, 4\)"):
    loop.run(other, _program(other), str(tmp_path), _settings(eval_every=0),
             config_json='{"width": 4}')
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_rule_tables_compose_per_model_family():
  assert dict(shd.rules("fsdp", "tokenizer"))["embed"] == "fsdp"
  assert dict(shd.rules("dp", "tokenizer"))["act_batch"] == shd.BATCH_AXES
  with pytest.raises(shd.MeshError, match="no sharding rules for model family 'gpt2'"):
    shd.rules("fsdp", "gpt2")
  shd.MODEL_RULES["toy"] = {"dp": (), "fsdp": (("vocab", "tensor"),),
                            "fsdp_tp": (("embed", "tensor"),)}
  try:
    assert dict(shd.rules("fsdp", "tokenizer", "toy"))["vocab"] == "tensor"
    with pytest.raises(shd.MeshError, match="logical axis 'embed'"):
      shd.rules("fsdp_tp", "tokenizer", "toy")
  finally:
    del shd.MODEL_RULES["toy"]
