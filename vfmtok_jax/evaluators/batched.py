"""One compiled program for any number of examples: fixed-size padded batches over the devices.

Evaluation sets rarely divide by the batch size. `PaddedApply` pads the last batch with zero
rows (cut off again before anything is returned), so every call runs the same program, no
example is dropped and none is counted twice; each batch is split over this process' devices.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from vfmtok_jax import distributed


class PaddedApply:
  """Callable: numpy arrays with a common leading axis N -> dict of numpy outputs (N, ...).

  Args:
    fn: (consts, *arrays) -> dict of arrays with the batch leading, jit-able.
    consts: pytree passed to every call (weights), replicated on the devices.
    batch_size: rows per call, rounded up to a multiple of the local device count.
    compiler_options: XLA options for `fn`'s program (`ops.compiler_options`).
  """

  def __init__(self, fn: Callable[..., dict], consts: Any, *, batch_size: int,
               compiler_options: dict[str, str] | None = None):
    devices = jax.local_devices()
    self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
    mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
    self._rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    self._consts = jax.device_put(
        consts, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    self._fn = jax.jit(fn, compiler_options=compiler_options)

  def __call__(self, *arrays: np.ndarray) -> dict[str, np.ndarray]:
    arrays = tuple(np.asarray(a) for a in arrays)
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
      raise ValueError(f"arrays of different lengths: {[len(a) for a in arrays]}")
    b = self.batch_size
    parts: dict[str, list] = {}
    for start in range(0, n, b):
      chunk = []
      for a in arrays:
        c = a[start:start + b]
        if len(c) < b:  # pad the last batch; the padding rows are cut off below
          c = np.concatenate([c, np.zeros((b - len(c), *c.shape[1:]), c.dtype)])
        chunk.append(jax.device_put(c, self._rows))
      out = self._fn(self._consts, *chunk)
      for k, v in out.items():
        parts.setdefault(k, []).append(distributed.to_host(v)[:min(b, n - start)])
    if not parts:  # no examples: trace the program for the output shapes
      shapes = jax.eval_shape(self._fn, self._consts, *(
          jax.ShapeDtypeStruct((b, *a.shape[1:]), a.dtype) for a in arrays))
      return {k: np.zeros((0, *s.shape[1:]), s.dtype) for k, s in shapes.items()}
    return {k: np.concatenate(v) for k, v in parts.items()}
