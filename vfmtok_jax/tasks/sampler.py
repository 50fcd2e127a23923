"""Class-conditional sampling from the GPT: one jitted KV-cache program per batch shape.

`generate` prefills the class token, then decodes the image tokens in a `lax.scan` over a
static cache (no Python loop per token). With guidance (`cfg_scale > 1`) the conditional rows
and the unconditional rows (null class) run in one batch, conditional first, and the logits
handed to the sampler are `u + s (c - u)` (raw logits, before temperature); with
`cfg_scale <= 1` the unconditional half is not computed at all (CFG-free).

`cfg_interval` as in the reference: token 0 is always guided; token n >= 1 is guided only while
n - 1 <= cfg_interval (-1: every token); unguided tokens use the conditional logits. The
`linear` schedule (not in the reference) ramps the scale from 1 at token 0 to `cfg_scale` at the
last token.

Randomness: row r of the global batch draws token n with `fold_in(fold_in(key, r), n)`, so a
sample depends only on the seed and its global row, never on the device count or batch split.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import distributed
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import images as image_io
from vfmtok_jax.models import gpt as gpt_lib
from vfmtok_jax.ops import resize
from vfmtok_jax.ops import sampling

CFG_SCHEDULES = ("constant", "linear")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  cfg_scale: float = 1.0
  cfg_interval: int = -1
  cfg_schedule: str = "constant"
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.cfg_schedule not in CFG_SCHEDULES:
      raise ValueError(f"cfg_schedule {self.cfg_schedule!r}: expected one of {CFG_SCHEDULES}")
    if self.cfg_interval < -1:
      raise ValueError(f"cfg_interval {self.cfg_interval}: expected -1 (all tokens) or >= 0")
    if self.temperature < 0:
      raise ValueError(f"temperature {self.temperature} is negative")
    if self.top_k < 0:
      raise ValueError(f"top_k {self.top_k} is negative (0 disables it)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p {self.top_p}: expected a value in (0, 1]")

  @property
  def guided(self) -> bool:
    return self.cfg_scale > 1.0


def guidance(settings: SamplingSettings, num_tokens: int) -> tuple[np.ndarray, np.ndarray]:
  """(scale per token (T,) float32, guided per token (T,) bool)."""
  n = np.arange(num_tokens)
  guided = np.full(num_tokens, settings.guided)
  if settings.cfg_interval >= 0:
    guided &= (n == 0) | (n - 1 <= settings.cfg_interval)
  if settings.cfg_schedule == "linear":
    scale = 1.0 + (settings.cfg_scale - 1.0) * n / max(num_tokens - 1, 1)
  else:
    scale = np.full(num_tokens, settings.cfg_scale)
  return scale.astype(np.float32), guided


def cast_for_sampling(model: gpt_lib.GPT, params):
  """The matmul weights in the compute dtype (once, not at every token). RMSNorm scales stay
  f32 (by name: under the layer scan they are (num_layers, dim), so ndim cannot tell them
  apart)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, w: w if path[-1].key == "scale" else w.astype(model.dtype), params)


def decodes_per_layer(model: gpt_lib.GPT) -> bool:
  """Whether `generate` decodes on per-layer weights and caches (`gpt.unstack_layers`): when the
  model's layer loop is unrolled (CPU by default, `gpt_io.layer_loop_unroll`). XLA:CPU copies a
  layer's slice of the stacked weights and cache at every token; TPU and GPU read the slice in
  place and keep one loop over the layers, so compile time does not grow with depth."""
  return model.scan_unroll >= model.num_layers


def decode_token(params, cache, prev, n, key, row_ids, scales, guided_tokens, temperature, *,
                 model: gpt_lib.GPT, guided: bool, top_k: int, top_p: float):
  """One decode step: token n of every row from token n - 1 (`prev`, (B,)) and the cache.

  Returns (cache with position n written, tokens (B,) int32, the guided logits (B, vocab)).
  `params` as `cast_for_sampling` gives them; with guidance the cache holds 2B rows.
  """
  inputs = jnp.concatenate([prev, prev]) if guided else prev
  logits, cache = model.apply({"params": params}, inputs[:, None], None, cache=cache, start=n)
  step_logits = _guide(logits[:, -1], n, scales, guided_tokens, guided)
  return cache, _draw(step_logits, n, key, row_ids, temperature, top_k, top_p), step_logits


def _guide(logits, n, scales, guided_tokens, guided: bool):
  if not guided:
    return logits
  b = logits.shape[0] // 2
  cond, uncond = logits[:b], logits[b:]
  return jnp.where(guided_tokens[n], uncond + scales[n] * (cond - uncond), cond)


def _draw(logits, n, key, row_ids, temperature, top_k: int, top_p: float):
  keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), n))(row_ids)
  return sampling.sample_rows(keys, logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _generate(params, labels, row_ids, key, scales, guided_tokens, temperature, *,
              model: gpt_lib.GPT, guided: bool, top_k: int, top_p: float, return_logits: bool):
  t = model.block_size
  rows = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)]) if guided \
      else labels
  per_layer = decodes_per_layer(model)
  cache = gpt_lib.init_cache(model, rows.shape[0], t, per_layer=per_layer)
  params = cast_for_sampling(model, params)
  if per_layer:
    params = gpt_lib.unstack_layers(params)

  logits, cache = model.apply({"params": params}, None, rows, cache=cache, start=0)
  first_logits = _guide(logits[:, -1], 0, scales, guided_tokens, guided)
  first = _draw(first_logits, 0, key, row_ids, temperature, top_k, top_p)

  def body(carry, n):
    cache, token, step_logits = decode_token(
        params, *carry, n, key, row_ids, scales, guided_tokens, temperature, model=model,
        guided=guided, top_k=top_k, top_p=top_p)
    return (cache, token), (token, step_logits if return_logits else None)

  _, (rest, rest_logits) = jax.lax.scan(body, (cache, first), jnp.arange(1, t))
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  if not return_logits:
    return tokens, None
  all_logits = jnp.concatenate([first_logits[:, None], rest_logits.transpose(1, 0, 2)], axis=1)
  return tokens, all_logits


@functools.lru_cache(maxsize=None)
def _compiled(model: gpt_lib.GPT, guided: bool, top_k: int, top_p: float, return_logits: bool):
  return jax.jit(functools.partial(_generate, model=model, guided=guided, top_k=top_k,
                                   top_p=top_p, return_logits=return_logits))


def generate(model: gpt_lib.GPT, params, labels, key: jax.Array,
             settings: SamplingSettings = SamplingSettings(), *, row_ids=None,
             return_logits: bool = False):
  """Samples `model.block_size` tokens per label.

  Args:
    model, params: the GPT.
    labels: (B,) int class ids in [0, num_classes) (a jax array may be sharded over its batch).
    key: the sampling seed's key.
    settings: guidance and sampling settings.
    row_ids: (B,) the rows' global indices (default 0..B-1), which pick each row's randomness.
    return_logits: also return the (B, T, V) logits handed to the sampler at each step.

  Returns:
    tokens (B, T) int32, and the step logits or None.
  """
  labels = jnp.asarray(labels, jnp.int32)
  if row_ids is None:
    row_ids = jnp.arange(labels.shape[0], dtype=jnp.int32)
  fn, settings_args = _program(model, settings, return_logits)
  return fn(params, labels, row_ids, key, *settings_args)


def lower(model: gpt_lib.GPT, params, labels, row_ids, key: jax.Array,
          settings: SamplingSettings = SamplingSettings()) -> jax.stages.Lowered:
  """The program `generate` runs, lowered for `params`, `labels` and `row_ids` given as
  arrays or `jax.ShapeDtypeStruct`s with shardings (for ahead-of-time plans)."""
  fn, settings_args = _program(model, settings, False)
  return fn.lower(params, labels, row_ids, key, *settings_args)


def _program(model, settings: SamplingSettings, return_logits: bool):
  scales, guided_tokens = guidance(settings, model.block_size)
  fn = _compiled(model, settings.guided, int(settings.top_k), float(settings.top_p),
                 return_logits)
  return fn, (jnp.asarray(scales), jnp.asarray(guided_tokens), jnp.float32(settings.temperature))


# ------------------------------------------------------------------------------------------------
# What the `sample` command line needs.
# ------------------------------------------------------------------------------------------------

def choose_labels(*, labels: str, num: int, per_class: bool, num_classes: int,
                  seed: int) -> np.ndarray:
  """The class of every sample (see the module docstring); ValueError for bad choices."""
  if num < 0:
    raise ValueError(f"--num {num} is negative")
  if bool(labels) == bool(num):
    raise ValueError("give exactly one of --labels and --num")
  if labels:
    try:
      out = np.asarray([int(x) for x in labels.split(",")], np.int32)
    except ValueError:
      raise ValueError(f"--labels {labels!r}: expected comma-separated integers") from None
  elif per_class:
    out = np.repeat(np.arange(num_classes, dtype=np.int32), num)
  else:
    out = np.random.default_rng(seed).integers(0, num_classes, num).astype(np.int32)
  bad = out[(out < 0) | (out >= num_classes)]
  if len(bad):
    raise ValueError(f"labels {sorted(set(bad.tolist()))} are outside the GPT's "
                     f"{num_classes} classes [0, {num_classes})")
  return out


def check_pair(gpt_meta: dict, model, tok) -> None:
  """A GPT and a tokenizer that belong together, else ValueError naming the mismatch."""
  if model.vocab_size != tok.model.codebook_size:
    raise ValueError(f"the GPT's vocabulary ({model.vocab_size}) is not the tokenizer's "
                     f"codebook ({tok.model.codebook_size})")
  if model.block_size != tok.model.num_queries:
    raise ValueError(f"the GPT generates {model.block_size} tokens, the tokenizer decodes "
                     f"{tok.model.num_queries}")
  trained_on = (gpt_meta.get("tokenizer") or {}).get("fingerprint")
  if trained_on and trained_on != tokenizer_io.fingerprint(tok):
    raise ValueError(f"the GPT was trained on codes of another tokenizer (codebook "
                     f"fingerprint {trained_on}, recorded from "
                     f"{gpt_meta['tokenizer'].get('path')}), not this one "
                     f"({tokenizer_io.fingerprint(tok)})")


def output_size(tok, image_size: int) -> int:
  if image_size:
    return image_size
  return 256 if tok.model.image_size == 336 else tok.model.image_size


def shardings(devices, batch: int):
  """(params: replicated, rows: a batch of `batch` rows split over `devices`) on a 1-D mesh of
  `devices`; `batch` must be a multiple of their count (`padded_batch` gives one)."""
  if batch % len(devices):
    raise ValueError(f"a batch of {batch} rows does not split over {len(devices)} devices")
  mesh = jax.sharding.Mesh(np.asarray(devices), ("batch",))
  return (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
          jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))


def padded_batch(batch_size: int, num: int, num_devices: int) -> int:
  """Rows per generate call: min(batch_size, num) rounded up to a multiple of the device count,
  so every device works; the extra rows are padding, generated and dropped."""
  b = min(batch_size, num)
  return -(-b // num_devices) * num_devices


def generate_all(model, params, labels: np.ndarray, settings, *, seed: int, batch_size: int,
                 devices=None):
  """Tokens of every label in fixed-size batches, split over all devices (the batch rounded up to
  a multiple of the device count and the last one padded; padding rows are dropped). Row i's
  randomness comes from (seed, i), so the tokens do not depend on the batch or device count.
  `devices`: those the rows are split over (default: all).

  Returns (tokens (n, T), seconds of the first call (compile + run), seconds of the timed
  calls after it, rows those timed calls generated (padding not counted)).
  """
  key = jax.random.PRNGKey(seed)
  n = len(labels)
  devices = jax.devices() if devices is None else list(devices)
  b = padded_batch(batch_size, n, len(devices))
  param_sharding, rows = shardings(devices, b)
  params = jax.device_put(params, param_sharding)

  def run(start):
    chunk = np.zeros(b, np.int32)
    part = labels[start:start + b]
    chunk[:len(part)] = part
    ids = np.arange(start, start + b, dtype=np.int32)
    put = lambda x: jax.make_array_from_callback(x.shape, rows, lambda i: x[i])  # noqa: E731
    tokens, _ = generate(model, params, put(chunk), key, settings, row_ids=put(ids))
    return distributed.to_host(tokens)[:len(part)]

  t0 = time.perf_counter()
  out = [run(0)]
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  timed_rows = 0
  if n <= b:  # one batch only: time a second run of the compiled program
    run(0)
    timed_rows = n
  for start in range(b, n, b):
    out.append(run(start))
    timed_rows += min(b, n - start)
  sample_s = time.perf_counter() - t0
  return np.concatenate(out)[:n], compile_s, sample_s, timed_rows


def decode_to_uint8(tok, tokens: np.ndarray, size: int, *, batch_size: int = 32) -> np.ndarray:
  """Codes -> uint8 (B, size, size, 3) as the reference's `decode_codes_to_img`: decode, bicubic
  resize (`F.interpolate`, align_corners=False, no antialias) when `size` differs from the
  tokenizer's, then `x * 127.5 + 128`, clamp and truncation."""
  out = []
  for start in range(0, len(tokens), batch_size):
    images = tok.decode_indices(tokens[start:start + batch_size])
    if images.shape[1] != size:
      images = resize.resize(images, (size, size), "torch_bicubic")
    out.append(image_io.to_uint8(distributed.to_host(images)))
  return np.concatenate(out)
