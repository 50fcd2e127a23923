"""LlamaGen/VFMTok GPT state dicts: size inference and the key map onto `models.gpt.GPT`.

Reference keys (`autoregressive/models/gpt.py`, `Transformer.state_dict()`):
  tok_embeddings.weight (V, D), cls_embedding.embedding_table.weight (C + 1, D),
  layers.{i}.attention.wqkv.weight ((H + 2 Hkv) hd, D)  [q | k | v rows],
  layers.{i}.attention.wo.weight (D, H hd), layers.{i}.feed_forward.w{1,3}.weight (F, D),
  layers.{i}.feed_forward.w2.weight (D, F), layers.{i}.{attention,ffn}_norm.weight (D,),
  norm.weight (D,), output.weight (V, D).
KV-cache buffers (`layers.{i}.attention.kv_cache.*`, present when a model was saved after
`setup_caches`) are state, not weights, and are dropped by name. Our layers are stacked on a
leading axis (the scanned `layers` module), so each of our kernels combines the L per-layer
tensors.
"""

from __future__ import annotations

import re
from typing import Mapping

import numpy as np

from vfmtok_jax.weights import trees
from vfmtok_jax.weights.files import WeightLoadError

CACHE_KEY = re.compile(r"^layers\.\d+\.attention\.kv_cache\.(k_cache|v_cache)$")
WRAPPER_PREFIXES = ("_orig_mod.", "module.")


def strip_wrappers(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Removes torch.compile (`_orig_mod.`) and DDP (`module.`) key prefixes."""
  out = {}
  for key, value in state.items():
    for prefix in WRAPPER_PREFIXES:
      if key.startswith(prefix):
        key = key[len(prefix):]
    out[key] = value
  return out


def dropped_keys(state: Mapping[str, np.ndarray]) -> list[str]:
  return sorted(k for k in state if CACHE_KEY.match(k))


def infer_config(state: Mapping[str, np.ndarray], *, num_heads: int,
                 source: str = "GPT state dict") -> dict:
  """`GPT` sizes the tensors determine: vocab, classes, dim, layers, kv heads, FFN width.

  `num_heads` is not recorded by the tensors (the fused qkv only gives H + 2 Hkv); head_dim =
  dim / num_heads, and the kv head count follows from the qkv rows.
  """
  need = ["tok_embeddings.weight", "cls_embedding.embedding_table.weight",
          "layers.0.attention.wqkv.weight", "layers.0.feed_forward.w1.weight", "output.weight"]
  missing = [f"{k} (needed to infer the GPT's sizes)" for k in need if k not in state]
  if missing:
    raise WeightLoadError(source, missing=missing)
  vocab, dim = (int(s) for s in state["tok_embeddings.weight"].shape)
  layers = len({int(m.group(1)) for k in state if (m := re.match(r"^layers\.(\d+)\.", k))})
  if dim % num_heads:
    raise WeightLoadError(source, other=[f"dim {dim} is not divisible by num_heads "
                                         f"{num_heads}; set --config.model.num_heads"])
  head_dim = dim // num_heads
  qkv_rows = int(state["layers.0.attention.wqkv.weight"].shape[0])
  kv_rows = qkv_rows - dim
  if kv_rows <= 0 or kv_rows % (2 * head_dim):
    raise WeightLoadError(source, other=[
        f"layers.0.attention.wqkv.weight has {qkv_rows} rows, which is not dim + 2 x "
        f"kv_heads x head_dim for dim {dim}, num_heads {num_heads} (head_dim {head_dim}); "
        "is num_heads right?"])
  classes = int(state["cls_embedding.embedding_table.weight"].shape[0]) - 1
  return dict(vocab_size=vocab, dim=dim, num_layers=layers, num_heads=num_heads,
              num_kv_heads=kv_rows // (2 * head_dim), num_classes=classes,
              ffn_hidden=int(state["layers.0.feed_forward.w1.weight"].shape[0]))


def _stack(fn):
  def combine(*per_layer):
    return np.stack([fn(x) for x in per_layer])
  return combine


def _qkv_part(part: str, dim: int, kv_dim: int):
  bounds = {"q": (0, dim), "k": (dim, dim + kv_dim), "v": (dim + kv_dim, dim + 2 * kv_dim)}
  lo, hi = bounds[part]

  def fn(wqkv):
    if wqkv.shape[0] != dim + 2 * kv_dim:
      raise ValueError(f"wqkv has {wqkv.shape[0]} rows, expected {dim + 2 * kv_dim}")
    return trees.linear(wqkv[lo:hi])
  return fn


def mapping(*, num_layers: int, dim: int, num_heads: int, num_kv_heads: int) -> dict:
  """Flax path -> (reference keys, combine) for every GPT param."""
  kv_dim = num_kv_heads * (dim // num_heads)
  per = lambda name: tuple(f"layers.{i}.{name}" for i in range(num_layers))  # noqa: E731
  m = {
      "tok_embeddings/embedding": ("tok_embeddings.weight", trees.identity),
      "cls_embedding/embedding": ("cls_embedding.embedding_table.weight", trees.identity),
      "norm/scale": ("norm.weight", trees.identity),
      "output": ("output.weight", trees.linear),
      "layers/attention_norm/scale": (per("attention_norm.weight"), _stack(trees.identity)),
      "layers/ffn_norm/scale": (per("ffn_norm.weight"), _stack(trees.identity)),
      "layers/wo/kernel": (per("attention.wo.weight"), _stack(trees.linear)),
      "layers/w1/kernel": (per("feed_forward.w1.weight"), _stack(trees.linear)),
      "layers/w2/kernel": (per("feed_forward.w2.weight"), _stack(trees.linear)),
      "layers/w3/kernel": (per("feed_forward.w3.weight"), _stack(trees.linear)),
  }
  for part in "qkv":
    # Each of q, k, v reads the same L fused tensors.
    m[f"layers/w{part}/kernel"] = (per("attention.wqkv.weight"),
                                   _stack(_qkv_part(part, dim, kv_dim)))
  return m


def to_reference(params) -> dict[str, np.ndarray]:
  """Our GPT params -> the reference's state dict (for export and round-trip tests)."""
  p = {k: np.asarray(v) for k, v in trees.flatten(params).items()}
  out = {"tok_embeddings.weight": p["tok_embeddings/embedding"],
         "cls_embedding.embedding_table.weight": p["cls_embedding/embedding"],
         "norm.weight": p["norm/scale"], "output.weight": p["output"].T}
  for i in range(p["layers/wq/kernel"].shape[0]):
    qkv = np.concatenate([p[f"layers/w{c}/kernel"][i] for c in "qkv"], axis=1)
    out[f"layers.{i}.attention.wqkv.weight"] = qkv.T
    out[f"layers.{i}.attention.wo.weight"] = p["layers/wo/kernel"][i].T
    for w in ("w1", "w2", "w3"):
      out[f"layers.{i}.feed_forward.{w}.weight"] = p[f"layers/{w}/kernel"][i].T
    out[f"layers.{i}.attention_norm.weight"] = p["layers/attention_norm/scale"][i]
    out[f"layers.{i}.ffn_norm.weight"] = p["layers/ffn_norm/scale"][i]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}
