"""Weight conversion command line.

  python -m vfmtok_jax.convert vfm SRC DST [--num_heads N]
      SRC: anything `load_vfm` reads (HF folder, official DINOv2 .pth/.safetensors, .onnx,
      "default"); DST: a folder with the Orbax params and `vfm.json`, loadable by
      `load_vfm(DST)` and every `--vfm`/`vfm.source` option.
"""

from __future__ import annotations

import argparse
import sys

import jax
import numpy as np


def _convert_vfm(args) -> int:
  from vfmtok_jax.models.vfm import zoo  # pylint: disable=g-import-not-at-top
  kwargs = {"num_heads": args.num_heads} if args.num_heads else {}
  vfm = zoo.load_vfm(args.src, **kwargs)
  zoo.save_vfm(vfm, args.dst)
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(vfm.params))
  print(f"converted {vfm.kind} ({vfm.depth} blocks, width {vfm.width}, {n:,} params) "
        f"from {args.src} -> {args.dst}")
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vfmtok_jax.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="what", required=True)
  vfm = sub.add_parser("vfm", help="convert a frozen VFM to an Orbax checkpoint")
  vfm.add_argument("src")
  vfm.add_argument("dst")
  vfm.add_argument("--num_heads", type=int, default=0,
                   help="heads of an official-layout DINOv2 of a non-published width")
  vfm.set_defaults(run=_convert_vfm)
  args = parser.parse_args(argv)
  return args.run(args)


if __name__ == "__main__":
  sys.exit(main())
