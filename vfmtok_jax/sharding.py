"""Device mesh, logical-axis rules and shardings for params, state and batches.

Every parameter carries logical axis names (see `models/layers.py`). The rules mapping them onto
the mesh axes `data`, `fsdp`, `tensor` (any of which may be 1) live here, in one table per model
family (`MODEL_RULES`), each giving its axes for the three strategies:
  dp       params replicated; batch over (data, fsdp).
  fsdp     params sharded over `fsdp` along their `embed`/`conv_out`/`codebook` dimension.
  fsdp_tp  fsdp plus tensor parallelism over `tensor` on `mlp`/`heads_merged`/`qkv`.
A new family (e.g. the GPT's vocab/heads/kv/sequence axes) adds its own table; `rules(preset,
*families)` joins the activation rules with the tables asked for and refuses two tables that map
one logical axis differently. A dimension whose size the mesh axis does not divide stays
replicated (as big_vision's fsdp does), so small or odd tensors never fail to shard.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

ACTIVATION_RULES = (("act_batch", BATCH_AXES), ("act_len", None), ("act_emb", None),
                    ("act_conv", None))
PRESETS = ("dp", "fsdp", "fsdp_tp")

_TOKENIZER_FSDP = (("embed", "fsdp"), ("conv_out", "fsdp"), ("codebook", "fsdp"),
                   ("vfm_embed", "fsdp"))
MODEL_RULES = {
    # VFM towers, region encoder, quantizer, decoders (and the frozen loss networks).
    "tokenizer": {
        "dp": (),
        "fsdp": _TOKENIZER_FSDP,
        "fsdp_tp": _TOKENIZER_FSDP + (("mlp", "tensor"), ("heads_merged", "tensor"),
                                      ("qkv", "tensor")),
    },
    # The GPT: the layer axis (`layers`, from nn.scan) and the class table stay replicated.
    "gpt": {
        "dp": (),
        "fsdp": (("embed", "fsdp"),),
        "fsdp_tp": (("embed", "fsdp"), ("mlp", "tensor"), ("heads_merged", "tensor"),
                    ("kv_merged", "tensor"), ("vocab", "tensor")),
    },
}


class MeshError(ValueError):
  """A mesh that does not fit the devices or the batch."""


def rules(preset: str, *families: str) -> list[tuple[str, Any]]:
  """Logical-axis rules of `preset` for the given model families (activation rules first).

  Raises:
    MeshError: an unknown preset or family, or two families mapping one axis differently.
  """
  if preset not in PRESETS:
    raise MeshError(f"unknown sharding preset {preset!r}; known: {list(PRESETS)}")
  out = dict(ACTIVATION_RULES)
  for family in families:
    if family not in MODEL_RULES:
      raise MeshError(f"no sharding rules for model family {family!r}; known: "
                      f"{sorted(MODEL_RULES)}")
    for name, axis in MODEL_RULES[family][preset]:
      if name in out and out[name] != axis:
        raise MeshError(f"logical axis {name!r}: {family} maps it to {axis!r}, another rule "
                        f"to {out[name]!r}")
      out[name] = axis
  return list(out.items())


def mesh_shape(axes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Sizes for (data, fsdp, tensor); one -1 is filled with what the others leave."""
  unknown = [k for k in axes if k not in MESH_AXES]
  if unknown:
    raise MeshError(f"unknown mesh axes {unknown}; axes are {MESH_AXES}")
  sizes = [int(axes.get(a, 1)) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise MeshError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if known <= 0 or num_devices % known:
      raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, "
                    f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh with Auto axis types (set explicitly: current JAX defaults
  `jax.make_mesh` to Explicit)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(dict(axes), len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Leading (batch) dimension over (data, fsdp), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch(global_batch: int, mesh: Mesh) -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % n:
    raise MeshError(f"global batch {global_batch} is not divisible by the {n} batch shards "
                    f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def _spec_for(shape, names, mesh: Mesh, rule_map: dict) -> P:
  out, used = [], set()
  for size, name in zip(shape, names):
    axis = rule_map.get(name) if name is not None else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    n = math.prod(mesh.shape[a] for a in axes) if axes else 1
    if not axes or n == 1 or size % n or used & set(axes):
      out.append(None)
    else:
      used |= set(axes)
      out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def param_shardings(boxed_tree, mesh: Mesh, rule_list) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.LogicallyPartitioned` boxes.

  Unboxed leaves (no logical names) are replicated.
  """
  rule_map = dict(rule_list)

  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      value = leaf.value
      return NamedSharding(mesh, _spec_for(value.shape, leaf.names, mesh, rule_map))
    return NamedSharding(mesh, P())
  return jax.tree.map(one, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def logical_names(boxed_tree) -> Any:
  """The logical axis names of every boxed leaf (None for unboxed)."""
  return jax.tree.map(lambda x: tuple(x.names) if isinstance(x, nn.LogicallyPartitioned) else None,
                      boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
