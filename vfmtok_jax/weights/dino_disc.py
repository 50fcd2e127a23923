"""Key maps of the DINO discriminator: the official DINO ViT backbone and PyTorch DinoDisc heads.

Backbone: the official DINO `dino_deitsmall16_pretrain.pth` layout (timm ViT: `cls_token`,
`pos_embed`, `patch_embed.proj.*`, `blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1|fc2}`,
plus `norm.*` / `head.*`, which the discriminator does not use). Heads: the PyTorch DinoDisc
`heads.*` tensors, including the spectral-norm power-iteration vectors. The loaders that build
`models.dino_disc.DinoDisc` and assemble these are in `vfmtok_jax.losses.gan`.
"""

from __future__ import annotations

import re
from typing import Iterable

import numpy as np

from vfmtok_jax.weights import trees

_UNUSED_BACKBONE_KEY = re.compile(r"(norm|head)\.")


def zero_k_bias(b: np.ndarray) -> np.ndarray:
  """qkv bias (3C,) with the k third zeroed (softmax-invariant; the reference does this)."""
  b = np.array(b, np.float32, copy=True)
  c = b.shape[0] // 3
  b[c:2 * c] = 0.0
  return b


def backbone_mapping(*, depth: int) -> dict:
  """Flax path (under `params['backbone']`) -> (official DINO key, transform)."""
  m = {
      "patch_embed/kernel": ("patch_embed.proj.weight", trees.conv),
      "patch_embed/bias": ("patch_embed.proj.bias", trees.identity),
      "cls_token": ("cls_token", trees.identity),
      "pos_embed": ("pos_embed", trees.identity),
  }
  for i in range(depth):
    src, dst = f"blocks.{i}", f"blocks_{i}"
    m.update(trees.nest(f"{dst}/norm1", trees.ln_entries(f"{src}.norm1")))
    m.update(trees.nest(f"{dst}/norm2", trees.ln_entries(f"{src}.norm2")))
    m[f"{dst}/attn/qkv/kernel"] = (f"{src}.attn.qkv.weight", trees.linear)
    m[f"{dst}/attn/qkv/bias"] = (f"{src}.attn.qkv.bias", zero_k_bias)
    m.update(trees.nest(f"{dst}/attn/proj", trees.dense_entries(f"{src}.attn.proj")))
    m.update(trees.nest(f"{dst}/mlp/fc1", trees.dense_entries(f"{src}.mlp.fc1")))
    m.update(trees.nest(f"{dst}/mlp/fc2", trees.dense_entries(f"{src}.mlp.fc2")))
  return m


def unused_backbone_keys(keys: Iterable[str]) -> list[str]:
  """The keys of an official DINO checkpoint the discriminator drops: `norm.*`, `head.*`."""
  return [k for k in keys if _UNUSED_BACKBONE_KEY.match(k)]


def _torch_conv1d(w: np.ndarray) -> np.ndarray:
  """PyTorch Conv1d weight (out, in, k) -> Flax kernel (k, in, out)."""
  return np.ascontiguousarray(np.asarray(w).transpose(2, 1, 0))


def heads_mapping(*, num_maps: int, prefix: str = "heads.") -> dict:
  """Path in {'params': heads, 'spectral': heads state} -> PyTorch DinoDisc key.

  PyTorch head i: `heads.i.0.0` SNConv1d(k=1), `heads.i.0.1` BNLocal, `heads.i.1.fn.0` SNConv1d(k),
  `heads.i.1.fn.1` BNLocal, `heads.i.2` SNConv1d(C -> 1); spectral-norm tensors `weight_orig`,
  `weight_u`, `weight_v`, plus `bias`. `num_maps` is the number of heads (1 + len(key_depths)).
  """
  m = {}
  for i in range(num_maps):
    for name, src in (("block", f"{prefix}{i}.0"), ("res", f"{prefix}{i}.1.fn"), ("cls", None)):
      conv = f"{src}.0" if src else f"{prefix}{i}.2"
      conv_name = f"head_{i}/{name}_conv" if src else f"head_{i}/cls"
      m[f"params/{conv_name}/kernel"] = (f"{conv}.weight_orig", _torch_conv1d)
      m[f"params/{conv_name}/bias"] = (f"{conv}.bias", trees.identity)
      m[f"spectral/{conv_name}/u"] = (f"{conv}.weight_u", trees.identity)
      m[f"spectral/{conv_name}/v"] = (f"{conv}.weight_v", trees.identity)
      if src:
        m[f"params/head_{i}/{name}_norm/scale"] = (f"{src}.1.weight", trees.identity)
        m[f"params/head_{i}/{name}_norm/bias"] = (f"{src}.1.bias", trees.identity)
  return m
