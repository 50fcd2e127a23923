"""LlamaGen's class-conditional GPT (the AR stage of VFMTok), layers under `nn.scan`.

Sequence: `[class token ; image tokens]`. The class token is a row of a (num_classes + 1, dim)
table whose last row is the null class (CFG); in training each label is replaced by the null
class with probability `class_dropout`. Pre-norm blocks: `h = x + wo(attn(rms(x)))`,
`out = h + w2(silu(w1 rms(h)) * w3 rms(h))`, no biases, causal attention with 2D RoPE
(`models/rope.py`) and optional grouped KV heads; final RMSNorm and an untied output head whose
logits are float32. Position s predicts image token s (the class token predicts token 0).

One `__call__` serves teacher forcing (no cache: positions from 0) and KV-cache decoding
(`cache` from `init_cache`, positions from `start`): prefill with the labels alone at start 0,
then one token per call at start i + 1.

Parameter layout: the layer stack is one scanned module `layers` whose params carry a leading
(num_layers,) axis (logical name `layers`), and the KV cache carries the same leading axis, so
neither the training step's nor the decoder's compile time grows with depth. A per-layer cache
(`init_cache(per_layer=True)`) decodes instead on per-layer params (`unstack_layers`) without a
loop: what the sampler does on CPU, where XLA copied the stacked slices at every token.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.models import layers
from vfmtok_jax.models import rope as rope_lib
from vfmtok_jax.ops import matmul as matmul_lib

Dtype = Any
# {"k", "v"}: (num_layers, B, num_kv_heads, max_len, head_dim) in the compute dtype, or a tuple
# of num_layers such dicts without the layer axis (`init_cache(per_layer=True)`); heads before
# positions, so attention reads it as a batched matmul without a transpose.
Cache = dict | tuple


def _batch_sharded(x: jax.Array) -> jax.Array:
  """(B, S, C) activations split over the mesh's batch axes (`act_batch`) under a trainer's
  mesh and logical rules; a no-op without them (the sampler, tests). Without it XLA followed
  the `embed`-sharded weights and all-reduced global-batch activations on every chip."""
  return nn.with_logical_constraint(x, ("act_batch", "act_len", "act_emb"))


def find_multiple(n: int, k: int) -> int:
  return n if n % k == 0 else n + k - n % k


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None
                   ) -> int:
  """LlamaGen's SwiGLU width: int(2 * 4 dim / 3), times the multiplier, rounded up."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return find_multiple(hidden, multiple_of)


_normal = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
  """`x * rsqrt(mean(x^2) + eps)` in float32, cast back to `dtype`, times a weight."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    weight = self.param("scale", layers.logical(nn.initializers.ones, ("embed",)),
                        (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.epsilon))
    return (y.astype(self.dtype) * weight).astype(self.dtype)


def _dense(features, axes, dtype, name):
  return layers.Dense(features, use_bias=False, kernel_axes=axes, kernel_init=_normal,
                      dtype=dtype, name=name)


class Block(nn.Module):
  """One transformer block; the carry of the layer loop is the residual stream.

  Call: `(x, layer_cache, rope, mask, start) -> (x, kv)` with x (B, S, dim), rope
  (S, head_dim / 2, 2), mask the bool causal mask among the S inputs (1, 1, S, S), start the
  position of x's first input, and layer_cache None (teacher forcing; kv None) or this layer's
  {"k", "v"} (B, kv_heads, max_len, head_dim). Two ways to decode with it:
    * `writes_cache` (per-layer caches): the block writes its S new keys and values at `start`
      first, then attends over the cache; kv is the updated cache. Only ever read after its
      update, the cache is updated in place (reading the old cache beside the update made
      XLA:CPU copy it at every token).
    * otherwise (a slice of the stacked cache under the layer scan, read only): the block attends
      over the cached positions < start and its new ones; kv is the new {"k", "v"}
      (B, kv_heads, S, head_dim) for the caller to write after the loop, once.
  """
  dim: int
  num_heads: int
  num_kv_heads: int
  ffn_hidden: int
  norm_eps: float = 1e-5
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  ffn_dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  writes_cache: bool = False

  @nn.compact
  def __call__(self, x, layer_cache, rope, mask, start):
    b, s, _ = x.shape
    x = _batch_sharded(x)
    hd = self.dim // self.num_heads
    groups = self.num_heads // self.num_kv_heads
    h = RMSNorm(self.norm_eps, self.dtype, name="attention_norm")(x)
    q = _dense(self.num_heads * hd, ("embed", "heads_merged"), self.dtype, "wq")(h)
    k = _dense(self.num_kv_heads * hd, ("embed", "kv_merged"), self.dtype, "wk")(h)
    v = _dense(self.num_kv_heads * hd, ("embed", "kv_merged"), self.dtype, "wv")(h)
    q = rope_lib.apply_rope(q.reshape(b, s, self.num_heads, hd), rope)
    k = rope_lib.apply_rope(k.reshape(b, s, self.num_kv_heads, hd), rope).transpose(0, 2, 1, 3)
    v = v.reshape(b, s, self.num_kv_heads, hd).transpose(0, 2, 1, 3)
    kv = {"k": k, "v": v}
    # Segments of keys, values and their keep-mask, attended to under one softmax: two
    # products rather than a concatenation of the old cache and the new keys (a copy per call).
    segments = [(k, v, mask)]
    if layer_cache is not None and self.writes_cache:
      kv = {n: jax.lax.dynamic_update_slice(
          layer_cache[n], kv[n].astype(layer_cache[n].dtype), (0, 0, start, 0)) for n in kv}
      positions = jnp.arange(layer_cache["k"].shape[2])
      segments = [(kv["k"], kv["v"], positions <= start + jnp.arange(s)[:, None])]
    elif layer_cache is not None:
      cached = jnp.arange(layer_cache["k"].shape[2]) < start
      segments.insert(0, (layer_cache["k"], layer_cache["v"], cached))
    # Grouped attention: query head j reads kv head j // groups (torch repeat_interleave).
    qg = q.reshape(b, s, self.num_kv_heads, groups, hd).astype(self.dtype)
    neg = jnp.finfo(jnp.float32).min
    logits = jnp.concatenate([jnp.where(
        keep.reshape((1,) * (5 - keep.ndim) + keep.shape),
        jnp.einsum("bqkgd,bksd->bkgqs", qg, keys.astype(self.dtype),
                   preferred_element_type=jnp.float32) * hd ** -0.5, neg)
                              for keys, _, keep in segments], axis=-1)
    probs = jax.nn.softmax(logits, axis=-1)
    if self.attn_dropout > 0 and not self.deterministic:
      probs = nn.Dropout(self.attn_dropout)(probs, deterministic=False)
    splits = np.cumsum([values.shape[2] for _, values, _ in segments])[:-1]
    out = functools.reduce(jnp.add, (
        jnp.einsum("bkgqs,bksd->bqkgd", p.astype(self.dtype), values.astype(self.dtype),
                   preferred_element_type=jnp.float32)
        for p, (_, values, _) in zip(jnp.split(probs, splits, axis=-1), segments)))
    out = _dense(self.dim, ("heads_merged", "embed"), self.dtype, "wo")(
        out.astype(self.dtype).reshape(b, s, self.num_heads * hd))
    x = x + nn.Dropout(self.resid_dropout)(out, deterministic=self.deterministic)
    h = RMSNorm(self.norm_eps, self.dtype, name="ffn_norm")(x)
    gate = _dense(self.ffn_hidden, ("embed", "mlp"), self.dtype, "w1")(h)
    up = _dense(self.ffn_hidden, ("embed", "mlp"), self.dtype, "w3")(h)
    ffn = _dense(self.dim, ("mlp", "embed"), self.dtype, "w2")(nn.silu(gate) * up)
    x = x + nn.Dropout(self.ffn_dropout)(ffn, deterministic=self.deterministic)
    return _batch_sharded(x), None if layer_cache is None else kv


class GPT(nn.Module):
  """Class-conditional LlamaGen GPT over `block_size` image tokens (a square grid).

  Attributes mirror the reference's `ModelArgs` (see `configs/gpt.py`); `ffn_hidden` is
  `ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)`.
  """
  vocab_size: int
  num_classes: int
  block_size: int
  dim: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  ffn_hidden: int
  rope_base: float = 10000.0
  norm_eps: float = 1e-5
  token_dropout: float = 0.1
  attn_dropout: float = 0.0
  resid_dropout: float = 0.1
  ffn_dropout: float = 0.1
  class_dropout: float = 0.1
  remat: bool = False
  scan_unroll: int = 1      # layers per iteration of the training / teacher-forcing layer loop
                            # (num_layers: no loop); decoding always loops layer by layer
  dtype: Dtype = jnp.float32

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  @property
  def null_class(self) -> int:
    """The unconditional label (the class table's last row)."""
    return self.num_classes

  def check(self) -> None:
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads "
                       f"{self.num_kv_heads}")
    rope_lib.rope_2d_table(self.block_size, self.head_dim)  # square grid, head_dim % 4

  @nn.compact
  def __call__(self, tokens: jax.Array | None, labels: jax.Array | None = None, *,
               cache: Cache | None = None, start: jax.Array | int = 0,
               deterministic: bool = True) -> tuple[jax.Array, Cache | None]:
    """Logits of the next token at every input position.

    Args:
      tokens: (B, n) int image tokens, or None (prefill: the class token alone).
      labels: (B,) int class ids in [0, num_classes] (num_classes = null), or None when the
        sequence continues a cache that already holds the class token.
      cache: None (teacher forcing from position 0) or `init_cache(...)`.
      start: the sequence position of the first input (cache decoding only).
      deterministic: False applies the dropouts and the class dropout (rng 'dropout').

    Returns:
      (logits (B, S, vocab) float32 with S = n (+1 with labels), the updated cache or None).
    """
    self.check()
    embed = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype,
                     embedding_init=layers.logical(_normal, ("vocab", "embed")),
                     name="tok_embeddings")
    parts = []
    if labels is not None:
      if not deterministic and self.class_dropout > 0:
        drop = jax.random.bernoulli(self.make_rng("dropout"), self.class_dropout,
                                    labels.shape)
        labels = jnp.where(drop, self.null_class, labels)
      table = nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype,
                       embedding_init=layers.logical(_normal, ("classes", "embed")),
                       name="cls_embedding")
      parts.append(table(labels)[:, None])
    if tokens is not None:
      parts.append(embed(tokens))
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
    x = nn.Dropout(self.token_dropout)(x, deterministic=deterministic)
    b, s, _ = x.shape

    full_table = jnp.asarray(rope_lib.rope_2d_table(self.block_size, self.head_dim,
                                                    base=self.rope_base))
    rope = full_table[:s] if cache is None else jax.lax.dynamic_slice_in_dim(full_table, start, s)
    mask = layers.causal_mask(s)

    block_args = (self.dim, self.num_heads, self.num_kv_heads, self.ffn_hidden, self.norm_eps,
                  self.attn_dropout, self.resid_dropout, self.ffn_dropout, deterministic,
                  self.dtype)
    block = nn.remat(Block, prevent_cse=False) if self.remat and cache is None else Block
    if isinstance(cache, (list, tuple)):
      # Per-layer weights (`unstack_layers`) and caches, no loop: XLA:CPU copies a layer's slice
      # of a stacked array at every layer and token (decode profile, README).
      new_cache = []
      for i, layer_cache in enumerate(cache):
        x, layer_cache = block(*block_args, writes_cache=True, name=f"layers_{i}")(
            x, layer_cache, rope, mask, start)
        new_cache.append(layer_cache)
      new_cache = tuple(new_cache)
    else:
      # Decoding loops over the layers one at a time whatever `scan_unroll` says. Each layer
      # reads its slice of the stacked cache; the S new keys and values of all layers come out
      # of the scan stacked, and are written into the cache once, after it (in place when the
      # cache is a loop carry or donated).
      unroll = self.scan_unroll if cache is None else 1
      stack = nn.scan(block, variable_axes={"params": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
                      length=self.num_layers, unroll=unroll,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_kv = stack(*block_args, name="layers")(x, cache, rope, mask, start)
      new_cache = None
      if cache is not None:
        new_cache = {n: jax.lax.dynamic_update_slice(
            cache[n], new_kv[n].astype(cache[n].dtype), (0, 0, 0, start, 0))
                     for n in ("k", "v")}
    x = RMSNorm(self.norm_eps, self.dtype, name="norm")(x)
    head = self.param("output", layers.logical(nn.initializers.zeros, ("embed", "vocab")),
                      (self.dim, self.vocab_size), jnp.float32)
    # (B, S, dim) x (dim, vocab): `ops.matmul`'s weight gradient avoids XLA:CPU's transposed
    # copy of the (B S, vocab) logits gradient.
    logits = matmul_lib.matmul(x.astype(self.dtype), head.astype(self.dtype))
    return _batch_sharded(logits), new_cache


def init_cache(model: GPT, batch: int, max_len: int | None = None, *,
               per_layer: bool = False) -> Cache:
  """Zero KV cache for `batch` rows and `max_len` positions (default 1 + block_size): stacked
  {"k", "v"} (num_layers, batch, kv_heads, max_len, head_dim), or with `per_layer` a tuple of
  num_layers such dicts without the layer axis (decoding with `unstack_layers` params)."""
  max_len = model.block_size + 1 if max_len is None else max_len
  shape = (batch, model.num_kv_heads, max_len, model.head_dim)
  if per_layer:
    return tuple({n: jnp.zeros(shape, model.dtype) for n in ("k", "v")}
                 for _ in range(model.num_layers))
  return {n: jnp.zeros((model.num_layers,) + shape, model.dtype) for n in ("k", "v")}


def unstack_layers(params):
  """Params with the scanned `layers` (leading num_layers axis) split into `layers_0`,
  `layers_1`, ...: the layout a per-layer cache (`init_cache(per_layer=True)`) decodes with."""
  params = dict(params)
  stacked = params.pop("layers")
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    params[f"layers_{i}"] = jax.tree.map(lambda w, i=i: w[i], stacked)
  return params


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
