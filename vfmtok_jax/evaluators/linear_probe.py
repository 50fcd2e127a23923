"""Linear probe: L2-regularised multinomial logistic regression on frozen features (optax).

  probe = fit(train_x, train_y, num_classes=K, l2=1e-4)
  top1 = accuracy(probe, test_x, test_y)

Features are standardised with the training set's mean and standard deviation, then the convex
objective  mean_i CE(W x_i + b, y_i) + l2 / 2 * ||W||^2  (the bias is not decayed) is minimised
full batch with optax's L-BFGS and its zoom line search, so the result depends on the data and
`l2` only (no learning rate, no seed). This is scikit-learn's `LogisticRegression` objective
with `C = 1 / (l2 * N)`. The features can be anything per example: VFM class tokens, the
tokenizer's region tokens (`slots`) or code embeddings, mean-pooled or flattened.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class Probe:
  """A fitted probe: standardisation and the linear map (numpy)."""
  mean: np.ndarray     # (D,)
  scale: np.ndarray    # (D,)
  kernel: np.ndarray   # (D, K)
  bias: np.ndarray     # (K,)
  loss: float          # final training objective
  iterations: int

  def logits(self, features: np.ndarray) -> np.ndarray:
    x = (np.asarray(features, np.float32) - self.mean) / self.scale
    return x @ self.kernel + self.bias


def _objective(params, x, onehot, l2):
  logits = x @ params["kernel"] + params["bias"]
  ce = -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), axis=-1))
  return ce + 0.5 * l2 * jnp.sum(jnp.square(params["kernel"]))


@functools.partial(jax.jit, static_argnames=("max_iterations",))
def _minimise(params, x, onehot, l2, tol, *, max_iterations: int):
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(_objective)

  def step(carry):
    params, state, _ = carry
    value, grad = value_and_grad(params, x, onehot, l2, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=_objective, x=x, onehot=onehot, l2=l2)
    return optax.apply_updates(params, updates), state, optax.tree.norm(grad)

  def keep_going(carry):
    _, state, grad_norm = carry
    count = optax.tree.get(state, "count")
    return (count == 0) | ((count < max_iterations) & (grad_norm >= tol))

  init = (params, solver.init(params), jnp.asarray(jnp.inf, jnp.float32))
  params, state, _ = jax.lax.while_loop(keep_going, step, init)
  return params, optax.tree.get(state, "value"), optax.tree.get(state, "count")


def fit(features: np.ndarray, labels: np.ndarray, *, num_classes: int, l2: float = 1e-4,
        max_iterations: int = 500, tol: float = 1e-6) -> Probe:
  """Fits the probe on (N, D) features and (N,) int labels in [0, num_classes)."""
  x = np.asarray(features, np.float32)
  y = np.asarray(labels)
  if x.ndim != 2 or y.shape != (len(x),):
    raise ValueError(f"expected (N, D) features and (N,) labels, got {x.shape} and {y.shape}")
  if len(x) == 0:
    raise ValueError("the linear probe needs at least one training example")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, {num_classes}), got [{y.min()}, {y.max()}]")
  mean = x.mean(0)
  scale = x.std(0)
  scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
  xs = (x - mean) / scale
  params = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  onehot = jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
  params, loss, count = _minimise(params, jnp.asarray(xs), onehot, jnp.float32(l2),
                                  jnp.float32(tol), max_iterations=int(max_iterations))
  params = jax.device_get(params)
  return Probe(mean=mean, scale=scale, kernel=np.asarray(params["kernel"]),
               bias=np.asarray(params["bias"]), loss=float(loss), iterations=int(count))


def accuracy(probe: Probe, features: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of the probe on (N, D) features."""
  labels = np.asarray(labels)
  if len(labels) == 0:
    raise ValueError("no examples to score the linear probe on")
  return float(np.mean(np.argmax(probe.logits(features), axis=-1) == labels))
