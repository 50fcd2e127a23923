"""Hugging Face CLIP / SigLIP vision-tower key maps and config inference.

Covers the `save_pretrained` layouts of
  * `CLIPVisionModel` / `CLIPVisionModelWithProjection` (model_type "clip_vision_model"),
  * `SiglipVisionModel` (model_type "siglip_vision_model"),
  * a full `CLIPModel` / `SiglipModel` (model_type "clip" / "siglip"): only the vision tower is
    loaded (config.json's `vision_config`, tensors under `vision_model.`); the text tower and
    the contrastive extras (`text_model.*`, `text_projection`, `visual_projection`,
    `logit_scale`, `logit_bias`) are dropped by name. Any other tensor is an error.
Key prefixes: transformers v5 saves a vision-only model without a prefix, v4 (and every full
model) under `vision_model.`; `tower_mapping` handles both. Non-persistent `position_ids`
buffers found in old checkpoints are dropped. The extras above are dropped only around a nested
(`vision_model.`) tower; in a prefix-free folder they are unexpected.

The configs are `CLIPVision` / `SiglipVision` constructor kwargs; `vfmtok_jax.vfm_zoo` builds the
modules. Its `load_hf_vision_folder` dispatches on config.json's model_type and refuses DINOv2
types with `NotHandledHere` (their key maps are `vfmtok_jax.weights.dinov2`).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from vfmtok_jax.weights import trees

CLIP_TYPES = ("clip", "clip_vision_model")
SIGLIP_TYPES = ("siglip", "siglip_vision_model")
FULL_TYPES = ("clip", "siglip")
NOT_HANDLED_TYPES = ("dinov2", "dinov2_with_registers")
VISION_PREFIX = "vision_model."
# Tensors of a full CLIPModel / SiglipModel or CLIPVisionModelWithProjection outside the tower.
DROPPED_KEYS = ("text_projection.weight", "visual_projection.weight", "logit_scale", "logit_bias")
DROPPED_PREFIXES = ("text_model.",)

# transformers' config defaults, used only for fields a config.json leaves out.
CLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, num_channels=3, image_size=224, patch_size=32,
                     hidden_act="quick_gelu", layer_norm_eps=1e-5)
SIGLIP_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                       hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)


class NotHandledHere(ValueError):
  """config.json names a model type the CLIP/SigLIP loaders do not load (e.g. DINOv2)."""


# ----------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------

def vision_config(config: Mapping, types: tuple[str, ...]) -> dict:
  """The vision part of a config.json dict (the whole dict for vision-only model types)."""
  model_type = config.get("model_type")
  if model_type not in types:
    raise ValueError(f"config.json model_type {model_type!r} is not one of {types}")
  if model_type in FULL_TYPES:
    return dict(config.get("vision_config") or {})
  return dict(config)


def _arch(config: Mapping, defaults: Mapping) -> dict:
  cfg = {**defaults, **{k: v for k, v in config.items() if v is not None}}
  return dict(embed_dim=int(cfg["hidden_size"]), depth=int(cfg["num_hidden_layers"]),
              num_heads=int(cfg["num_attention_heads"]), mlp_hidden=int(cfg["intermediate_size"]),
              patch_size=int(cfg["patch_size"]), image_size=int(cfg["image_size"]),
              hidden_act=str(cfg["hidden_act"]), ln_eps=float(cfg["layer_norm_eps"]),
              num_channels=int(cfg["num_channels"]))


def clip_config(config: Mapping) -> dict:
  """CLIPVision kwargs from a CLIPVisionConfig or CLIPConfig dict."""
  return _arch(vision_config(config, CLIP_TYPES), CLIP_DEFAULTS)


def siglip_config(config: Mapping) -> dict:
  """SiglipVision kwargs from a SiglipVisionConfig or SiglipConfig dict."""
  cfg = vision_config(config, SIGLIP_TYPES)
  kwargs = _arch(cfg, SIGLIP_DEFAULTS)
  use_head = cfg.get("vision_use_head")
  kwargs["use_head"] = SIGLIP_DEFAULTS["vision_use_head"] if use_head is None else bool(use_head)
  return kwargs


# ----------------------------------------------------------------------------------------------
# Key maps (flat Flax path -> (HF key(s), transform)), keys relative to the tower.
# ----------------------------------------------------------------------------------------------

def _encoder_mapping(depth: int) -> dict:
  m = {}
  for i in range(depth):
    src, dst = f"encoder.layers.{i}", f"blocks_{i}"
    q, k, v = (f"{src}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
    m.update(trees.nest(f"{dst}/norm1", trees.ln_entries(f"{src}.layer_norm1")))
    m.update(trees.nest(f"{dst}/norm2", trees.ln_entries(f"{src}.layer_norm2")))
    m[f"{dst}/attn/qkv/kernel"] = ((f"{q}.weight", f"{k}.weight", f"{v}.weight"),
                                   trees.concat_linear)
    m[f"{dst}/attn/qkv/bias"] = ((f"{q}.bias", f"{k}.bias", f"{v}.bias"), trees.concat)
    m.update(trees.nest(f"{dst}/attn/proj", trees.dense_entries(f"{src}.self_attn.out_proj")))
    m.update(trees.nest(f"{dst}/mlp/fc1", trees.dense_entries(f"{src}.mlp.fc1")))
    m.update(trees.nest(f"{dst}/mlp/fc2", trees.dense_entries(f"{src}.mlp.fc2")))
  return m


def clip_mapping(*, depth: int) -> dict:
  """Flax path -> CLIPVisionModel key (no `vision_model.` prefix)."""
  m = {
      "patch_embed/kernel": ("embeddings.patch_embedding.weight", trees.conv),
      "class_embedding": ("embeddings.class_embedding", trees.identity),
      "position_embedding": ("embeddings.position_embedding.weight", trees.identity),
  }
  m.update(trees.nest("pre_norm", trees.ln_entries("pre_layrnorm")))
  m.update(_encoder_mapping(depth))
  m.update(trees.nest("post_norm", trees.ln_entries("post_layernorm")))
  return m


def _in_proj_rows(start: int, stop: int | None):
  """Rows [start*D, stop*D) of torch MHA's packed (3D, ...) in_proj, as a Flax kernel/bias."""
  def take(x: np.ndarray) -> np.ndarray:
    d = x.shape[0] // 3
    if x.shape[0] != 3 * d:
      raise ValueError(f"in_proj first axis {x.shape[0]} is not 3 * width")
    part = x[start * d:(stop * d if stop is not None else None)]
    return trees.linear(part) if part.ndim == 2 else part
  return take


def siglip_mapping(*, depth: int, use_head: bool = True) -> dict:
  """Flax path -> SiglipVisionModel key (no `vision_model.` prefix)."""
  m = {
      "patch_embed/kernel": ("embeddings.patch_embedding.weight", trees.conv),
      "patch_embed/bias": ("embeddings.patch_embedding.bias", trees.identity),
      "position_embedding": ("embeddings.position_embedding.weight", trees.identity),
  }
  m.update(_encoder_mapping(depth))
  m.update(trees.nest("post_norm", trees.ln_entries("post_layernorm")))
  if use_head:
    m["head/probe"] = ("head.probe", trees.identity)
    m["head/q/kernel"] = ("head.attention.in_proj_weight", _in_proj_rows(0, 1))
    m["head/q/bias"] = ("head.attention.in_proj_bias", _in_proj_rows(0, 1))
    m["head/kv/kernel"] = ("head.attention.in_proj_weight", _in_proj_rows(1, None))
    m["head/kv/bias"] = ("head.attention.in_proj_bias", _in_proj_rows(1, None))
    m.update(trees.nest("head/proj", trees.dense_entries("head.attention.out_proj")))
    m.update(trees.nest("head/norm", trees.ln_entries("head.layernorm")))
    m.update(trees.nest("head/mlp/fc1", trees.dense_entries("head.mlp.fc1")))
    m.update(trees.nest("head/mlp/fc2", trees.dense_entries("head.mlp.fc2")))
  return m


# ----------------------------------------------------------------------------------------------
# Where the tower sits in a state dict.
# ----------------------------------------------------------------------------------------------

def tower_prefix(state: Mapping[str, np.ndarray]) -> str:
  """`vision_model.` when the tower is saved under it (v4 vision models, full models), else ''."""
  return VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in state) else ""


def dropped_keys(state: Mapping[str, np.ndarray], prefix: str) -> list[str]:
  """Keys deliberately not loaded: position_ids buffers, and the extras outside a nested tower."""
  out = [k for k in state if k.endswith("embeddings.position_ids")]
  if prefix:
    out += [k for k in state if k in DROPPED_KEYS or k.startswith(DROPPED_PREFIXES)]
  return out


def tower_mapping(mapping: Mapping[str, tuple],
                  state: Mapping[str, np.ndarray]) -> tuple[dict, list[str]]:
  """(`mapping` with the keys moved under the state's tower prefix, keys to ignore)."""
  prefix = tower_prefix(state)
  moved = {path: ((prefix + keys) if isinstance(keys, str) else tuple(prefix + k for k in keys),
                  fn)
           for path, (keys, fn) in mapping.items()}
  return moved, dropped_keys(state, prefix)
