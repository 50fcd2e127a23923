"""Training settings that make no sense, refused before anything runs, naming the key.

Both trainers call `check_training_config(config)` on their config (the keys every trainer
config has: `optim.*`, `ema_decay`, `batch_size`, `eval_batch_size`, `total_steps`, the loop's
intervals); the tokenizer also checks its discriminator's optimiser with `check_optimizer`.
A learning rate of -1 would otherwise train, with the loss rising, without a word.
"""

from __future__ import annotations

import math
from typing import Any, Mapping


class SettingError(ValueError):
  """A training setting outside what makes sense (the message names the key)."""


def _number(key: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise SettingError(f"{key}={value!r}: expected a finite number")
  return float(value)


def _integer(key: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise SettingError(f"{key}={value!r}: expected an integer >= {minimum}")


def _in(key: str, value: Any, low: float, high: float, what: str, *,
        low_open: bool = False, high_open: bool = False) -> None:
  v = _number(key, value)
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if below or above:
    interval = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
    raise SettingError(f"{key}={value!r}: {what} must be in {interval}")


def check_optimizer(prefix: str, optim: Mapping[str, Any]) -> None:
  """An Adam block: lr > 0, b1 and b2 in [0, 1), weight decay >= 0, clip >= 0 (0 = off),
  warm-up steps >= 0 (the keys present)."""
  if "lr" in optim:
    _in(f"{prefix}.lr", optim["lr"], 0.0, math.inf, "the learning rate", low_open=True,
        high_open=True)
  for b in ("b1", "b2"):
    if b in optim:
      _in(f"{prefix}.{b}", optim[b], 0.0, 1.0, "Adam's decay rate", high_open=True)
  if "weight_decay" in optim:
    _in(f"{prefix}.weight_decay", optim["weight_decay"], 0.0, math.inf, "weight decay",
        high_open=True)
  if optim.get("grad_clip") is not None:
    _in(f"{prefix}.grad_clip", optim["grad_clip"], 0.0, math.inf,
        "the gradient-norm clip (0: off)", high_open=True)
  if "warmup_steps" in optim:
    _integer(f"{prefix}.warmup_steps", optim["warmup_steps"], 0)


def check_training_config(config) -> None:
  """The settings every trainer config has; raises `SettingError` naming the first bad key."""
  check_optimizer("optim", config.optim)
  _in("ema_decay", config.ema_decay, 0.0, 1.0, "the EMA decay")
  _integer("batch_size", config.batch_size, 1)
  if "eval_batch_size" in config:
    _integer("eval_batch_size", config.eval_batch_size, 1)
  _integer("total_steps", config.total_steps, 1)
  for key in ("log_every", "ckpt_every"):
    if key in config:
      _integer(key, config[key], 1)
  for key in ("eval_every", "keep_every", "max_steps_per_run"):
    if key in config:
      _integer(key, config[key], 0)
