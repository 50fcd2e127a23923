"""TPU slices this machine does not have: their chips' specs and compile-only devices.

  topo = tpu_topology.parse("v5p:4x4x8")      # 128 v5p chips
  devices = tpu_topology.devices(topo)        # compile-only devices from libtpu

`devices` uses libtpu's topology description (`jax.experimental.topologies`; `pip install
"jax[tpu]"` or `.[tpu]` brings libtpu), so `jax.jit(...).lower(...).compile()` on a mesh of them
produces the program a real slice would run, and its memory and cost analyses, on any machine.
v4 and v5p chips run as one device each (megacore); v5e and v6e have one core per chip.

Chip specs (`CHIPS`) are the per-chip figures Google publishes in the Cloud TPU system
architecture pages: dense bf16 peak, HBM capacity and bandwidth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
import tempfile

from jax.experimental import topologies

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class ChipSpec:
  name: str
  libtpu_name: str          # the topology prefix libtpu knows the chip by
  ndim: int                 # 3: a 3D torus (v4, v5p); 2: a 2D torus (v5e, v6e)
  megacore: bool            # both TensorCores of a chip form one device
  bf16_flops: float         # dense peak, FLOP/s
  hbm_bytes: float
  hbm_bytes_per_s: float


CHIPS = {
    "v4": ChipSpec("v4", "v4", 3, True, 275e12, 32 * GIB, 1228e9),
    "v5e": ChipSpec("v5e", "v5e", 2, False, 197e12, 16 * GIB, 819e9),
    "v5p": ChipSpec("v5p", "v5", 3, True, 459e12, 95 * GIB, 2765e9),
    "v6e": ChipSpec("v6e", "v6e", 2, False, 918e12, 32 * GIB, 1640e9),
}


class TopologyError(ValueError):
  """An unknown chip, a malformed topology or no libtpu."""


@dataclasses.dataclass(frozen=True)
class Topology:
  chip: ChipSpec
  dims: tuple[int, ...]

  @property
  def num_chips(self) -> int:
    return math.prod(self.dims)

  @property
  def name(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.dims))}"

  @property
  def libtpu_name(self) -> str:
    return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.dims))}"


def parse(text: str) -> Topology:
  """"v5p:4x4x8" -> Topology (chip v5p, dims (4, 4, 8)).

  Raises:
    TopologyError: an unknown chip or a shape that is not the chip's ndim positive integers.
  """
  m = re.fullmatch(r"\s*(v\w+):(\d+(?:x\d+)*)\s*", text)
  if not m:
    raise TopologyError(f"topology {text!r}: expected CHIP:AxB[xC], e.g. v5p:4x4x8 or v5e:4x4")
  chip_name, shape = m.group(1), m.group(2)
  if chip_name not in CHIPS:
    raise TopologyError(f"unknown TPU chip {chip_name!r} in {text!r}; known: {sorted(CHIPS)}")
  chip = CHIPS[chip_name]
  dims = tuple(int(d) for d in shape.split("x"))
  if len(dims) != chip.ndim or min(dims) < 1:
    raise TopologyError(f"topology {text!r}: {chip_name} slices are {chip.ndim}-D "
                        f"({'x'.join(['N'] * chip.ndim)}), got {shape}")
  return Topology(chip, dims)


def _wrap(topo: Topology) -> tuple[bool, bool, bool]:
  """Torus wrap-around links per dimension: full-size rings only (3D: every side a multiple of
  4; 2D: sides of 16)."""
  if topo.chip.ndim == 3:
    full = all(d % 4 == 0 for d in topo.dims)
    return (full, full, full)
  return tuple(d == 16 for d in topo.dims) + (False,)


def have_libtpu() -> bool:
  return importlib.util.find_spec("libtpu") is not None


@contextlib.contextmanager
def _held_back_c_stderr():
  """libtpu, started on a host without TPUs, writes warnings (no TPU_ACCELERATOR_TYPE, no
  worker hostnames) straight to file descriptor 2: noise for a compile-only description. They
  are held back, and shown only if the description fails."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    except BaseException:
      os.dup2(saved, 2)
      held.seek(0)
      sys.stderr.write(held.read().decode(errors="replace"))
      raise
    finally:
      os.dup2(saved, 2)
      os.close(saved)


def devices(topo: Topology) -> list:
  """Compile-only devices of `topo` (one per chip), in libtpu's order.

  Raises:
    TopologyError: libtpu is not installed.
  """
  if not have_libtpu():
    raise TopologyError('ahead-of-time plans for TPU need libtpu: pip install "jax[tpu]" '
                        '(or pip install -e ".[tpu]")')
  dims = topo.dims + (1,) * (3 - len(topo.dims))
  hosts = (min(2, dims[0]), min(2, dims[1]), 1)  # chips per host as Cloud TPU VMs group them
  with _held_back_c_stderr():
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.libtpu_name,
        chip_config_name="megacore" if topo.chip.megacore else "default",
        chips_per_host_bounds=hosts, num_slices=1, wrap=_wrap(topo))
  out = list(desc.devices)
  if len(out) != topo.num_chips:
    raise TopologyError(f"libtpu describes {len(out)} devices for {topo.name}, expected "
                        f"{topo.num_chips}")
  return out
