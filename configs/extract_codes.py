r"""Code extraction configs (`python -m vfmtok_jax.extract_codes --config ...:VARIANT`).

Variants:
  imagenet  ImageNet train (tfds imagenet2012, prepared beforehand), centre crop at the
            tokenizer's size, original + h-flip (LlamaGen's extractor without --ten-crop).
  demo      the offline demo photos: `crops_per_photo` crops of each (the centre crop and ADM
            random crops, `input_pipeline.demo_eval_set`), original + h-flip.
`variants`: "none" (original only), "flip" (original, h-flip) or "ten_crop" (centre crop at
1.1 x the size, then torchvision's TenCrop: 4 corners + centre, and the same of the flipped
image). `num_shards` fixes the output layout whatever the process count (each process writes
the shards s with s % process_count == process_index); a killed run resumes shard-wise.
"""

import ml_collections

from configs import common
from vfmtok_jax.data import input_pipeline


def get_config(arg=None):
  arg = common.parse_arg(arg, imagenet=False, demo=False, crops_per_photo=64)
  if arg.imagenet and arg.demo:
    raise common.ConfigArgError("choose one of imagenet, demo")
  c = ml_collections.ConfigDict()
  # image_size is set from the tokenizer (x 1.1 for ten_crop).
  c.input = input_pipeline.default_input_config("imagenet2012", image_size=0)
  c.split = "train"
  c.variants = "flip"
  c.ten_crop_range = 1.1
  c.num_shards = 64
  c.batch_size = 64  # per shard reader and tokenizer call
  if arg.demo:
    c.input.update(dataset="demo", demo_eval_crops=arg.crops_per_photo, demo_eval_seed=0)
    c.split = "validation"  # the demo's fixed crops (its only deterministic split)
    c.num_shards = 4
    c.batch_size = 32
  return common.locked(c)
