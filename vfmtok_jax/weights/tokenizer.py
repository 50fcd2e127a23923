"""Official VFMTok tokenizer state dict: `VFMTokenizer` config inference and key map.

The reference checkpoint (`vq_train.py`) is `{'model': sd, 'ema': sd, ...}` without backbone
keys; the golden fixture is a bare state dict with the backbone under
`encode_transformer.backbone.pretrained_encoder.`. Every dimension the tensors determine is
inferred (widths, depths, queries, codebook, decoder grid table, pixel-decoder channels and
levels); what they cannot tell (head counts, VFM levels, output grid) comes from the caller
with the reference's defaults. The unused `slot_quantize.codebook_used` buffer is dropped
explicitly. `tokenizer_io.tokenizer_from_state` builds the module and assembles its params; the
backbone keys (under BACKBONE_PREFIX) are `vfmtok_jax.weights.dinov2`'s.
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np

from vfmtok_jax.weights import trees
from vfmtok_jax.weights.files import WeightLoadError

BACKBONE_PREFIX = "encode_transformer.backbone."
DROPPED_KEYS = ("slot_quantize.codebook_used",)
# Reference defaults for what the tensors do not record.
REFERENCE_DEFAULTS = dict(encoder_heads=8, encoder_self_attn_heads=8, decoder_heads=8,
                          decoder_grid=21)


def _count(state, pattern: str) -> int:
  return len({int(m.group(1)) for k in state if (m := re.match(pattern, k))})


def _require(state, keys, source):
  missing = [f"{k} (needed to infer the tokenizer architecture)" for k in keys if k not in state]
  if missing:
    raise WeightLoadError(source, missing=missing)


def without_backbone(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The tokenizer's own tensors: `state` minus the keys under BACKBONE_PREFIX."""
  return {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}


def infer_config(state: Mapping[str, np.ndarray], *, source: str = "tokenizer state dict",
                 **overrides) -> dict:
  """`VFMTokenizer` kwargs from the tensors; `overrides` supply (or replace) the rest."""
  _require(state, ["encode_transformer.carrier_tokens", "encode_transformer.projectors.0.mlp.0.weight",
                   "encode_transformer.transformer.layers.0.linear1.weight",
                   "encode_transformer.transformer.layers.0.cross_attn.attention_weights.weight",
                   "slot_quantize.embedding.weight", "decode_transformer.position_embedding",
                   "decode_transformer.transformer.layers.0.ffnet.w3.weight",
                   "decode_transformer.proj.weight", "decoder.conv_in.weight",
                   "decoder.norm_out.weight"], source)
  cfg = dict(REFERENCE_DEFAULTS)
  carriers = state["encode_transformer.carrier_tokens"]
  cfg["dim"] = int(carriers.shape[-1])
  cfg["num_queries"] = int(carriers.shape[1])
  cfg["vfm_width"] = int(state["encode_transformer.projectors.0.mlp.0.weight"].shape[1])
  cfg["num_levels"] = _count(state, r"encode_transformer\.projectors\.(\d+)\.")
  cfg["encoder_depth"] = _count(state, r"encode_transformer\.transformer\.layers\.(\d+)\.")
  cfg["encoder_ffn_dim"] = int(state["encode_transformer.transformer.layers.0.linear1.weight"].shape[0])
  cfg.update({k: v for k, v in overrides.items() if k in ("encoder_heads",)})
  n_aw = int(state["encode_transformer.transformer.layers.0.cross_attn.attention_weights.weight"]
             .shape[0])
  per_head_level = n_aw // (cfg["encoder_heads"] * cfg["num_levels"])
  if per_head_level * cfg["encoder_heads"] * cfg["num_levels"] != n_aw:
    raise WeightLoadError(source, other=[
        f"attention_weights has {n_aw} outputs, not divisible by heads x levels "
        f"({cfg['encoder_heads']} x {cfg['num_levels']}); set encoder_heads"])
  cfg["encoder_points"] = per_head_level
  codebook = state["slot_quantize.embedding.weight"]
  cfg["codebook_size"], cfg["code_dim"] = (int(s) for s in codebook.shape)
  rows = int(state["decode_transformer.position_embedding"].shape[1]) - 1
  cfg["decoder_pos_table"] = math.isqrt(rows)
  cfg["decoder_depth"] = _count(state, r"decode_transformer\.transformer\.layers\.(\d+)\.")
  hidden = int(state["decode_transformer.transformer.layers.0.ffnet.w3.weight"].shape[1])
  # SwiGLU hidden = (int(mlp_dim*2/3)+7)//8*8: the smallest mlp_dim giving it (any such works).
  cfg["decoder_mlp_dim"] = next(m for m in range(1, 8 * hidden)
                                if (int(m * 2 / 3) + 7) // 8 * 8 == hidden)
  cfg["semantic_dim"] = int(state["decode_transformer.proj.weight"].shape[0])
  cfg["num_registers"] = int(state["decode_transformer.register_tokens"].shape[1]) \
      if "decode_transformer.register_tokens" in state else 4
  n_pix_levels = _count(state, r"decoder\.conv_blocks\.(\d+)\.")
  ch = int(state["decoder.norm_out.weight"].shape[0])  # = ch * ch_mult[0], ch_mult[0] == 1
  mult = []
  for i in range(n_pix_levels):
    width = int(state[f"decoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0])
    if width % ch:
      raise WeightLoadError(source, other=[f"pixel decoder level {i} width {width} is not "
                                                  f"a multiple of the base width {ch}"])
    mult.append(width // ch)
  cfg["pixel_ch"] = ch
  cfg["pixel_ch_mult"] = tuple(reversed(mult))
  cfg["pixel_num_res_blocks"] = _count(state, r"decoder\.conv_blocks\.0\.res\.(\d+)\.") - 1
  cfg.update(overrides)
  return cfg


_INDEXED = [
    (r"^projectors_(\d+)$", "projectors.{}"), (r"^norm_layers_(\d+)$", "norm_layers.{}"),
    (r"^layers_(\d+)$", "transformer.layers.{}"), (r"^mlp_(\d+)$", "mlp.{}"),
    (r"^mid_(\d+)$", "mid.{}"),
]


def official_key(path: str) -> tuple[str, trees.Transform | None]:
  """Flax path ('decoder/conv_blocks_0_res_1/conv1/kernel') -> (official key, transform).

  The transform is None for kernels: `mapping_for` picks conv or linear from the rank.
  """
  parts = path.split("/")
  leaf, out = parts[-1], []
  for part in parts[:-1]:
    m = re.match(r"^conv_blocks_(\d+)_res_(\d+)$", part)
    if m:
      out.append(f"conv_blocks.{m.group(1)}.res.{m.group(2)}")
      continue
    m = re.match(r"^conv_blocks_(\d+)_upsample$", part)
    if m:
      out.append(f"conv_blocks.{m.group(1)}.upsample.conv")
      continue
    for pattern, fmt in _INDEXED:
      m = re.match(pattern, part)
      if m:
        out.append(fmt.format(m.group(1)))
        break
    else:
      out.append(part)
  prefix = ".".join(out)
  if leaf == "kernel":
    return f"{prefix}.weight", None  # transform chosen from the rank at assembly
  if leaf == "scale":
    return f"{prefix}.weight", trees.identity
  if leaf == "bias":
    return f"{prefix}.bias", trees.identity
  if parts == ["slot_quantize", "embedding"]:
    return "slot_quantize.embedding.weight", trees.identity
  return f"{prefix}.{leaf}" if prefix else leaf, trees.identity


def _kernel(x: np.ndarray) -> np.ndarray:
  return trees.conv(x) if x.ndim == 4 else trees.linear(x)


def mapping_for(expected) -> dict:
  """Flax path -> (official key, transform) for every leaf of the (abstract) param tree."""
  m = {}
  for path in trees.flatten(expected):
    key, fn = official_key(path)
    m[path] = (key, fn or _kernel)
  return m

