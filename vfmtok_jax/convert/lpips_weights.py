"""Merges torchvision VGG16 weights and LPIPS lin layers into the one file `load_lpips` reads.

Run offline, once, where the two source files exist:

  python -m vfmtok_jax.convert.lpips_weights --vgg vgg16-397923af.pth --lin vgg.pth \
      --out ~/.cache/vfmtok_jax/lpips_vgg16.safetensors

`--vgg`: torchvision `vgg16(weights="IMAGENET1K_V1")` state dict (full model or `.features`);
`--lin`: taming's `vgg.pth` or the `lpips` package's `weights/v0.1/vgg.pth` (a full `lpips.LPIPS`
state dict with `net.slice*` keys works for both arguments). The output holds the canonical
`features.N.weight/bias` and `linK.model.1.weight` keys, checked against the model before writing.
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np

from vfmtok_jax.convert import common


def merge_state(vgg: dict[str, np.ndarray], lin: dict[str, np.ndarray], *,
                source: str) -> dict[str, np.ndarray]:
  """Canonical LPIPS state: the VGG conv tensors of `vgg` plus the lin tensors of `lin`."""
  from vfmtok_jax.losses import lpips  # pylint: disable=g-import-not-at-top
  vgg_c = lpips.canonical_state(vgg, source=source)
  lin_c = lpips.canonical_state(lin, source=source)
  wanted = set(k for k, _ in lpips.lpips_mapping().values())
  out = {k: v for k, v in vgg_c.items() if k.startswith("features.") and k in wanted}
  out.update({k: v for k, v in lin_c.items() if re.fullmatch(r"lin\d\.model\.1\.weight", k)})
  lpips.from_state(out, source=source)  # raises WeightLoadError listing what is wrong
  return {k: np.ascontiguousarray(v, np.float32) for k, v in sorted(out.items())}


def merge_files(vgg_path: str, lin_path: str, out_path: str) -> str:
  """Reads both files, checks the result, writes a safetensors file; returns `out_path`."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  state = merge_state(common.read_state_dict(vgg_path), common.read_state_dict(lin_path),
                      source=f"{vgg_path} + {lin_path}")
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  save_file(state, out_path)
  return out_path


def main(argv=None) -> None:
  from vfmtok_jax.losses import lpips  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vgg", required=True, help="torchvision VGG16 state dict (.pth/.safetensors)")
  p.add_argument("--lin", required=True, help="LPIPS lin weights (taming/lpips vgg.pth)")
  p.add_argument("--out", default=lpips.default_path(), help="output .safetensors")
  args = p.parse_args(argv)
  print(merge_files(args.vgg, args.lin, os.path.expanduser(args.out)))


if __name__ == "__main__":
  main()
