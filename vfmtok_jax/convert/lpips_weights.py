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

from safetensors.numpy import save_file

from vfmtok_jax.losses import lpips
from vfmtok_jax.weights import files
from vfmtok_jax.weights import lpips as lpips_keys


def merge_files(vgg_path: str, lin_path: str, out_path: str) -> str:
  """Reads both files, checks the result, writes a safetensors file; returns `out_path`.

  Raises:
    WeightLoadError: the merged tensors do not make LPIPS params (lists every problem).
  """
  source = f"{vgg_path} + {lin_path}"
  state = lpips_keys.merge_state(files.read_state_dict(vgg_path),
                                 files.read_state_dict(lin_path), source=source)
  lpips.from_state(state, source=source)  # raises WeightLoadError listing what is wrong
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  save_file(state, out_path)
  return out_path


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vgg", required=True, help="torchvision VGG16 state dict (.pth/.safetensors)")
  p.add_argument("--lin", required=True, help="LPIPS lin weights (taming/lpips vgg.pth)")
  p.add_argument("--out", default=lpips.default_path(), help="output .safetensors")
  args = p.parse_args(argv)
  print(merge_files(args.vgg, args.lin, os.path.expanduser(args.out)))


if __name__ == "__main__":
  main()
