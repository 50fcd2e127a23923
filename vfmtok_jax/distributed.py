"""Multi-host initialisation (`jax.distributed.initialize`) from flags or the environment.

Gated by VFMTOK_DISTRIBUTED=1 (set by the launch scripts) so that single-process runs never
try to reach a coordinator. On TPU pods JAX discovers everything itself; elsewhere (GPU
clusters, CPU tests) it reads:
  JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  optionally JAX_LOCAL_DEVICE_IDS (comma-separated) and VFMTOK_CPU_COLLECTIVES=gloo for CPU.
Under SLURM (`srun`, one task per node) these come from the scheduler when not set
(`slurm_settings`): the first node of SLURM_JOB_NODELIST as coordinator, SLURM_NTASKS and
SLURM_PROCID.
"""

from __future__ import annotations

import os
import re

from absl import flags
import jax
from jax.experimental import multihost_utils
import numpy as np
from orbax.checkpoint import multihost

# Orbax's barriers default to a collective (gloo on CPU), whose first use waits only 30 s for
# the other processes; the coordination-service barrier takes a timeout.
_ORBAX_DISTRIBUTED_BARRIER = "experimental_orbax_use_distributed_barrier"


def first_host(nodelist: str) -> str:
  """The first host of a SLURM node list: "gpu[003-005,9],cpu1" -> "gpu003"."""
  entry = re.match(r"[^,\[]*(\[[^\]]*\][^,\[]*)*", nodelist.strip()).group(0)
  if not entry:
    raise ValueError(f"SLURM_JOB_NODELIST {nodelist!r}: no host")
  # Each bracket group stands for its first value ("[003-005,9]" -> "003").
  return re.sub(r"\[([^\],\-]*)[^\]]*\]", r"\1", entry)


DEFAULT_SLURM_PORT = 12345


def slurm_settings(env) -> dict[str, str]:
  """JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID from SLURM's environment
  ({} outside a SLURM step). The port is VFMTOK_COORDINATOR_PORT, else 12345 + the job id
  modulo 4096 (two jobs sharing a first node do not collide)."""
  if "SLURM_JOB_NODELIST" not in env or "SLURM_PROCID" not in env:
    return {}
  ntasks = env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS")
  if not ntasks:
    raise ValueError("SLURM_PROCID is set but SLURM_NTASKS is not: launch the job with srun")
  port = env.get("VFMTOK_COORDINATOR_PORT") or \
      str(DEFAULT_SLURM_PORT + int(env.get("SLURM_JOB_ID", "0")) % 4096)
  return {"JAX_COORDINATOR_ADDRESS": f"{first_host(env['SLURM_JOB_NODELIST'])}:{port}",
          "JAX_NUM_PROCESSES": ntasks, "JAX_PROCESS_ID": env["SLURM_PROCID"]}


def initialize_from_env(env=None) -> bool:
  """Initialises jax.distributed when VFMTOK_DISTRIBUTED=1; returns whether it did."""
  env = os.environ if env is None else env
  if env.get("VFMTOK_DISTRIBUTED", "0") != "1":
    return False
  if not env.get("JAX_COORDINATOR_ADDRESS"):
    env = {**env, **slurm_settings(env)}
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
  if _ORBAX_DISTRIBUTED_BARRIER in flags.FLAGS:
    flags.FLAGS[_ORBAX_DISTRIBUTED_BARRIER].value = True
  return True


def barrier(name: str, timeout_s: int = 1200) -> None:
  """Blocks until every process reached `barrier(name)` (a no-op for one process).

  Uses the coordination service, not a collective: CPU collectives (gloo) give up after 30 s
  when one process arrives that much later than another (e.g. still compiling).
  """
  if jax.process_count() == 1:
    return
  multihost.sync_global_processes(name, timeout=timeout_s,
                                  processes=set(range(jax.process_count())))


def to_host(x) -> np.ndarray:
  """A global (possibly multi-process) array as one numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def local_rows(x) -> np.ndarray:
  """This process' rows of an array sharded along its first axis, in global order (numpy).

  Rows replicated over several local devices are taken once.
  """
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  shards = {}
  for s in x.addressable_shards:
    start = s.index[0].start or 0
    shards.setdefault(start, s.data)
  rows = np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
  if len(rows) * jax.process_count() != x.shape[0]:
    raise ValueError(f"local_rows needs an array split evenly over the processes along its "
                     f"first axis; this process holds {len(rows)} of {x.shape[0]} rows")
  return rows


def gather_rows(x: np.ndarray) -> np.ndarray:
  """Every process' rows of `x` (any length per process), concatenated in process order."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  counts = np.asarray(multihost_utils.process_allgather(np.asarray([len(x)], np.int64)))
  counts = counts.reshape(-1)
  padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
  padded[:len(x)] = x
  every = np.asarray(multihost_utils.process_allgather(padded))  # (processes, max, ...)
  return np.concatenate([every[p, :int(c)] for p, c in enumerate(counts)])
