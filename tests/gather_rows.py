"""Two processes exchange rows as the evaluation jobs do; run by tests/test_eval_jobs.py.

  python -m tests.gather_rows

Checks, in each process: `distributed.gather_rows` of unequal lengths (process 0 holds 3 rows,
process 1 holds 5), `distributed.local_rows` of a batch-sharded global array (this process'
rows only, in order), and `suite.features` (batches dealt round robin, gathered).
"""

import sys

from absl import app
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vfmtok_jax import distributed
from vfmtok_jax.evaluators import suite


def main(argv):
  del argv
  assert distributed.initialize_from_env()
  pi = jax.process_index()
  mine = np.arange(3 + 2 * pi, dtype=np.float32)[:, None] + 100 * pi
  got = distributed.gather_rows(mine)
  want = np.concatenate([np.arange(3)[:, None], np.arange(5)[:, None] + 100]).astype(np.float32)
  np.testing.assert_array_equal(got, want)

  mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  local = np.arange(4, dtype=np.int32) + 10 * pi  # 4 rows per process, 2 per device
  x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
  np.testing.assert_array_equal(distributed.local_rows(x), local)

  seen = []
  def extract(images):
    seen.append(int(images[0, 0, 0, 0]))
    return {"pool": images.reshape(len(images), -1)[:, :1].astype(np.float32)}
  image_batches = [np.full((2, 1, 1, 3), i, np.uint8) for i in range(5)]
  feats = suite.features(image_batches, extract)
  assert seen == [i for i in range(5) if i % 2 == pi], seen
  assert sorted(feats["pool"][:, 0].tolist()) == sorted([float(i) for i in range(5)] * 2)
  print(f"process {pi}: gathered ok", flush=True)


if __name__ == "__main__":
  app.run(main, argv=sys.argv)
