r"""Encode images to VFMTok codes and decode codes back to pixels.

  python -m vfmtok_jax.tokenize encode --ckpt DIR --input X [X ...] --output codes.npz
  python -m vfmtok_jax.tokenize decode --ckpt DIR --input codes.npz --output Y

DIR is a tokenizer folder (`python -m vfmtok_jax.convert tokenizer ...` or a training export).
Encode inputs X: image files or folders of them (centre-cropped to the tokenizer's image size
with the reference's eval transform), or one `.npy`/`.npz` array of float images in [-1, 1],
NHWC or NCHW (detected from which axis has 3 channels; `--layout` settles an ambiguous shape).
codes.npz holds `indices` (B, n) int32 and `names`. Decode output Y: a `.npy`/`.npz` file (NHWC
float32 in [-1, 1]) or a folder, which receives one PNG per code sequence.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import images as image_io


def load_array(path: str, layout: str = "auto") -> np.ndarray:
  """(B, H, W, 3) float32 in [-1, 1] from a .npy/.npz file (see module docstring)."""
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        keys = ["images"] if "images" in f.files else f.files
        if len(keys) != 1:
          raise ValueError(f"{path}: expected an 'images' array or a single array, "
                           f"found {f.files}")
        arr = f[keys[0]]
    else:
      arr = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"cannot read array file {path}: {e}") from e
  if arr.ndim != 4:
    raise ValueError(f"{path}: expected a (B, H, W, 3) or (B, 3, H, W) array, got {arr.shape}")
  if not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"{path}: expected float images in [-1, 1], got dtype {arr.dtype}")
  if layout == "auto":
    nhwc, nchw = arr.shape[-1] == 3, arr.shape[1] == 3
    if nhwc and nchw:
      raise ValueError(f"{path}: shape {arr.shape} is ambiguous; pass --layout nhwc or nchw")
    if not (nhwc or nchw):
      raise ValueError(f"{path}: no axis of size 3 (RGB) in shape {arr.shape}")
    layout = "nhwc" if nhwc else "nchw"
  if layout == "nchw":
    arr = arr.transpose(0, 2, 3, 1)
  if arr.shape[-1] != 3:
    raise ValueError(f"{path}: {layout.upper()} layout needs 3 channels, got shape {arr.shape}")
  lo, hi = float(arr.min()), float(arr.max())
  if lo < -1.01 or hi > 1.01:
    raise ValueError(f"{path}: values lie in [{lo:.3g}, {hi:.3g}], expected [-1, 1]")
  return arr.astype(np.float32)


def load_inputs(inputs, image_size: int, layout: str) -> tuple[np.ndarray, list[str]]:
  if len(inputs) == 1 and inputs[0].endswith((".npy", ".npz")):
    arr = load_array(inputs[0], layout)
    return arr, [f"{i:05d}" for i in range(len(arr))]
  paths = image_io.list_images(inputs)
  arr = np.stack([image_io.to_signed(image_io.center_crop_arr(image_io.read_image(p), image_size))
                  for p in paths])
  return arr, [os.path.splitext(os.path.basename(p))[0] for p in paths]


def encode(args) -> None:
  tok = tokenizer_io.load_tokenizer(args.ckpt, vfm_source=args.vfm or None)
  arr, names = load_inputs(args.input, tok.model.image_size, args.layout)
  chunks = []
  for start in range(0, len(arr), args.batch_size):
    chunks.append(np.asarray(tok.encode(arr[start:start + args.batch_size])))
    print(f"encoded {min(start + args.batch_size, len(arr))}/{len(arr)}", flush=True)
  indices = np.concatenate(chunks).astype(np.int32)
  np.savez(args.output, indices=indices, names=np.asarray(names),
           codebook_size=tok.model.codebook_size, image_size=tok.model.image_size)
  print(f"wrote {indices.shape} codes to {args.output}")


def load_codes(path: str) -> tuple[np.ndarray, list[str]]:
  try:
    if path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as f:
        if "indices" not in f.files:
          raise ValueError(f"{path} has no 'indices' array (found {f.files})")
        indices = f["indices"]
        names = [str(n) for n in f["names"]] if "names" in f.files else None
    else:
      indices, names = np.load(path, allow_pickle=False), None
  except OSError as e:
    raise ValueError(f"cannot read codes file {path}: {e}") from e
  if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
    raise ValueError(f"{path}: expected integer indices (B, n), got {indices.dtype} "
                     f"{indices.shape}")
  return indices, names or [f"{i:05d}" for i in range(len(indices))]


def decode(args) -> None:
  tok = tokenizer_io.load_tokenizer(args.ckpt, vfm_source=args.vfm or None)
  indices, names = load_codes(args.input[0])
  outs = []
  for start in range(0, len(indices), args.batch_size):
    outs.append(np.asarray(tok.decode_indices(indices[start:start + args.batch_size])))
    print(f"decoded {min(start + args.batch_size, len(indices))}/{len(indices)}", flush=True)
  recon = np.concatenate(outs)
  if args.output.endswith(".npy"):
    np.save(args.output, recon)
  elif args.output.endswith(".npz"):
    np.savez(args.output, images=recon, names=np.asarray(names))
  else:
    os.makedirs(args.output, exist_ok=True)
    for name, img in zip(names, image_io.to_uint8(recon)):
      image_io.save_png(os.path.join(args.output, f"{name}.png"), img)
  print(f"wrote {recon.shape[0]} images ({recon.shape[1]}x{recon.shape[2]}) to {args.output}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m vfmtok_jax.tokenize", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=("encode", "decode"))
  parser.add_argument("--ckpt", required=True, help="tokenizer folder")
  parser.add_argument("--input", required=True, nargs="+")
  parser.add_argument("--output", required=True)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--layout", choices=("auto", "nhwc", "nchw"), default="auto")
  parser.add_argument("--vfm", default="", help="override the VFM source stored in the folder")
  args = parser.parse_args(argv)
  try:
    (encode if args.command == "encode" else decode)(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
