"""The one training loop: restore-or-init, step, guard, log, eval, checkpoint, preempt, export.

  final = loop.run(task, program, workdir, settings, config_json=config.to_json_best_effort())

Order (big_vision style): check the workdir's latest checkpoint against the program's state
(metadata only; nothing is written before this passes) -> record the config -> load the
task's constants -> restore or sharded init -> data -> loop. Every process runs the same loop;
process 0 writes logs, images and the config record.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax

from vfmtok_jax.data import images as image_io
from vfmtok_jax.train import checkpoint as ckpt_lib
from vfmtok_jax.train import metric_writer
from vfmtok_jax.train import program as program_lib
from vfmtok_jax.train import task as task_lib

CONFIG_JSON = "config.json"


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses or gradients."""


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """How long to train and how often to log, evaluate and checkpoint (plain values)."""
  total_steps: int
  seed: int = 0
  log_every: int = 100
  eval_every: int = 0          # 0: never (else also at step 0 of a fresh run and at the end)
  ckpt_every: int = 1000
  keep_last: int = 3
  keep_every: int = 0          # 0: keep only the last `keep_last`
  async_checkpoint: bool = True
  max_nonfinite_streak: int = 10
  max_steps_per_run: int = 0   # > 0: checkpoint and stop after this many steps of one run


def settings_from_config(config) -> LoopSettings:
  """The loop keys every trainer config has (total_steps, seed, log_every, ...)."""
  return LoopSettings(**{f.name: config[f.name] for f in dataclasses.fields(LoopSettings)})


def _record_config(workdir: str, config_json: str, start_step: int | None) -> None:
  """config.json describes the run that wrote the checkpoints; a resume with a different
  config keeps it and writes `config.resumed_at_<step>.json` beside it."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_JSON)
  if start_step is not None and os.path.isfile(path):
    with open(path) as f:
      if f.read() == config_json:
        return
    path = os.path.join(workdir, f"config.resumed_at_{start_step}.json")
  with open(path, "w") as f:
    f.write(config_json)


def run(task: task_lib.Task, program: program_lib.TrainProgram, workdir: str,
        settings: LoopSettings, *, config_json: str = "{}") -> dict[str, Any]:
  """Trains `task` (resuming from `workdir` if it holds a checkpoint); returns final metrics.

  Raises:
    CheckpointMismatchError: the workdir's checkpoint does not fit the program's state (raised
      before anything is written to the workdir).
    NonFiniteError: more than `settings.max_nonfinite_streak` non-finite steps in a row.
  """
  s = settings
  os.makedirs(workdir, exist_ok=True)
  final: dict[str, Any] = {}
  with ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), save_every=s.ckpt_every,
                             keep_last=s.keep_last, keep_every=s.keep_every or None,
                             async_save=s.async_checkpoint) as checkpointer:
    start_step = checkpointer.latest_step()
    if start_step is not None:
      checkpointer.check_compatible(program.abstract_state, start_step)
    constants = jax.device_put(task.load_constants(), program.constant_shardings)
    _record_config(workdir, config_json, start_step)
    if start_step is not None:
      state, meta = checkpointer.restore(program.abstract_state, start_step)
      data_position = int(meta["data_position"])
      if jax.process_index() == 0:
        print(f"resuming from step {start_step} of {checkpointer.directory}", flush=True)
    else:
      state = task.init_from_data(program, program.init(jax.random.PRNGKey(s.seed)), constants)
      start_step, data_position = 0, 0
    train_iter = task.train_iterator(data_position, program.batch_shardings)

    writer = metric_writer.MetricWriter(workdir)
    preempt = ckpt_lib.PreemptionFlag()
    try:
      def run_eval(step):
        result, images = task.evaluate(program, state, constants, step)
        writer.scalars(step, result)
        for name, image in images.items():
          if jax.process_index() == 0:
            os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
            image_io.save_png(os.path.join(workdir, "images", f"{name}_{step:06d}.png"), image)
          writer.image(step, name, image)
        logging.info("eval step %d: %s", step, json.dumps(result))
        print(task.eval_line(step, result), flush=True)
        return result

      if start_step == 0 and s.eval_every:
        final.update({f"{k}_start": v for k, v in run_eval(0).items()})
      progress = metric_writer.Progress(s.total_steps, start_step)
      step = start_step
      while step < s.total_steps:
        state, m = program.step(state, constants, next(train_iter))
        step += 1
        streak = int(m["nonfinite_streak"])
        if streak > s.max_nonfinite_streak:
          raise NonFiniteError(
              f"{streak} consecutive non-finite losses/gradients at step {step} (limit "
              f"{s.max_nonfinite_streak}); the last good checkpoint is "
              f"{checkpointer.latest_step()} in {checkpointer.directory}")
        if step % s.log_every == 0 or step == s.total_steps:
          m = {k: float(v) for k, v in jax.device_get(m).items()}
          m.update(progress.report(step))
          m["data_skipped"] = float(getattr(train_iter, "num_skipped", 0))
          writer.scalars(step, m)
          eta = metric_writer.format_eta(m["eta_sec"])
          print(task.log_line(step, s.total_steps, m, eta), flush=True)
          final.update(m)
        if s.eval_every and (step % s.eval_every == 0 or step == s.total_steps):
          final.update(run_eval(step))
        meta = {"step": step, "data_position": step, "config": json.loads(config_json)}
        if preempt.any_process_set():
          checkpointer.save(step, state, meta, force=True)
          checkpointer.wait()
          print(f"{preempt.signal_name or 'preemption'}: saved step {step}, exiting",
                flush=True)
          final["preempted_at"] = step
          return final
        stop_now = bool(s.max_steps_per_run) and step - start_step >= s.max_steps_per_run
        checkpointer.save(step, state, meta, force=step == s.total_steps or stop_now)
        if stop_now:
          checkpointer.wait()
          print(f"stopping after {s.max_steps_per_run} steps of this run at step {step}; "
                "run again to continue", flush=True)
          final["stopped_at"] = step
          return final
      checkpointer.wait()
      final.update(task.export(state, workdir))  # collective: every process
    finally:
      preempt.restore_handlers()
      writer.close()
      if hasattr(train_iter, "close"):  # stops decoding workers
        train_iter.close()
  return final
