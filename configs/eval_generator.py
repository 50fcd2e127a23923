r"""Generator evaluation configs (`python -m vfmtok_jax.eval_generator --config ...:VARIANT`).

Variants:
  imagenet  the reference's `test_net.py`: 50,000 samples with uniform random labels, decoded
            to 256 px (a 336 px tokenizer; bicubic without antialias), scored against an ADM
            reference batch (`--config.ref_batch=VIRTUAL_imagenet256_labeled.npz`) with the FID
            Inception weights: IS, FID, sFID, precision, recall. The reference's default
            guidance is CFG 1.5; the paper's CFG-free numbers use
            `--config.sampling.cfg_scale=1.0`.
  demo      a handful of samples per class of the demo GPT (needs a ref_batch too).
Fields: num_samples (per class with per_class), seed, batch_size (rows per sampler call, x2
with guidance), sampling.{cfg_scale, cfg_interval, cfg_schedule, temperature, top_k, top_p},
image_size (0: 256 for a 336 px tokenizer, else its size), inception ("default" or a path),
fd_vfm ("off", "default" or a VFM source: FD of the samples against the reference images),
fd_size, save_samples (write samples.npz in the ADM sample format).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, imagenet=False, demo=False)
  if arg.imagenet and arg.demo:
    raise common.ConfigArgError("choose one of imagenet, demo")
  c = ml_collections.ConfigDict()
  c.num_samples = 50_000
  c.per_class = False
  c.seed = 0
  c.batch_size = 32
  c.sampling = ml_collections.ConfigDict(dict(
      cfg_scale=1.5, cfg_interval=-1, cfg_schedule="constant", temperature=1.0, top_k=0,
      top_p=1.0))
  c.image_size = 0
  c.ref_batch = ""
  c.inception = "default"
  c.fd_vfm = "off"
  c.fd_size = 224
  c.save_samples = True
  if arg.demo:
    c.num_samples = 4
    c.per_class = True
    c.batch_size = 16
  return common.locked(c)
