"""Orbax checkpoints of the whole training state, with preemption handling.

One `CheckpointManager` under `workdir/ckpt` holds, per step, two items:
  state  the train-state pytree (params, optimizer state, EMA, discriminator, step, RNG, counters),
         restored only into the abstract, sharded tree the trainer expects;
  meta   JSON: step, the data-iterator position, and the config it was written with.
Saves are asynchronous; Orbax commits a step atomically (a temporary directory renamed when
complete), so a process killed mid-save leaves nothing that a restart would read.
Retention: the latest `keep_last` plus every `keep_every`-th step.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the expected train state."""


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
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
    """Starts an (async) save; returns whether one was started."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, abstract_state, step: int | None = None) -> tuple[Any, dict]:
    """(state, meta) of `step` (default latest) restored into `abstract_state`'s tree and
    shardings (a pytree of `jax.ShapeDtypeStruct` with `.sharding`)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory} step {step} does not match this run's train state "
          f"(different model/optimizer config?): {e}") from e
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def kill_when_save_in_progress(directory: str, step: int, timeout: float = 30.0) -> None:
  """Fault injection for tests: SIGKILL this process as soon as the save of `step` has created
  its temporary directory, i.e. in the middle of writing it."""
  import time  # pylint: disable=g-import-not-at-top
  deadline = time.time() + timeout
  while time.time() < deadline:
    names = os.listdir(directory) if os.path.isdir(directory) else []
    if any(n.startswith(f"{step}.") and "tmp" in n for n in names):
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.0005)
  raise RuntimeError(f"no temporary checkpoint directory for step {step} appeared")


def abstract_with_shardings(tree, shardings):
  """ShapeDtypeStructs carrying the given shardings (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


class PreemptionFlag:
  """Set by SIGTERM/SIGINT; the loop checkpoints and exits cleanly when it is set."""

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
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.asarray([int(self.is_set())]))
    return bool(np.asarray(flags).any())

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
