"""The demo's train batches as a real multi-process job assembles them (run by
tests/test_input_pipeline.py through `run_processes`): global arrays on a mesh of every
process's devices, gathered to every host; process 0 writes them.

  python -m tests.input_processes OUT.npz START_STEP STEPS PROCESSES
"""

import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from vfmtok_jax import distributed
from vfmtok_jax.data import input_pipeline as ip

IMAGE_SIZE, BATCH, SEED = 16, 8, 2


def main(out: str, start_step: int, steps: int, processes: int) -> None:
  assert distributed.initialize_from_env() and jax.process_count() == processes
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  it = ip.make_train_iterator(ip.default_input_config("demo", image_size=IMAGE_SIZE),
                              global_batch_size=BATCH, seed=SEED, start_step=start_step,
                              sharding=sharding)
  images, labels = [], []
  for _ in range(steps):
    batch = next(it)
    images.append(multihost_utils.process_allgather(batch["image"], tiled=True))
    labels.append(multihost_utils.process_allgather(batch["label"], tiled=True))
  if jax.process_index() == 0:
    np.savez(out, image=np.stack(images), label=np.stack(labels))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
