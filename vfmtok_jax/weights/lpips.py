"""LPIPS-VGG16 weight layouts: renaming to one canonical layout, and its key map.

Accepted sources: the VGG16 convs in torchvision layout `features.N.weight/bias` (N in
VGG16_STAGES), as a bare `vgg16().features` state dict (`N.weight/bias`), or in the taming /
`lpips`-package layout `net.sliceK.N.weight/bias` (same N); the LPIPS lin layers
`linK.model.1.weight` (taming's `vgg.pth`, the `lpips` package's `weights/v0.1/vgg.pth`;
`linK.model.0.weight`, the no-dropout naming, is accepted too). `scaling_layer.shift/scale`
buffers and torchvision's `classifier.*` are dropped.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vfmtok_jax.weights import trees
from vfmtok_jax.weights.files import WeightLoadError

# torchvision `vgg16().features` conv indices per LPIPS tap (a 2x2 max-pool precedes taps 1-4).
VGG16_STAGES = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))
NUM_TAPS = len(VGG16_STAGES)

_IGNORED = re.compile(r"^(scaling_layer\.(shift|scale)|classifier\..*)$")
_LIN_KEY = re.compile(r"lin\d\.model\.1\.weight")


def canonical_state(state: Mapping[str, np.ndarray], *, source: str) -> dict[str, np.ndarray]:
  """Renames accepted layouts to `features.N.{weight,bias}` + `linK.model.1.weight`.

  Accepts `features.N.*`, bare `N.*` (a saved `vgg16().features`), `net.sliceK.N.*`
  (taming / lpips), `linK.model.{0,1}.weight`; drops `scaling_layer.*` and `classifier.*`.
  Unknown keys are kept under their own names (`trees.assemble` then reports them).

  Raises:
    WeightLoadError: two source keys map to the same canonical name.
  """
  out: dict[str, np.ndarray] = {}
  dupes = []
  for key, value in state.items():
    if _IGNORED.match(key):
      continue
    name = key
    if m := re.fullmatch(r"(?:net\.slice\d+\.|features\.)?(\d+)\.(weight|bias)", key):
      name = f"features.{m.group(1)}.{m.group(2)}"
    elif m := re.fullmatch(r"lin(\d)\.model\.[01]\.weight", key):
      name = f"lin{m.group(1)}.model.1.weight"
    if name in out:
      dupes.append(f"{key} duplicates {name}")
    out[name] = value
  if dupes:
    raise WeightLoadError(source, other=dupes)
  return out


def lpips_mapping() -> dict:
  """Flax path of `losses.lpips.LPIPS` -> (canonical key, transform)."""
  m = {}
  for stage in VGG16_STAGES:
    for idx in stage:
      m[f"features_{idx}/kernel"] = (f"features.{idx}.weight", trees.conv)
      m[f"features_{idx}/bias"] = (f"features.{idx}.bias", trees.identity)
  for k in range(NUM_TAPS):
    m[f"lin{k}/kernel"] = (f"lin{k}.model.1.weight", trees.conv)
  return m


def merge_state(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray], *,
                source: str) -> dict[str, np.ndarray]:
  """Canonical LPIPS state: the mapped VGG conv tensors of `vgg` plus the lin tensors of `lin`.

  Only renames and selects (sorted keys, contiguous float32); shapes are checked by whoever
  assembles the result into LPIPS params (`losses.lpips.from_state`).
  """
  vgg_c = canonical_state(vgg, source=source)
  lin_c = canonical_state(lin, source=source)
  wanted = set(k for k, _ in lpips_mapping().values())
  out = {k: v for k, v in vgg_c.items() if k.startswith("features.") and k in wanted}
  out.update({k: v for k, v in lin_c.items() if _LIN_KEY.fullmatch(k)})
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(out.items())}
