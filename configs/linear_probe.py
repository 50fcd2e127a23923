r"""Linear-probe configs (`python -m vfmtok_jax.linear_probe --config ...:VARIANT`).

Variants:
  imagenet  fit on centre crops of ImageNet train, top-1 on validation (tfds imagenet2012,
            prepared beforehand). Full-batch L-BFGS: the train features must fit in memory
            (1.28M x dim float32; use `--config.train_input.dataset=tfds:...` for a subset).
  demo      the demo photos as classes: 32 random crops of each to fit, 8 other crops to score.
Fields: train_input / eval_input (`input_pipeline.default_input_config`; image_size 0 = the
tokenizer's), features ("vfm", "slots" or "codes"), pool ("mean" or "flatten"), l2,
max_iterations, num_classes (0: the largest label + 1), batch_size.
"""

import ml_collections

from configs import common
from vfmtok_jax.data import input_pipeline


def get_config(arg=None):
  arg = common.parse_arg(arg, imagenet=False, demo=False, features="slots")
  if arg.imagenet and arg.demo:
    raise common.ConfigArgError("choose one of imagenet, demo")
  c = ml_collections.ConfigDict()
  c.train_input = input_pipeline.default_input_config("imagenet2012", image_size=0,
                                                      eval_split="train")
  c.eval_input = input_pipeline.default_input_config("imagenet2012", image_size=0)
  c.features = arg.features
  c.pool = "mean"
  c.l2 = 1e-4
  c.max_iterations = 500
  c.num_classes = 0
  c.batch_size = 64
  if arg.demo:
    c.train_input.update(dataset="demo", demo_eval_crops=32, demo_eval_seed=11)
    c.eval_input.update(dataset="demo", demo_eval_crops=8, demo_eval_seed=12)
    c.batch_size = 32
  return common.locked(c)
