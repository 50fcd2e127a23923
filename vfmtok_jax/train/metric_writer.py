"""Metric logging (process 0 only): `metrics.jsonl`, TensorBoard events, and progress lines.

TensorFlow (for the event files) is imported by every process when this module is imported,
so that processes reach their first collective at the same pace.
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
import tensorflow as tf


class MetricWriter:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard; images to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        tf.config.set_visible_devices([], "GPU")  # TensorFlow stays off the accelerators
      except RuntimeError:  # already initialised
        pass
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(np.asarray(v)) for k, v in values.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    with self._tb.as_default(step=int(step)):
      for k, v in clean.items():
        tf.summary.scalar(k, v)

  def image(self, step: int, name: str, rgb_uint8: np.ndarray) -> None:
    if not self.enabled:
      return
    with self._tb.as_default(step=int(step)):
      tf.summary.image(name, np.asarray(rgb_uint8)[None], max_outputs=1)

  def flush(self) -> None:
    if self.enabled:
      self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """steps/s and ETA over the steps since the last report (excludes compile when reset)."""

  def __init__(self, total_steps: int, start_step: int):
    self.total = total_steps
    self._t = time.time()
    self._step = start_step

  def report(self, step: int) -> dict:
    now = time.time()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    return {"steps_per_sec": rate, "eta_sec": eta}


def format_eta(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
