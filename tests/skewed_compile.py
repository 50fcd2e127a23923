"""One of two processes reaches its first collective 40 s after the other (as when it compiles
slower); run by tests/test_multihost.py. Gloo gives up on a late peer after 30 s, so this passes
only if the program's compile-then-barrier holds the early process back.

  python -m tests.skewed_compile {synced|plain}
"""

import sys
import time

from absl import app
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vfmtok_jax import distributed
from vfmtok_jax.train import program

SKEW_S = 40


def main(argv):
  assert distributed.initialize_from_env()
  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  x = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("d")), np.arange(jax.local_device_count(), dtype=np.float32) + 10 * jax.process_index())
  total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))
  if argv[1] == "synced":
    total = program._CompiledInLockstep(total, "sum")  # pylint: disable=protected-access
  if jax.process_index() == 1:
    time.sleep(SKEW_S)
  print(f"sum={float(total(x))}", flush=True)


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
