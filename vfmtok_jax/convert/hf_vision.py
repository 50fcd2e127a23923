"""Hugging Face CLIP / SigLIP vision towers -> `CLIPVision` / `SiglipVision` params.

Reads a `save_pretrained` folder (config.json + *.safetensors, or pytorch_model.bin) of
  * `CLIPVisionModel` / `CLIPVisionModelWithProjection` (model_type "clip_vision_model"),
  * `SiglipVisionModel` (model_type "siglip_vision_model"),
  * a full `CLIPModel` / `SiglipModel` (model_type "clip" / "siglip"): only the vision tower is
    loaded (config.json's `vision_config`, tensors under `vision_model.`); the text tower and
    the contrastive extras (`text_model.*`, `text_projection`, `visual_projection`,
    `logit_scale`, `logit_bias`) are dropped by name. Any other tensor is an error.
Key prefixes: transformers v5 saves a vision-only model without a prefix, v4 (and every full
model) under `vision_model.`; both load. Non-persistent `position_ids` buffers found in old
checkpoints are dropped. The extras above are dropped only around a nested (`vision_model.`)
tower; in a prefix-free folder they are unexpected. Everything else must match exactly: every
missing, unexpected and mis-shaped tensor is reported in one `WeightLoadError`.

`load_hf_vision_folder` dispatches on config.json's model_type; DINOv2 types are refused with
`NotHandledHere` so a caller can route them to `vfmtok_jax.convert.dinov2` first.
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from vfmtok_jax.convert import common
from vfmtok_jax.models.vfm import clip
from vfmtok_jax.models.vfm import siglip

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
  """config.json names a model type this module does not load (e.g. DINOv2)."""


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
# Mappings (flat Flax path -> (HF key(s), transform)), keys relative to the tower.
# ----------------------------------------------------------------------------------------------

def _encoder_mapping(depth: int) -> dict:
  m = {}
  for i in range(depth):
    src, dst = f"encoder.layers.{i}", f"blocks_{i}"
    q, k, v = (f"{src}.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj"))
    m.update(common.nest(f"{dst}/norm1", common.ln_entries(f"{src}.layer_norm1")))
    m.update(common.nest(f"{dst}/norm2", common.ln_entries(f"{src}.layer_norm2")))
    m[f"{dst}/attn/qkv/kernel"] = ((f"{q}.weight", f"{k}.weight", f"{v}.weight"), common.concat_linear)
    m[f"{dst}/attn/qkv/bias"] = ((f"{q}.bias", f"{k}.bias", f"{v}.bias"), common.concat)
    m.update(common.nest(f"{dst}/attn/proj", common.dense_entries(f"{src}.self_attn.out_proj")))
    m.update(common.nest(f"{dst}/mlp/fc1", common.dense_entries(f"{src}.mlp.fc1")))
    m.update(common.nest(f"{dst}/mlp/fc2", common.dense_entries(f"{src}.mlp.fc2")))
  return m


def clip_mapping(model: clip.CLIPVision) -> dict:
  """Flax path -> CLIPVisionModel key (no `vision_model.` prefix)."""
  m = {
      "patch_embed/kernel": ("embeddings.patch_embedding.weight", common.conv),
      "class_embedding": ("embeddings.class_embedding", common.identity),
      "position_embedding": ("embeddings.position_embedding.weight", common.identity),
  }
  m.update(common.nest("pre_norm", common.ln_entries("pre_layrnorm")))
  m.update(_encoder_mapping(model.depth))
  m.update(common.nest("post_norm", common.ln_entries("post_layernorm")))
  return m


def _in_proj_rows(start: int, stop: int | None):
  """Rows [start*D, stop*D) of torch MHA's packed (3D, ...) in_proj, as a Flax kernel/bias."""
  def take(x: np.ndarray) -> np.ndarray:
    d = x.shape[0] // 3
    if x.shape[0] != 3 * d:
      raise ValueError(f"in_proj first axis {x.shape[0]} is not 3 * width")
    part = x[start * d:(stop * d if stop is not None else None)]
    return common.linear(part) if part.ndim == 2 else part
  return take


def siglip_mapping(model: siglip.SiglipVision) -> dict:
  """Flax path -> SiglipVisionModel key (no `vision_model.` prefix)."""
  m = {
      "patch_embed/kernel": ("embeddings.patch_embedding.weight", common.conv),
      "patch_embed/bias": ("embeddings.patch_embedding.bias", common.identity),
      "position_embedding": ("embeddings.position_embedding.weight", common.identity),
  }
  m.update(_encoder_mapping(model.depth))
  m.update(common.nest("post_norm", common.ln_entries("post_layernorm")))
  if model.use_head:
    m["head/probe"] = ("head.probe", common.identity)
    m["head/q/kernel"] = ("head.attention.in_proj_weight", _in_proj_rows(0, 1))
    m["head/q/bias"] = ("head.attention.in_proj_bias", _in_proj_rows(0, 1))
    m["head/kv/kernel"] = ("head.attention.in_proj_weight", _in_proj_rows(1, None))
    m["head/kv/bias"] = ("head.attention.in_proj_bias", _in_proj_rows(1, None))
    m.update(common.nest("head/proj", common.dense_entries("head.attention.out_proj")))
    m.update(common.nest("head/norm", common.ln_entries("head.layernorm")))
    m.update(common.nest("head/mlp/fc1", common.dense_entries("head.mlp.fc1")))
    m.update(common.nest("head/mlp/fc2", common.dense_entries("head.mlp.fc2")))
  return m


# ----------------------------------------------------------------------------------------------
# Assembly.
# ----------------------------------------------------------------------------------------------

def _tower_prefix(state: Mapping[str, np.ndarray]) -> str:
  """`vision_model.` when the tower is saved under it (v4 vision models, full models), else ''."""
  return VISION_PREFIX if any(k.startswith(VISION_PREFIX) for k in state) else ""


def _dropped(state: Mapping[str, np.ndarray], prefix: str) -> list[str]:
  """Keys deliberately not loaded: position_ids buffers, and the extras outside a nested tower."""
  out = [k for k in state if k.endswith("embeddings.position_ids")]
  if prefix:
    out += [k for k in state if k in DROPPED_KEYS or k.startswith(DROPPED_PREFIXES)]
  return out


def _assemble(model, mapping: Mapping[str, tuple], state: Mapping[str, np.ndarray],
              source: str) -> dict:
  prefix = _tower_prefix(state)
  mapping = {path: ((prefix + keys) if isinstance(keys, str)
                    else tuple(prefix + k for k in keys), fn)
             for path, (keys, fn) in mapping.items()}
  dummy = np.zeros((1, model.patch_size, model.patch_size, model.num_channels), np.float32)
  expected = common.expected_params(model, dummy)
  return common.assemble(expected, mapping, state, source=source,
                         ignore=_dropped(state, prefix))


def clip_from_hf_state(state: Mapping[str, np.ndarray], config: Mapping, *, source: str,
                       **module_kwargs):
  """(CLIPVision, params) from HF tensors and the config.json dict (module_kwargs: dtype)."""
  kwargs = clip_config(config)
  kwargs.update(module_kwargs)
  model = clip.CLIPVision(**kwargs)
  return model, _assemble(model, clip_mapping(model), state, source)


def siglip_from_hf_state(state: Mapping[str, np.ndarray], config: Mapping, *, source: str,
                         **module_kwargs):
  """(SiglipVision, params) from HF tensors and the config.json dict (module_kwargs: dtype)."""
  kwargs = siglip_config(config)
  kwargs.update(module_kwargs)
  model = siglip.SiglipVision(**kwargs)
  return model, _assemble(model, siglip_mapping(model), state, source)


# ----------------------------------------------------------------------------------------------
# Folders.
# ----------------------------------------------------------------------------------------------

def read_config(path: str) -> dict:
  """config.json of a `save_pretrained` folder."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise common.WeightLoadError(path, other=["no config.json: not a Hugging Face model folder"])
  with open(cfg_path) as f:
    return json.load(f)


def load_clip_folder(path: str, **module_kwargs):
  """(CLIPVision, params) from a CLIPVisionModel(WithProjection) / CLIPModel folder."""
  config, state = common.read_hf_folder(path)
  return clip_from_hf_state(state, config, source=path, **module_kwargs)


def load_siglip_folder(path: str, **module_kwargs):
  """(SiglipVision, params) from a SiglipVisionModel / SiglipModel folder."""
  config, state = common.read_hf_folder(path)
  return siglip_from_hf_state(state, config, source=path, **module_kwargs)


def hf_model_type(path: str) -> str | None:
  """config.json's model_type of a folder."""
  return read_config(path).get("model_type")


def load_hf_vision_folder(path: str, **module_kwargs):
  """(module, params) for a CLIP or SigLIP folder, chosen by config.json's model_type.

  Raises:
    NotHandledHere: for dinov2 / dinov2_with_registers (route those to the DINOv2 loader).
    ValueError: for any other unknown model_type.
    WeightLoadError: for tensors that do not fit.
  """
  model_type = hf_model_type(path)
  if model_type in CLIP_TYPES:
    return load_clip_folder(path, **module_kwargs)
  if model_type in SIGLIP_TYPES:
    return load_siglip_folder(path, **module_kwargs)
  if model_type in NOT_HANDLED_TYPES:
    raise NotHandledHere(f"{path}: model_type {model_type!r} is not handled here "
                         "(hf_vision loads CLIP/SigLIP); use vfmtok_jax.convert.dinov2")
  raise ValueError(f"{path}: unsupported model_type {model_type!r}; expected one of "
                   f"{CLIP_TYPES + SIGLIP_TYPES}")
