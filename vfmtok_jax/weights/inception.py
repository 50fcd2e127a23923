"""pytorch-fid's FID InceptionV3 state dict (`pt_inception-2015-12-05-*.pth`) -> Flax params.

torchvision names: `<block>.<conv>.conv.weight` (OIHW) and `<block>.<conv>.bn.{weight, bias,
running_mean, running_var}` for every conv of `models/inception.py`, `fc.weight` (1008, 2048)
for the logits. `fc.bias` (ADM's Inception Score leaves it out) and the batch norms'
`num_batches_tracked` counters are known and dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vfmtok_jax.weights import trees

_BN = {"bn_scale": "weight", "bn_bias": "bias", "bn_mean": "running_mean",
       "bn_var": "running_var"}


def inception_mapping(expected: Mapping) -> dict:
  """Flax path -> (torch key, transform), derived from the model's param paths."""
  m = {}
  for path in trees.flatten(expected):
    if path == "logits_kernel":
      m[path] = ("fc.weight", trees.linear)
      continue
    module, leaf = path.rsplit("/", 1)
    if leaf == "kernel":  # <module>/conv/kernel
      m[path] = (module.replace("/", ".") + ".weight", trees.conv)
    else:
      m[path] = (module.replace("/", ".") + ".bn." + _BN[leaf], trees.identity)
  return m


def ignored_keys(state: Mapping[str, np.ndarray]) -> list[str]:
  """Source keys that exist in the released file but have no place in the model."""
  return [k for k in state if k == "fc.bias" or re.search(r"\.num_batches_tracked$", k)]
