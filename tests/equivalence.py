"""Comparing two training runs that should be the same math (sharded vs one device, two processes
vs one): per-step losses and per-step parameter updates, not the parameters themselves.

After a few small Adam steps the parameters of two runs differ by at most a few `lr` whatever
the runs did, so comparing parameters cannot fail. The updates (new - old) can: a dropped or
mis-sharded gradient changes some leaf's update completely. Each leaf's update is compared
relative to its own size, with one exception: params whose true gradient is exactly zero (conv
biases feeding a GroupNorm, attention key biases: both invariant) receive Adam updates driven by
float noise, whose sign depends on the reduction order. Those leaves are found from the
gradient itself (`zero_gradient_paths`), and for them only Adam's bound |update| <= lr is
checked.
"""

from __future__ import annotations

import jax
import numpy as np

from vfmtok_jax.data import input_pipeline
from vfmtok_jax.tasks import tokenizer as tokenizer_task

# Relative tolerances, from what can differ. Losses: the batch sums in another order (measured
# at most 1.4e-7 relative over three steps, all presets). Updates: each is lr * m / sqrt(v)
# elementwise, so elements with a tiny but real gradient can flip sign under reduction noise;
# that moved a leaf's update by at most 5.9e-4 of its norm (dp, fsdp, fsdp_tp vs one device,
# three steps of the tiny config), while a dropped gradient moves it by ~1. 1e-2 sits 17x above
# the noise and 100x below a real error. Zero-gradient leaves (max |g| <= 1e-8 of the largest
# here, the next smallest real one 1e-3) moved by <= 1.5e-5 < lr = 1e-4.
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-2


def flat(tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): np.asarray(v, np.float64) for p, v in leaves}


def updates(before, after) -> dict[str, np.ndarray]:
  a, b = flat(before), flat(after)
  return {k: b[k] - a[k] for k in a}


def zero_gradient_paths(grads, rel: float = 1e-6) -> set[str]:
  """Leaves whose gradient is zero up to float noise (max |g| < rel * the largest |g|)."""
  g = flat(grads)
  top = max(float(np.abs(v).max()) for v in g.values())
  return {k for k, v in g.items() if float(np.abs(v).max()) < rel * top}


def tokenizer_zero_gradient_paths(config) -> set[str]:
  """The zero-gradient params of a tokenizer config, from its gradient at init on one batch."""
  task, program = tokenizer_task.build(config, jax.devices()[:1])
  consts = jax.device_put(task.load_constants(), program.constant_shardings)
  state = program.init(jax.random.PRNGKey(config.seed))
  batch = next(input_pipeline.make_train_iterator(
      config.input, global_batch_size=config.batch_size, seed=config.seed,
      sharding=program.batch_shardings["image"]))
  rngs = tuple(jax.random.split(jax.random.PRNGKey(0), 3))
  grads = jax.jit(jax.grad(lambda p: task.generator_loss(p, state, consts, batch["image"], 0.0,
                                                         rngs)[0]))(state.params)
  paths = zero_gradient_paths(grads)
  # Among them the invariant ones: attention key biases, conv biases feeding a GroupNorm.
  assert any("k_proj" in p for p in paths) and any("conv1" in p for p in paths), paths
  return paths


def compare_runs(losses_a, updates_a, losses_b, updates_b, *, lr: float, steps_per_interval: int,
                 zero_grad: set[str]) -> list[str]:
  """Every disagreement between two runs, as lines (empty: the runs agree).

  Args:
    losses_a / losses_b: per-step losses.
    updates_a / updates_b: per compared interval, {path: new - old}.
    lr: the (constant) learning rate, for the bound on zero-gradient leaves.
    steps_per_interval: optimizer steps in each compared interval.
    zero_grad: paths of the zero-gradient leaves.
  """
  problems = []
  la, lb = np.asarray(losses_a, np.float64), np.asarray(losses_b, np.float64)
  if la.shape != lb.shape or not np.allclose(la, lb, rtol=LOSS_RTOL, atol=0):
    problems.append(f"losses differ: {la.tolist()} vs {lb.tolist()}")
  for i, (ua, ub) in enumerate(zip(updates_a, updates_b)):
    if set(ua) != set(ub):
      problems.append(f"interval {i}: different leaves {sorted(set(ua) ^ set(ub))[:5]}")
      continue
    for path in sorted(ua):
      da, db = ua[path], ub[path]
      if path in zero_grad:
        bound = 1.01 * lr * steps_per_interval  # |Adam step| <= lr when b1^2 <= b2
        moved = max(np.abs(da).max(), np.abs(db).max())
        if moved > bound:
          problems.append(f"interval {i} {path}: zero-gradient leaf moved {moved:.3g} > "
                          f"{bound:.3g}")
        continue
      scale = np.linalg.norm(da)
      err = np.linalg.norm(da - db)
      if not err <= UPDATE_RTOL * scale:
        problems.append(f"interval {i} {path}: update differs by {err / max(scale, 1e-30):.3g} "
                        f"of its norm {scale:.3g}")
  return problems
