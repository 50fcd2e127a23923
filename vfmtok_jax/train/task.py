"""What a trainer plugs into the training loop.

A task owns everything model-specific: how its state is initialised (from an rng, traceable, with
logical axis names on the params), which frozen inputs its step reads ("constants": a frozen VFM,
loss networks), the shapes of a batch, the step itself, its data, its evaluation, its log line
and its export. The loop (`loop.run`) owns everything else: mesh and shardings, restore-or-init,
jit with donation, the non-finite guard, checkpoints, preemption, logging and progress.

Shapes come before weights: `init_state`, `abstract_constants` and `batch_shapes` must work
under `jax.eval_shape` without reading a file, so a step can be compiled ahead of time for a
topology this machine does not have (`program.make_program`).
"""

from __future__ import annotations

import abc
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from vfmtok_jax.train import state as state_lib


class Task(abc.ABC):
  """A trainer's model-specific half (see module docstring)."""

  #: model families whose logical-axis tables (`sharding.MODEL_RULES`) the task's params use.
  rule_families: tuple[str, ...] = ()

  @abc.abstractmethod
  def init_state(self, rng: jax.Array) -> state_lib.TrainState:
    """A fresh state; leaves may be `nn.LogicallyPartitioned` (traced, never run eagerly)."""

  @abc.abstractmethod
  def abstract_constants(self) -> Any:
    """Shapes of the frozen step inputs (leaves `ShapeDtypeStruct`, optionally boxed in
    `nn.LogicallyPartitioned` to be sharded); `{}` when there are none."""

  @abc.abstractmethod
  def load_constants(self) -> Any:
    """The frozen step inputs as host arrays, in the tree of `abstract_constants` (unboxed)."""

  @abc.abstractmethod
  def batch_shapes(self) -> Mapping[str, jax.ShapeDtypeStruct]:
    """Global shapes of one training batch; every leading dimension is the global batch."""

  @abc.abstractmethod
  def train_step(self, state: state_lib.TrainState, constants, batch
                 ) -> tuple[state_lib.TrainState, dict, jax.Array]:
    """(state, constants, batch) -> (new state, scalar metrics incl. "loss", ok).

    Pure and traceable. `ok` is a bool scalar, False when the step must be discarded
    (non-finite); the loop keeps the old state then and advances the step counter itself.
    """

  def init_from_data(self, program, state: state_lib.TrainState, constants
                     ) -> state_lib.TrainState:
    """A fresh state adjusted from data before the first step (e.g. a codebook seeded by
    k-means); called once per run that starts from scratch, never on resume."""
    del program, constants
    return state

  @abc.abstractmethod
  def train_iterator(self, start_position: int, batch_shardings) -> Iterator[dict]:
    """Global batches from data position `start_position` (= steps already consumed)."""

  def evaluate(self, program, state: state_lib.TrainState, constants, step: int
               ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """(scalar metrics, {name: uint8 HWC image}) at `step`; the loop logs and saves them."""
    del program, state, constants, step
    return {}, {}

  def eval_line(self, step: int, metrics: Mapping[str, float]) -> str:
    return f"eval step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))

  def log_line(self, step: int, total_steps: int, metrics: Mapping[str, float], eta: str) -> str:
    return (f"step {step}/{total_steps} loss={metrics['loss']:.4f} "
            f"{metrics.get('steps_per_sec', 0.0):.2f} steps/s ETA {eta}")

  def export(self, state: state_lib.TrainState, workdir: str) -> dict[str, Any]:
    """Writes the end product (called on every process at the end); returns what to report."""
    del state, workdir
    return {}
