"""Orbax checkpoints of a whole train state, with preemption handling.

One `CheckpointManager` under `workdir/ckpt` holds, per step, two items:
  state  the train-state pytree, restored only into the abstract, sharded tree the trainer
         expects (checked first: `check_compatible` names the first mismatching array);
  meta   JSON: step, the data-iterator position, and the config it was written with.
Saves are asynchronous; Orbax commits a step atomically (a temporary directory renamed when
complete), so a process killed mid-save leaves nothing that a restart would read.
Retention: the latest `keep_last` plus every `keep_every`-th step. Use the `Checkpointer` as a
context manager (or call `close`) so its background threads stop on every path.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from vfmtok_jax import orbax_io


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the expected train state."""


def _registry() -> ocp.handlers.DefaultCheckpointHandlerRegistry:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
    registry.add("state", args, ocp.StandardCheckpointHandler)
  for args in (ocp.args.JsonSave, ocp.args.JsonRestore):
    registry.add("meta", args, ocp.JsonCheckpointHandler)
  return registry


class Checkpointer:
  """Wraps `ocp.CheckpointManager` with the trainer's items and restore rules."""

  def __init__(self, directory: str, *, save_every: int, keep_last: int = 3,
               keep_every: int | None = None, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    policies = [ocp.checkpoint_managers.LatestN(max(keep_last, 1))]
    if keep_every:
      policies.append(ocp.checkpoint_managers.EveryNSteps(keep_every))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every, create=True, enable_async_checkpointing=async_save,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         handler_registry=_registry())
    self._closed = False

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save; returns whether one was started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def check_compatible(self, abstract_state, step: int) -> None:
    """Raises CheckpointMismatchError unless `step`'s stored state has exactly the paths,
    shapes and dtypes of `abstract_state`; reads metadata only, writes nothing."""
    stored = self.manager.item_metadata(step)["state"]
    problem = orbax_io.first_mismatch(stored, abstract_state)
    if problem is not None:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory} step {step} does not match this run's train state "
          f"(a different model/optimizer config?): {problem}. Use another --workdir, or the "
          "config that wrote it (see config.json there).")

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default latest) restored into `abstract_state`'s tree and
    shardings (a pytree of `jax.ShapeDtypeStruct` with `.sharding`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    self.check_compatible(abstract_state, step)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a pending save and stops the manager's threads (idempotent)."""
    if self._closed:
      return
    self._closed = True
    try:
      self.manager.wait_until_finished()
    finally:
      self.manager.close()


class PreemptionFlag:
  """Set by SIGTERM; the loop checkpoints and exits cleanly when it is set."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self.signal_name = ""
    self._previous = {}
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handler)

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def is_set(self) -> bool:
    return self._event.is_set()

  def any_process_set(self) -> bool:
    """True when any process was signalled (all processes must stop at the same step)."""
    if jax.process_count() == 1:
      return self.is_set()
    flags = multihost_utils.process_allgather(np.asarray([int(self.is_set())]))
    return bool(np.asarray(flags).any())

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
