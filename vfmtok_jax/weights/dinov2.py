"""DINOv2 key maps and config inference, for the official layout and Hugging Face folders.

Official layout (facebookresearch/dinov2 `.pth`, also nested in the VFMTok tokenizer
checkpoint under `encode_transformer.backbone.pretrained_encoder.`): `cls_token`, `pos_embed`,
`register_tokens`, `mask_token`, `patch_embed.proj.*`, `blocks.N.{norm1, attn.qkv, attn.proj,
ls1.gamma, norm2, mlp.fc1|fc2 or mlp.w12|w3, ls2.gamma}`, `norm.*`. Chunked checkpoints
(`blocks.C.N.*`) are accepted too.

Hugging Face layout (`Dinov2Model`, `Dinov2WithRegistersModel`): `embeddings.*`,
`encoder.layer.N.*`, `layernorm.*`, in both the transformers-v5 names (`attention.q_proj`,
`mlp.gate_proj/up_proj/down_proj`) and the older on-disk names (`attention.attention.query`,
`attention.output.dense`, `mlp.weights_in/weights_out`).

The configs returned here are `DinoV2` constructor kwargs; the key maps take the few of them
that shape the param tree. Building the module is `vfmtok_jax.vfm_zoo`'s job.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Mapping

import numpy as np

from vfmtok_jax.weights import trees
from vfmtok_jax.weights.files import WeightLoadError, strip_prefix

VFMTOK_PREFIX = "encode_transformer.backbone.pretrained_encoder."
# Heads of the published shapes, by width (the state dict does not record them).
HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1536: 24}
HF_MODEL_TYPES = ("dinov2", "dinov2_with_registers")


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


def official_backbone(state: Mapping[str, np.ndarray], *, source: str,
                      prefix: str | None = None) -> dict[str, np.ndarray]:
  """The official-layout backbone tensors of `state`, prefix removed and blocks unchunked.

  Args:
    state: flat tensors.
    source: name for errors.
    prefix: key prefix to select; None picks VFMTOK_PREFIX when the state dict is a VFMTok
      tokenizer checkpoint, else no prefix.

  Raises:
    WeightLoadError: no key lies under the prefix.
  """
  if prefix is None:
    prefix = VFMTOK_PREFIX if any(k.startswith(VFMTOK_PREFIX) for k in state) else ""
  sub = unchunk_blocks(strip_prefix(state, prefix))
  if not sub:
    raise WeightLoadError(source, other=[f"no keys under prefix {prefix!r}"])
  return sub


def official_config(state: Mapping[str, np.ndarray], *, num_heads: int | None = None) -> dict:
  """DinoV2 constructor kwargs inferred from an official-layout state dict."""
  problems = [f"{k} (needed to infer the architecture)" for k in
              ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
  if problems:
    raise WeightLoadError("DINOv2 state dict", missing=problems)
  dim = int(state["cls_token"].shape[-1])
  depth = len({int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))})
  grid = math.isqrt(int(state["pos_embed"].shape[1]) - 1)
  heads = num_heads or HEADS_BY_WIDTH.get(dim)
  if heads is None:
    raise WeightLoadError("DINOv2 state dict", other=[
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


def official_mapping(*, depth: int, num_register_tokens: int = 0, layerscale: bool = True,
                     ffn: str = "mlp") -> dict:
  """Flax path -> (official key, transform) for a DinoV2 of these hyperparameters."""
  m = {
      "patch_embed/kernel": ("patch_embed.proj.weight", trees.conv),
      "patch_embed/bias": ("patch_embed.proj.bias", trees.identity),
      "cls_token": ("cls_token", trees.identity),
      "pos_embed": ("pos_embed", trees.identity),
      "mask_token": ("mask_token", trees.identity),
  }
  if num_register_tokens:
    m["register_tokens"] = ("register_tokens", trees.identity)
  m.update(trees.nest("norm", trees.ln_entries("norm")))
  for i in range(depth):
    src, dst = f"blocks.{i}", f"blocks_{i}"
    m.update(trees.nest(f"{dst}/norm1", trees.ln_entries(f"{src}.norm1")))
    m.update(trees.nest(f"{dst}/norm2", trees.ln_entries(f"{src}.norm2")))
    m.update(trees.nest(f"{dst}/attn/qkv", trees.dense_entries(f"{src}.attn.qkv")))
    m.update(trees.nest(f"{dst}/attn/proj", trees.dense_entries(f"{src}.attn.proj")))
    if layerscale:
      m[f"{dst}/ls1/gamma"] = (f"{src}.ls1.gamma", trees.identity)
      m[f"{dst}/ls2/gamma"] = (f"{src}.ls2.gamma", trees.identity)
    names = ("w12", "w3") if ffn == "swiglu" else ("fc1", "fc2")
    for name in names:
      m.update(trees.nest(f"{dst}/mlp/{name}", trees.dense_entries(f"{src}.mlp.{name}")))
  return m


# ----------------------------------------------------------------------------------------------
# Hugging Face layout.
# ----------------------------------------------------------------------------------------------

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


def hf_mapping(keys: Iterable[str], *, depth: int, num_register_tokens: int = 0,
               ffn: str = "mlp") -> dict:
  """Flax path -> HF key(s), accepting transformers-v5 and older names (`keys`: the state's)."""
  keys = set(keys)
  m = {
      "patch_embed/kernel": ("embeddings.patch_embeddings.projection.weight", trees.conv),
      "patch_embed/bias": ("embeddings.patch_embeddings.projection.bias", trees.identity),
      "cls_token": ("embeddings.cls_token", trees.identity),
      "pos_embed": ("embeddings.position_embeddings", trees.identity),
      "mask_token": ("embeddings.mask_token", trees.identity),
  }
  if num_register_tokens:
    m["register_tokens"] = ("embeddings.register_tokens", trees.identity)
  m.update(trees.nest("norm", trees.ln_entries("layernorm")))
  for i in range(depth):
    src, dst = f"encoder.layer.{i}", f"blocks_{i}"
    m.update(trees.nest(f"{dst}/norm1", trees.ln_entries(f"{src}.norm1")))
    m.update(trees.nest(f"{dst}/norm2", trees.ln_entries(f"{src}.norm2")))
    if f"{src}.attention.attention.query.weight" in keys:
      q, k, v = (f"{src}.attention.attention.{n}" for n in ("query", "key", "value"))
      o = f"{src}.attention.output.dense"
    else:
      q, k, v, o = (f"{src}.attention.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    m[f"{dst}/attn/qkv/kernel"] = ((f"{q}.weight", f"{k}.weight", f"{v}.weight"),
                                   trees.concat_linear)
    m[f"{dst}/attn/qkv/bias"] = ((f"{q}.bias", f"{k}.bias", f"{v}.bias"), trees.concat)
    m.update(trees.nest(f"{dst}/attn/proj", trees.dense_entries(o)))
    m[f"{dst}/ls1/gamma"] = (f"{src}.layer_scale1.lambda1", trees.identity)
    m[f"{dst}/ls2/gamma"] = (f"{src}.layer_scale2.lambda1", trees.identity)
    if ffn == "swiglu":
      if f"{src}.mlp.weights_in.weight" in keys:
        m.update(trees.nest(f"{dst}/mlp/w12", trees.dense_entries(f"{src}.mlp.weights_in")))
        m.update(trees.nest(f"{dst}/mlp/w3", trees.dense_entries(f"{src}.mlp.weights_out")))
      else:
        gate, up = f"{src}.mlp.gate_proj", f"{src}.mlp.up_proj"
        m[f"{dst}/mlp/w12/kernel"] = ((f"{gate}.weight", f"{up}.weight"), trees.concat_linear)
        m[f"{dst}/mlp/w12/bias"] = ((f"{gate}.bias", f"{up}.bias"), trees.concat)
        m.update(trees.nest(f"{dst}/mlp/w3", trees.dense_entries(f"{src}.mlp.down_proj")))
    else:
      m.update(trees.nest(f"{dst}/mlp/fc1", trees.dense_entries(f"{src}.mlp.fc1")))
      m.update(trees.nest(f"{dst}/mlp/fc2", trees.dense_entries(f"{src}.mlp.fc2")))
  return m


def strip_hf_prefix(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Drops a wrapper prefix (e.g. `dinov2.` from a classification checkpoint) if present."""
  for prefix in ("dinov2.", "dinov2_with_registers.", "model."):
    if any(k.startswith(prefix + "embeddings.") for k in state):
      return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
  return dict(state)
