"""A tiny tokenizer training config on the golden DINOv2 (width 48, 4 blocks) for fast tests."""

import os

import numpy as np
from safetensors.numpy import load_file, save_file

from configs import tokenizer as tokenizer_configs
from vfmtok_jax.weights import dinov2 as convert_dinov2
from vfmtok_jax.weights import files as common

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def golden_vfm_file(directory) -> str:
  """The golden backbone as an official-layout DINOv2 safetensors (needs num_heads=3)."""
  path = os.path.join(str(directory), "dinov2_golden.safetensors")
  if not os.path.exists(path):
    state = common.strip_prefix(load_file(os.path.join(FIXTURES, "tokenizer.safetensors")),
                                convert_dinov2.VFMTOK_PREFIX)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
  return path


def golden_tokenizer_config(vfm_size: int = 336):
  """configs/tokenizer.py:official with what the golden fixture sets (the reference's sizes,
  its 4 decoder heads on a 16 x 16 grid, the golden VFM's levels and 3 heads)."""
  c = tokenizer_configs.get_config("official")
  c.model.decoder_heads = 4
  c.model.decoder_grid = 16
  c.vfm.levels = (0, 1, 2, 3)
  c.vfm.num_heads = 3
  c.vfm.size = vfm_size
  return c


def tiny_config(directory, *, total_steps=4, **top):
  """16 px images, VFM at 28 px (2x2 patches), 4 region queries, codebook 64 x 8."""
  c = tokenizer_configs.get_config("demo")
  c.vfm.source = golden_vfm_file(directory)
  c.vfm.num_heads = 3
  c.vfm.size = 28
  c.vfm.levels = (0, 1, 2, 3)
  c.model.update(vfm_width=48, dim=32, encoder_depth=1, num_queries=4, encoder_heads=4,
                 encoder_points=2, encoder_ffn_dim=64, encoder_self_attn_heads=2,
                 codebook_size=64, code_dim=8, decoder_depth=1, decoder_heads=2,
                 decoder_mlp_dim=64, decoder_grid=8, decoder_pos_table=2, semantic_dim=48,
                 pixel_ch=32, pixel_ch_mult=(1, 2))
  c.image_size = 16
  c.input.image_size = 16
  c.input.demo_eval_crops = 1
  c.batch_size = 8
  c.eval_batch_size = 8
  c.total_steps = total_steps
  c.optim.warmup_steps = 1
  c.log_every = 1
  c.eval_every = 0
  c.ckpt_every = 2
  c.keep_last = 10
  # The demo's codebook remedies, with a window short enough to restart codes in a few steps.
  c.codebook.update(kmeans_init=True, kmeans_batches=8, restart_window=2)
  for k, v in top.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c
