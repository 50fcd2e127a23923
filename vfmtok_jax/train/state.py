"""The train state every task uses, and the non-finite guard around a task's step."""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data position (stored in the checkpoint meta).

  `extra` holds a task's other trainable state (e.g. a GAN discriminator's params, optimizer
  state and spectral-norm vectors); an empty dict when it has none.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_streak: jax.Array
  extra: Any = None


def new_state(params, opt_state, rng: jax.Array, extra=None) -> TrainState:
  """Step 0: the EMA starts at the params, the counters at zero."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=opt_state, ema_params=params, rng=rng,
                    nonfinite_total=zero, nonfinite_streak=zero,
                    extra={} if extra is None else extra)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


StepFn = Callable[[TrainState, Any, Any], tuple[TrainState, dict, jax.Array]]


def guard_nonfinite(task_step: StepFn) -> Callable[[TrainState, Any, Any],
                                                    tuple[TrainState, dict]]:
  """Wraps a task step `(state, constants, batch) -> (new_state, metrics, ok)`.

  When `ok` is False (a non-finite loss or gradient) the whole state is kept as it was except
  the counters; the step counter always advances (the batch is consumed). Adds
  `nonfinite_total`, `nonfinite_streak` and `param_norm` to the metrics.
  """
  def step(state: TrainState, constants, batch):
    new, metrics, ok = task_step(state, constants, batch)
    kept = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state)
    bad = (~ok).astype(jnp.int32)
    kept = kept.replace(step=state.step + 1, nonfinite_total=state.nonfinite_total + bad,
                        nonfinite_streak=(state.nonfinite_streak + bad) * bad)
    metrics = dict(metrics, nonfinite_total=kept.nonfinite_total,
                   nonfinite_streak=kept.nonfinite_streak, param_norm=global_norm(kept.params))
    return kept, metrics
  return step
