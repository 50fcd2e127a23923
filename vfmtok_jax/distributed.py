"""Multi-host initialisation (`jax.distributed.initialize`) from flags or the environment.

Gated by VFMTOK_DISTRIBUTED=1 (set by the launch scripts) so that single-process runs never
try to reach a coordinator. On TPU pods JAX discovers everything itself; elsewhere (GPU
clusters, CPU tests) it reads:
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  optionally JAX_LOCAL_DEVICE_IDS (comma-separated) and VFMTOK_CPU_COLLECTIVES=gloo for CPU.
"""

from __future__ import annotations

import os

import jax


def initialize_from_env(env=None) -> bool:
  """Initialises jax.distributed when VFMTOK_DISTRIBUTED=1; returns whether it did."""
  env = os.environ if env is None else env
  if env.get("VFMTOK_DISTRIBUTED", "0") != "1":
    return False
  collectives = env.get("VFMTOK_CPU_COLLECTIVES")
  if collectives:
    jax.config.update("jax_cpu_collectives_implementation", collectives)
  kwargs = {}
  if env.get("JAX_COORDINATOR_ADDRESS"):
    kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
  if env.get("JAX_NUM_PROCESSES"):
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if env.get("JAX_PROCESS_ID"):
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  if env.get("JAX_LOCAL_DEVICE_IDS"):
    kwargs["local_device_ids"] = [int(i) for i in env["JAX_LOCAL_DEVICE_IDS"].split(",")]
  partial = {"coordinator_address", "num_processes", "process_id"} & set(kwargs)
  if partial and len(partial) != 3:
    raise ValueError("set all of JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
                     f"(got {sorted(partial)})")
  jax.distributed.initialize(**kwargs)
  return True
