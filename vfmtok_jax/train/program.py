"""A task's jitted train step with explicit shardings, from shapes alone.

`make_program(task, mesh)` evaluates the task's init, constants and batch abstractly
(`jax.eval_shape`: no weights read, no device memory touched), derives every sharding from the
logical axis names and returns the jitted, donating step with its shaped inputs. Training calls
`program.step`; an ahead-of-time planner calls `program.lower().compile()` on a mesh of a
topology's devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from typing import Any, Callable

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding

from vfmtok_jax import distributed
from vfmtok_jax import orbax_io
from vfmtok_jax import sharding as shd
from vfmtok_jax.train import state as state_lib
from vfmtok_jax.train import task as task_lib


@dataclasses.dataclass
class TrainProgram:
  """The compiled-to-be step of one task on one mesh."""
  mesh: Mesh
  rules: list
  state_shardings: Any
  constant_shardings: Any
  batch_shardings: Any
  abstract_state: Any        # ShapeDtypeStructs with shardings (also the restore target)
  abstract_constants: Any
  abstract_batch: Any
  _init: Callable
  _step: Callable
  matmul_precision: str | None = None  # jax.default_matmul_precision while tracing

  def context(self):
    """The mesh and logical-axis rules the task's modules trace under."""
    return _Context(self.mesh, self.rules, self.matmul_precision)

  def __post_init__(self):
    self._synced_init = _CompiledInLockstep(self._init, "init")
    self._synced_step = _CompiledInLockstep(self._step, "train_step")

  def init(self, rng: jax.Array) -> state_lib.TrainState:
    with self.context():
      return self._synced_init(rng)

  def step(self, state, constants, batch):
    """(state, constants, batch) -> (state, metrics); `state` is donated."""
    with self.context():
      return self._synced_step(state, constants, batch)

  def lower(self):
    """`jax.jit(...).lower` on the shaped inputs (then `.compile()`, `.cost_analysis()`)."""
    with self.context():
      return self._step.lower(self.abstract_state, self.abstract_constants, self.abstract_batch)

  def jit(self, fn: Callable, **kwargs) -> Callable:
    """`jax.jit(fn, **kwargs)` whose calls trace under this program's mesh and rules."""
    synced = _CompiledInLockstep(jax.jit(fn, **kwargs), getattr(fn, "__name__", "fn"))

    def call(*args):
      with self.context():
        return synced(*args)
    return call

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return shd.batch_sharding(self.mesh, ndim)


# Every process compiles the same functions in the same order, so this count names the same
# barrier on each.
_COMPILATIONS = itertools.count()


class _CompiledInLockstep:
  """A jitted function that, with several processes, compiles each new input signature and
  waits for every process to finish compiling it before the first run.

  Without this, a process that compiles faster enters the program's first collective alone,
  and CPU collectives (gloo) give up after 30 s. With one process it is the jitted function.
  """

  def __init__(self, jitted: Callable, name: str):
    self._jitted, self._name = jitted, name
    self._compiled: dict[Any, Any] = {}

  def __call__(self, *args):
    if jax.process_count() == 1:
      return self._jitted(*args)
    leaves, treedef = jax.tree.flatten(args)
    key = (treedef, tuple((getattr(x, "shape", None), getattr(x, "dtype", type(x)),
                           getattr(x, "sharding", None)) for x in leaves))
    if key not in self._compiled:
      self._compiled[key] = self._jitted.lower(*args).compile()
      distributed.barrier(f"vfmtok_compiled_{next(_COMPILATIONS)}_{self._name}")
    return self._compiled[key](*args)


class _Context:

  def __init__(self, mesh, rules, matmul_precision):
    self._mesh, self._rules, self._precision = mesh, rules, matmul_precision
    self._stack = None

  def __enter__(self):
    self._stack = contextlib.ExitStack()
    self._stack.enter_context(self._mesh)
    # Flax's logical constraints look for the abstract mesh (`with mesh:` alone
    # leaves them silent no-ops).
    self._stack.enter_context(jax.sharding.use_abstract_mesh(self._mesh.abstract_mesh))
    self._stack.enter_context(nn.logical_axis_rules(self._rules))
    if self._precision is not None:
      self._stack.enter_context(jax.default_matmul_precision(self._precision))

  def __exit__(self, *exc):
    return self._stack.__exit__(*exc)


MATMUL_PRECISIONS = ("default", "bfloat16", "tensorfloat32", "float32")


def make_program(task: task_lib.Task, mesh: Mesh, preset: str, *,
                 matmul_precision: str | None = None) -> TrainProgram:
  """Shardings, abstract inputs and the jitted (donating, guarded) step of `task` on `mesh`.

  Args:
    task: the trainer's task.
    mesh: a (data, fsdp, tensor) mesh (`sharding.make_mesh`), real or of a topology's devices.
    preset: the sharding preset (`sharding.PRESETS`).
    matmul_precision: f32 matmul precision while tracing ("default" / None: the backend's;
      "bfloat16": one bf16 pass; "tensorfloat32": TF32 on GPU, 3 bf16 passes on TPU;
      "float32": full precision). Convolutions follow it too.
  """
  if matmul_precision is not None and matmul_precision not in MATMUL_PRECISIONS:
    raise ValueError(f"matmul_precision {matmul_precision!r}: expected one of "
                     f"{MATMUL_PRECISIONS}")
  precision = None if matmul_precision == "default" else matmul_precision
  rules = shd.rules(preset, *task.rule_families)
  batch = dict(task.batch_shapes())
  for name, spec in batch.items():
    shd.check_batch(spec.shape[0], mesh)
  batch_shardings = {k: shd.batch_sharding(mesh, v.ndim) for k, v in batch.items()}

  with mesh, jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    boxed_state = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
  state_shardings = shd.param_shardings(boxed_state, mesh, rules)
  boxed_consts = task.abstract_constants()
  const_shardings = shd.param_shardings(boxed_consts, mesh, rules)

  abstract_state = orbax_io.abstract(nn.unbox(boxed_state), state_shardings)
  abstract_consts = orbax_io.abstract(nn.unbox(boxed_consts), const_shardings)
  abstract_batch = orbax_io.abstract(batch, batch_shardings)

  init = jax.jit(lambda rng: nn.unbox(task.init_state(rng)), out_shardings=state_shardings)
  step = jax.jit(state_lib.guard_nonfinite(task.train_step),
                 in_shardings=(state_shardings, const_shardings, batch_shardings),
                 out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=(0,))
  return TrainProgram(mesh, rules, state_shardings, const_shardings, batch_shardings,
                      abstract_state, abstract_consts, abstract_batch, init, step, precision)


def program_from_config(task: task_lib.Task, mesh: Mesh, config) -> TrainProgram:
  """`make_program` with a trainer config's `sharding` preset and `matmul_precision`."""
  return make_program(task, mesh, config.sharding, matmul_precision=config.matmul_precision)
