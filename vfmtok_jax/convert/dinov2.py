"""DINOv2 weights -> `DinoV2` params, from the official layout or a Hugging Face folder.

Official layout (facebookresearch/dinov2 `.pth`, also nested in the VFMTok tokenizer
checkpoint under `encode_transformer.backbone.pretrained_encoder.`): `cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `patch_embed.proj.*`, `blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1|fc2 or mlp.w12|w3, ls2.gamma}`, `norm.*`. Chunked checkpoints
(`blocks.C.N.*`) are accepted too.

Hugging Face layout (`Dinov2Model`, `Dinov2WithRegistersModel`): `embeddings.*`,
`encoder.layer.N.*`, `layernorm.*`, in both the transformers-v5 names (`attention.q_proj`,
`mlp.gate_proj/up_proj/down_proj`) and the older on-disk names (`attention.attention.query`,
`attention.output.dense`, `mlp.weights_in/weights_out`).
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

import numpy as np

from vfmtok_jax.convert import common
from vfmtok_jax.models.vfm import dinov2

VFMTOK_PREFIX = "encode_transformer.backbone.pretrained_encoder."
# Heads of the published shapes, by width (the state dict does not record them).
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}


# ----------------------------------------------------------------------------------------------
# Official layout.
# ----------------------------------------------------------------------------------------------

def unchunk_blocks(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames `blocks.C.N.*` (block-chunked checkpoints) to `blocks.N.*`."""
  out = {}
  for k, v in state.items():
    m = re.match(r"blocks\.\d+\.(\d+)\.(.*)", k)
    out[f"blocks.{m.group(1)}.{m.group(2)}" if m else k] = v
  return out


def official_config(state: Mapping[str, np.ndarray], *, num_heads: int | None = None) -> dict:
  """DinoV2 constructor kwargs inferred from an official-layout state dict."""
  problems = [f"{k} (needed to infer the architecture)" for k in
              ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
  if problems:
    raise common.WeightLoadError("DINOv2 state dict", missing=problems)
  dim = int(state["cls_token"].shape[-1])
  depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
  grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
  heads = num_heads or HEADS_BY_WIDTH.get(dim)
  if heads is None:
    raise common.WeightLoadError("DINOv2 state dict", other=[
        f"width {dim} is not a published DINOv2 width; pass num_heads explicitly"])
  ffn = "swiglu" if "blocks.0.mlp.w12.weight" in state else "mlp"
  mlp_ratio = 4.0
  if ffn == "mlp" and "blocks.0.mlp.fc1.weight" in state:
    mlp_ratio = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
  return dict(embed_dim=dim, depth=depth, num_heads=heads,
              patch_size=int(state["patch_embed.proj.weight"].shape[-1]),
              mlp_ratio=mlp_ratio, ffn=ffn,
              num_register_tokens=int(state["register_tokens"].shape[1])
              if "register_tokens" in state else 0,
              pos_grid=grid, layerscale="blocks.0.ls1.gamma" in state)


def official_mapping(model: dinov2.DinoV2) -> dict:
  """Flax path -> (official key, transform)."""
  m = {
      "patch_embed/kernel": ("patch_embed.proj.weight", common.conv),
      "patch_embed/bias": ("patch_embed.proj.bias", common.identity),
      "cls_token": ("cls_token", common.identity),
      "pos_embed": ("pos_embed", common.identity),
      "mask_token": ("mask_token", common.identity),
  }
  if model.num_register_tokens:
    m["register_tokens"] = ("register_tokens", common.identity)
  m.update(common.nest("norm", common.ln_entries("norm")))
  for i in range(model.depth):
    src, dst = f"blocks.{i}", f"blocks_{i}"
    m.update(common.nest(f"{dst}/norm1", common.ln_entries(f"{src}.norm1")))
    m.update(common.nest(f"{dst}/norm2", common.ln_entries(f"{src}.norm2")))
    m.update(common.nest(f"{dst}/attn/qkv", common.dense_entries(f"{src}.attn.qkv")))
    m.update(common.nest(f"{dst}/attn/proj", common.dense_entries(f"{src}.attn.proj")))
    if model.layerscale:
      m[f"{dst}/ls1/gamma"] = (f"{src}.ls1.gamma", common.identity)
      m[f"{dst}/ls2/gamma"] = (f"{src}.ls2.gamma", common.identity)
    names = ("w12", "w3") if model.ffn == "swiglu" else ("fc1", "fc2")
    for name in names:
      m.update(common.nest(f"{dst}/mlp/{name}", common.dense_entries(f"{src}.mlp.{name}")))
  return m


def from_official_state(state: Mapping[str, np.ndarray], *, source: str, prefix: str | None = None,
                        num_heads: int | None = None, allow_unexpected: bool = False,
                        **module_kwargs):
  """(DinoV2, params) from an official-layout state dict.

  Args:
    state: flat tensors.
    source: name for errors.
    prefix: key prefix to select (e.g. VFMTOK_PREFIX); None picks VFMTOK_PREFIX when the state
      dict is a VFMTok tokenizer checkpoint, else no prefix.
    num_heads: for non-published widths.
    allow_unexpected: ignore keys outside the backbone (needed when the prefix selects part of a
      larger checkpoint, which `prefix` handles already).
    **module_kwargs: extra DinoV2 fields (dtype, pos_interp_antialias).
  """
  if prefix is None:
    prefix = VFMTOK_PREFIX if any(k.startswith(VFMTOK_PREFIX) for k in state) else ""
  sub = unchunk_blocks(common.strip_prefix(state, prefix))
  if not sub:
    raise common.WeightLoadError(source, other=[f"no keys under prefix {prefix!r}"])
  kwargs = official_config(sub, num_heads=num_heads)
  kwargs.update(module_kwargs)
  model = dinov2.DinoV2(**kwargs)
  expected = common.expected_params(model, np.zeros((1, model.patch_size, model.patch_size, 3),
                                                    np.float32))
  params = common.assemble(expected, official_mapping(model), sub, source=source,
                           allow_unexpected=allow_unexpected)
  return model, params


def load_official(path: str, **kwargs):
  """(DinoV2, params) from an official `.pth`/`.safetensors`/`.npz` file (see from_official_state)."""
  return from_official_state(common.read_state_dict(path), source=path, **kwargs)


# ----------------------------------------------------------------------------------------------
# Hugging Face layout.
# ----------------------------------------------------------------------------------------------

HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


def hf_config(config: Mapping) -> dict:
  """DinoV2 kwargs from a transformers Dinov2Config / Dinov2WithRegistersConfig dict."""
  model_type = config.get("model_type")
  if model_type not in HF_MODEL_TYPES:
    raise ValueError(f"config.json model_type {model_type!r} is not a DINOv2 ({HF_MODEL_TYPES})")
  if config.get("hidden_act", "gelu") != "gelu":
    raise ValueError(f"unsupported DINOv2 hidden_act {config['hidden_act']!r} (expected 'gelu')")
  image_size, patch = int(config.get("image_size", 518)), int(config.get("patch_size", 14))
  return dict(
      embed_dim=int(config["hidden_size"]), depth=int(config["num_hidden_layers"]),
      num_heads=int(config["num_attention_heads"]), patch_size=patch,
      mlp_ratio=float(config.get("mlp_ratio", 4)),
      ffn="swiglu" if config.get("use_swiglu_ffn", False) else "mlp",
      num_register_tokens=int(config.get("num_register_tokens", 0)),
      pos_grid=image_size // patch, layerscale=True,
      ln_eps=float(config.get("layer_norm_eps", 1e-6)),
      # transformers' Dinov2Model resizes its table without antialias; the registers model with.
      pos_interp_antialias=model_type == "dinov2_with_registers")


def hf_mapping(model: dinov2.DinoV2, keys) -> dict:
  """Flax path -> HF key(s), accepting transformers-v5 and older names."""
  keys = set(keys)
  m = {
      "patch_embed/kernel": ("embeddings.patch_embeddings.projection.weight", common.conv),
      "patch_embed/bias": ("embeddings.patch_embeddings.projection.bias", common.identity),
      "cls_token": ("embeddings.cls_token", common.identity),
      "pos_embed": ("embeddings.position_embeddings", common.identity),
      "mask_token": ("embeddings.mask_token", common.identity),
  }
  if model.num_register_tokens:
    m["register_tokens"] = ("embeddings.register_tokens", common.identity)
  m.update(common.nest("norm", common.ln_entries("layernorm")))
  for i in range(model.depth):
    src, dst = f"encoder.layer.{i}", f"blocks_{i}"
    m.update(common.nest(f"{dst}/norm1", common.ln_entries(f"{src}.norm1")))
    m.update(common.nest(f"{dst}/norm2", common.ln_entries(f"{src}.norm2")))
    if f"{src}.attention.attention.query.weight" in keys:
      q, k, v = (f"{src}.attention.attention.{n}" for n in ("query", "key", "value"))
      o = f"{src}.attention.output.dense"
    else:
      q, k, v, o = (f"{src}.attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    m[f"{dst}/attn/qkv/kernel"] = ((f"{q}.weight", f"{k}.weight", f"{v}.weight"), common.concat_linear)
    m[f"{dst}/attn/qkv/bias"] = ((f"{q}.bias", f"{k}.bias", f"{v}.bias"), common.concat)
    m.update(common.nest(f"{dst}/attn/proj", common.dense_entries(o)))
    m[f"{dst}/ls1/gamma"] = (f"{src}.layer_scale1.lambda1", common.identity)
    m[f"{dst}/ls2/gamma"] = (f"{src}.layer_scale2.lambda1", common.identity)
    if model.ffn == "swiglu":
      if f"{src}.mlp.weights_in.weight" in keys:
        m.update(common.nest(f"{dst}/mlp/w12", common.dense_entries(f"{src}.mlp.weights_in")))
        m.update(common.nest(f"{dst}/mlp/w3", common.dense_entries(f"{src}.mlp.weights_out")))
      else:
        gate, up = f"{src}.mlp.gate_proj", f"{src}.mlp.up_proj"
        m[f"{dst}/mlp/w12/kernel"] = ((f"{gate}.weight", f"{up}.weight"), common.concat_linear)
        m[f"{dst}/mlp/w12/bias"] = ((f"{gate}.bias", f"{up}.bias"), common.concat)
        m.update(common.nest(f"{dst}/mlp/w3", common.dense_entries(f"{src}.mlp.down_proj")))
    else:
      m.update(common.nest(f"{dst}/mlp/fc1", common.dense_entries(f"{src}.mlp.fc1")))
      m.update(common.nest(f"{dst}/mlp/fc2", common.dense_entries(f"{src}.mlp.fc2")))
  return m


def strip_hf_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a wrapper prefix (e.g. `dinov2.` from a classification checkpoint) if present."""
  for prefix in ("dinov2.", "dinov2_with_registers.", "model."):
    if any(k.startswith(prefix + "embeddings.") for k in state):
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return dict(state)


def from_hf_state(state: Mapping[str, np.ndarray], config: Mapping, *, source: str,
                  **module_kwargs):
  """(DinoV2, params) from HF-layout tensors and the config.json dict."""
  kwargs = hf_config(config)
  kwargs.update(module_kwargs)
  model = dinov2.DinoV2(**kwargs)
  state = strip_hf_prefix(state)
  expected = common.expected_params(model, np.zeros((1, model.patch_size, model.patch_size, 3),
                                                    np.float32))
  params = common.assemble(expected, hf_mapping(model, state.keys()), state, source=source)
  return model, params


def load_hf_folder(path: str, **module_kwargs):
  """(DinoV2, params) from a Dinov2Model / Dinov2WithRegistersModel `save_pretrained` folder."""
  config, state = common.read_hf_folder(path)
  return from_hf_state(state, config, source=path, **module_kwargs)
