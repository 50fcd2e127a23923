"""A test-only PyTorch oracle of LlamaGen's c2i GPT and its `generate()` (spec section 7); also
the PyTorch side of `benchmarks/sampling.py` (train step and sampling, side by side).

Written from the spec's description of `autoregressive/models/gpt.py` / `generate.py`, in the
reference's own formulation (fused wqkv, `repeat_interleave` for grouped KV heads, complex-style
interleaved 2D RoPE with zero class rows, a per-layer KV cache indexed by `input_pos`, CFG on
raw logits with the conditional half first), so that the JAX port can be checked at configs and
seeds the golden files do not cover. The cache is sized with the KV head count (the reference
sizes it with `n_head`, which crashes for grouped heads: golden README, quirk 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


def find_multiple(n, k):
  return n if n % k == 0 else n + k - n % k


def freqs_cis_2d(grid, n_elem, base=10000, cls_token_num=1):
  half = n_elem // 2
  freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
  f = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)
  grid_f = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)],
                     dim=-1)
  cache = torch.stack([torch.cos(grid_f), torch.sin(grid_f)], dim=-1).flatten(0, 1)
  return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


def apply_rotary(x, fc):
  xs = x.float().reshape(*x.shape[:-1], -1, 2)
  fc = fc.view(1, xs.size(1), 1, xs.size(3), 2)
  out = torch.stack([xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
                     xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1]], dim=-1)
  return out.flatten(3).type_as(x)


class RMSNorm(nn.Module):

  def __init__(self, dim, eps):
    super().__init__()
    self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

  def forward(self, x):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
    return y.type_as(x) * self.weight


class Attention(nn.Module):

  def __init__(self, dim, n_head, n_kv_head, resid_dropout=0.0):
    super().__init__()
    self.resid_dropout = nn.Dropout(resid_dropout)
    self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, dim // n_head
    self.wqkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=False)
    self.wo = nn.Linear(dim, dim, bias=False)
    self.k_cache = self.v_cache = None

  def forward(self, x, fc, input_pos=None, mask=None):
    b, s, d = x.shape
    kv = self.n_kv_head * self.head_dim
    q, k, v = self.wqkv(x).split([d, kv, kv], dim=-1)
    q = apply_rotary(q.view(b, s, self.n_head, self.head_dim), fc).transpose(1, 2)
    k = apply_rotary(k.view(b, s, self.n_kv_head, self.head_dim), fc).transpose(1, 2)
    v = v.view(b, s, self.n_kv_head, self.head_dim).transpose(1, 2)
    if self.k_cache is not None:
      self.k_cache[:, :, input_pos] = k
      self.v_cache[:, :, input_pos] = v
      k, v = self.k_cache, self.v_cache
    rep = self.n_head // self.n_kv_head
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return self.resid_dropout(self.wo(out.transpose(1, 2).contiguous().view(b, s, d)))


class Block(nn.Module):

  def __init__(self, dim, n_head, n_kv_head, hidden, eps, resid_dropout=0.0, ffn_dropout=0.0):
    super().__init__()
    self.attention = Attention(dim, n_head, n_kv_head, resid_dropout)
    self.ffn_dropout = nn.Dropout(ffn_dropout)
    self.feed_forward = nn.Module()
    self.feed_forward.w1 = nn.Linear(dim, hidden, bias=False)
    self.feed_forward.w2 = nn.Linear(hidden, dim, bias=False)
    self.feed_forward.w3 = nn.Linear(dim, hidden, bias=False)
    self.attention_norm, self.ffn_norm = RMSNorm(dim, eps), RMSNorm(dim, eps)

  def forward(self, x, fc, input_pos=None, mask=None):
    h = x + self.attention(self.attention_norm(x), fc, input_pos, mask)
    ff, y = self.feed_forward, self.ffn_norm(h)
    return h + self.ffn_dropout(ff.w2(F.silu(ff.w1(y)) * ff.w3(y)))


class GPT(nn.Module):

  def __init__(self, *, dim, n_layer, n_head, n_kv_head, vocab_size, block_size, num_classes,
               multiple_of=256, ffn_dim_multiplier=None, eps=1e-5, token_dropout=0.0,
               resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0):
    super().__init__()
    self.class_dropout, self.tok_dropout = class_dropout, nn.Dropout(token_dropout)
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
      hidden = int(ffn_dim_multiplier * hidden)
    hidden = find_multiple(hidden, multiple_of)
    self.num_classes, self.block_size, self.n_head = num_classes, block_size, n_head
    self.n_kv_head, self.dim = n_kv_head, dim
    self.cls_embedding = nn.Module()
    self.cls_embedding.embedding_table = nn.Embedding(num_classes + 1, dim)
    self.tok_embeddings = nn.Embedding(vocab_size, dim)
    self.layers = nn.ModuleList(Block(dim, n_head, n_kv_head, hidden, eps, resid_dropout,
                                      ffn_dropout) for _ in range(n_layer))
    self.norm = RMSNorm(dim, eps)
    self.output = nn.Linear(dim, vocab_size, bias=False)
    self.freqs_cis = freqs_cis_2d(math.isqrt(block_size), dim // n_head)

  def setup_caches(self, batch, max_seq):
    for layer in self.layers:
      shape = (batch, self.n_kv_head, max_seq, self.dim // self.n_head)
      layer.attention.k_cache, layer.attention.v_cache = torch.zeros(shape), torch.zeros(shape)
    self.causal_mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool))

  def drop_caches(self):
    """Back to teacher forcing (a forward without `input_pos` must not write a cache)."""
    for layer in self.layers:
      layer.attention.k_cache = layer.attention.v_cache = None

  def forward(self, idx, cond_idx, input_pos=None):
    """Teacher forcing (input_pos None: [cls ; tok(idx)]) or one cache step.

    In train mode the reference's dropouts apply: each label becomes the null class with
    probability `class_dropout`, then token dropout on the embeddings, residual dropout after
    `wo` and FFN dropout after `w2` (all 0 by default, so the oracle is deterministic)."""
    parts = []
    if cond_idx is not None:
      if self.training and self.class_dropout > 0:
        drop = torch.rand(cond_idx.shape[0]) < self.class_dropout
        cond_idx = torch.where(drop, self.num_classes, cond_idx)
      parts.append(self.cls_embedding.embedding_table(cond_idx)[:, None])
    if idx is not None:
      parts.append(self.tok_embeddings(idx))
    h = self.tok_dropout(torch.cat(parts, dim=1))
    if input_pos is None:
      fc, mask, pos = self.freqs_cis[:h.shape[1]], None, None
    else:
      fc, pos = self.freqs_cis[input_pos], input_pos
      mask = self.causal_mask[None, None, input_pos]
    for layer in self.layers:
      h = layer(h, fc, pos, mask)
    return self.output(self.norm(h)).float()


def sample(logits, temperature=1.0, top_k=0, top_p=1.0):
  """The reference's `sample` with HF `top_k_top_p_filtering`; returns (token (B, 1), logits)."""
  logits = logits / max(temperature, 1e-5)
  if top_k > 0:
    kth = torch.topk(logits, min(top_k, logits.size(-1)))[0][..., -1, None]
    logits = logits.masked_fill(logits < kth, -float("inf"))
  if top_p < 1.0:
    s, order = torch.sort(logits, descending=True)
    remove = torch.cumsum(F.softmax(s, dim=-1), dim=-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    logits = logits.masked_fill(remove.scatter(1, order, remove), -float("inf"))
  return torch.argmax(logits, dim=-1, keepdim=True), logits


@torch.no_grad()
def generate(model, labels, cfg_scale=1.0, cfg_interval=-1, *, greedy=False, temperature=1.0,
             top_k=0, top_p=1.0, generator=None, keep_logits=True):
  """The reference's `generate()`: prefill the class token, then one cache step per token.

  CFG runs the conditional rows first and the null-class rows after them and mixes the raw
  logits; each token is the argmax (`greedy`) or drawn with `torch.multinomial` from the
  filtered softmax. Returns (tokens (B, T), step logits after CFG (B, T, V), or None without
  `keep_logits`: the reference keeps none)."""
  model.eval()
  b, t = labels.shape[0], model.block_size
  guided = cfg_scale > 1.0
  rows = torch.cat([labels, torch.full_like(labels, model.num_classes)]) if guided else labels
  model.setup_caches(rows.shape[0], find_multiple(1 + t, 8))

  def guide(logits, use):
    if not guided:
      return logits
    c, u = logits[:b], logits[b:]
    return u + (c - u) * cfg_scale if use else c

  def pick(logits):
    if greedy:
      return sample(logits, top_k=1)[0]
    _, filtered = sample(logits, temperature, top_k, top_p)
    return torch.multinomial(F.softmax(filtered, dim=-1), 1, generator=generator)

  def decode():
    logits = guide(model(None, rows, torch.tensor([0]))[:, -1], True)
    tokens, all_logits = [], [logits]
    tok = pick(logits)
    tokens.append(tok)
    for i in range(t - 1):
      x = torch.cat([tok, tok]) if guided else tok
      logits = model(x, None, torch.tensor([i + 1]))[:, -1]
      logits = guide(logits, not (cfg_interval > -1 and i > cfg_interval))
      if keep_logits:
        all_logits.append(logits)
      tok = pick(logits)
      tokens.append(tok)
    return torch.cat(tokens, 1), torch.stack(all_logits, 1) if keep_logits else None

  try:
    return decode()
  finally:
    model.drop_caches()


def generate_greedy(model, labels, cfg_scale=1.0, cfg_interval=-1):
  """Greedy (top-1) `generate()`; returns (tokens (B, T), step logits after CFG (B, T, V))."""
  return generate(model, labels, cfg_scale, cfg_interval, greedy=True)
