"""The GPT trainer's task: next-token cross-entropy over pre-extracted codes (spec 7.3).

Step: `logits = GPT(codes[:, :-1], labels)` in train mode (token / residual / FFN dropout and the
class dropout to the null class), mean cross-entropy over all B x T positions (position 0, the
class token, predicts token 0), AdamW with decay on weight matrices and embeddings only (the
reference's `ndim >= 2` rule, read per layer since our layers are stacked), clip, EMA.
Metrics: loss, top-1 next-token accuracy, grad norm, lr. Eval: held-out loss and accuracy
(teacher forced, deterministic) and, given a tokenizer, a grid of samples per class with and
without guidance. Export: a GPT folder (`gpt_io`) that `sample` reads.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vfmtok_jax import distributed
from vfmtok_jax import gpt_io
from vfmtok_jax import sharding as shd
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import codes as codes_lib
from vfmtok_jax.data import images as image_io
from vfmtok_jax.evaluators import batches
from vfmtok_jax.evaluators import inception as inception_lib
from vfmtok_jax.evaluators import suite
from vfmtok_jax.models import gpt as gpt_lib
from vfmtok_jax.tasks import generator_eval
from vfmtok_jax.tasks import sampler
from vfmtok_jax.train import loop
from vfmtok_jax.train import optim
from vfmtok_jax.train import program as program_lib
from vfmtok_jax.train import settings_check
from vfmtok_jax.train import state as state_lib
from vfmtok_jax.train import task as task_lib


def gpt_decay_mask(params):
  """Weight decay on matrices and embeddings, not on norm scales (the reference's ndim >= 2
  rule; the scanned `layers` params carry one extra leading axis)."""
  def decays(path, leaf):
    value = leaf.value if isinstance(leaf, nn.LogicallyPartitioned) else leaf
    stacked = getattr(path[0], "key", None) == "layers"
    return value.ndim - int(stacked) >= 2
  return jax.tree_util.tree_map_with_path(
      decays, params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@dataclasses.dataclass(frozen=True)
class DataSettings:
  codes: str = ""            # codes folder ("" only for shape-only uses, e.g. AOT plans)
  variants: str = "all"      # "all" | "first"
  held_out: int = 0          # examples kept for the held-out loss
  held_out_seed: int = 0     # which examples are held out


@dataclasses.dataclass(frozen=True)
class SampleGridSettings:
  classes: int = 8           # first N classes (0: all, at most 16)
  cfg_scale: float = 2.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class SampleEvalSettings:
  """Samples scored at each eval against an ADM reference batch (off with num_samples=0)."""
  num_samples: int = 0
  ref_batch: str = ""
  inception: str = "default"  # FID Inception weights: "default" ($VFMTOK_JAX_WEIGHTS) or a path
  cfg_scale: float = 1.5
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  batch_size: int = 32
  image_size: int = 0         # 0: 256 for a 336 px tokenizer, else its size

  @property
  def enabled(self) -> bool:
    return self.num_samples > 0


def top1_hits(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(...,) bool: `argmax(logits) == targets` (ties go to the lowest index, as in argmax);
  logits (..., V), targets (...,).

  Computed as "the first index holding the maximum": XLA:CPU runs the max and that index as
  two cheap single-operand reductions, where `argmax` is a (value, index) reduction that cost
  40-50 ms of the 0.68 s train step (batch 4, vocab 16,384). Ties matter: the GPT's output head
  starts at zero, so at step 0 every logit ties (a plain "target logit >= max" counted every
  position as a hit there)."""
  best = jnp.max(logits, -1, keepdims=True)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  first_best = jnp.min(jnp.where(logits == best, index, logits.shape[-1]), -1)
  return first_best == targets


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(mean CE, mean top-1 accuracy) over the (B, T) positions; logits (B, T, V)."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  hits = top1_hits(jax.lax.stop_gradient(logits), targets)
  return ce.mean(), hits.astype(jnp.float32).mean()


class GPTTask(task_lib.Task):
  """Trains a class-conditional `GPT` on a codes folder (see module docstring)."""

  rule_families = ("gpt",)

  def __init__(self, *, model: gpt_lib.GPT, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, ema_decay: float, batch_size: int, eval_batch_size: int,
               seed: int, data: DataSettings, sample_grid: SampleGridSettings,
               tokenizer_path: str = "", eval_ema: bool = True, export_ema: bool = True,
               sample_eval: SampleEvalSettings = SampleEvalSettings(),
               inception_features=None):
    self.model, self.tx, self.lr_fn, self.ema_decay = model, tx, lr_fn, ema_decay
    self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
    self.data, self.grid = data, sample_grid
    self.tokenizer_path, self.eval_ema, self.export_ema = tokenizer_path, eval_ema, export_ema
    self._dataset = None
    self._split = None
    self._tok = None
    self._eval_fn = None
    if data.codes:
      self._check_codes(self.dataset.info)
    if tokenizer_path:
      self._check_tokenizer()
    self.sample_eval, self._inception = sample_eval, inception_features
    self._ref_side = None
    if sample_eval.enabled:
      if not tokenizer_path or not sample_eval.ref_batch or inception_features is None:
        raise ValueError("sample_eval needs `tokenizer` (to decode), sample_eval.ref_batch (an "
                         "ADM reference batch) and the Inception weights")
      batches.inspect(sample_eval.ref_batch)  # a missing file fails before training

  # -- data -------------------------------------------------------------------------------------

  @property
  def dataset(self) -> codes_lib.CodesDataset:
    if self._dataset is None:
      if not self.data.codes:
        raise codes_lib.CodesError("data.codes is not set: point it at an extract_codes folder")
      self._dataset = codes_lib.CodesDataset(self.data.codes)
    return self._dataset

  def _check_codes(self, info: codes_lib.CodesInfo) -> None:
    m = self.model
    problems = []
    if info.codebook_size != m.vocab_size:
      problems.append(f"codes from a codebook of {info.codebook_size}, model.vocab_size "
                      f"{m.vocab_size}")
    if info.num_tokens != m.block_size:
      problems.append(f"{info.num_tokens} tokens per image, model.block_size {m.block_size}")
    if info.num_classes > m.num_classes:
      problems.append(f"labels up to {info.num_classes - 1}, model.num_classes "
                      f"{m.num_classes}")
    if problems:
      raise codes_lib.CodesError(f"{self.data.codes} does not fit the GPT: "
                                 + "; ".join(problems))

  def _check_tokenizer(self) -> None:
    """The tokenizer that decodes sample grids: the GPT's sizes and, with a codes folder, the
    very tokenizer that made the codes (its codebook's fingerprint, which the folder records)."""
    tok = self.tokenizer
    if tok.model.codebook_size != self.model.vocab_size or \
       tok.model.num_queries != self.model.block_size:
      raise ValueError(f"tokenizer {self.tokenizer_path}: codebook {tok.model.codebook_size}, "
                       f"{tok.model.num_queries} tokens; the GPT has vocab "
                       f"{self.model.vocab_size}, {self.model.block_size} tokens")
    if self.data.codes:
      made_by = self.dataset.info.tokenizer or {}
      recorded = made_by.get("fingerprint")
      if recorded and tokenizer_io.fingerprint(tok) != recorded:
        raise ValueError(
            f"tokenizer {self.tokenizer_path} did not make the codes in {self.data.codes} "
            f"(they record {made_by.get('path', '?')}, codebook fingerprint {recorded}; this "
            f"one's is {tokenizer_io.fingerprint(tok)}): its sample grids would decode the "
            "codes with another codebook")

  @property
  def tokenizer(self):
    if self._tok is None:
      self._tok = tokenizer_io.load_tokenizer(self.tokenizer_path)
    return self._tok

  def _splits(self) -> tuple[np.ndarray, np.ndarray]:
    if self._split is None:
      self._split = codes_lib.split_held_out(len(self.dataset), self.data.held_out,
                                             self.data.held_out_seed)
    return self._split

  def train_iterator(self, start_position, batch_shardings):
    train, _ = self._splits()
    return codes_lib.CodesIterator(self.dataset, global_batch=self.batch_size, seed=self.seed,
                                   start_step=start_position, variants=self.data.variants,
                                   examples=train, sharding=batch_shardings["codes"])

  # -- shapes and state -------------------------------------------------------------------------

  def abstract_constants(self):
    return {}

  def load_constants(self):
    return {}

  def batch_shapes(self):
    return {"codes": jax.ShapeDtypeStruct((self.batch_size, self.model.block_size), jnp.int32),
            "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)}

  def init_state(self, rng):
    init_rng, state_rng = jax.random.split(rng)
    t = self.model.block_size
    params = self.model.init(init_rng, jnp.zeros((1, t - 1), jnp.int32),
                             jnp.zeros((1,), jnp.int32))["params"]
    return state_lib.new_state(params, self.tx.init(params), state_rng)

  # -- the step ---------------------------------------------------------------------------------

  def train_step(self, state, constants, batch):
    del constants
    rng = jax.random.fold_in(state.rng, state.step)
    codes, labels = batch["codes"], batch["label"]

    def loss_fn(params):
      logits, _ = self.model.apply({"params": params}, codes[:, :-1], labels,
                                   deterministic=False, rngs={"dropout": rng})
      return cross_entropy(logits, codes)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = state_lib.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = optim.ema_update(state.ema_params, params, self.ema_decay)
    metrics = {"loss": loss, "accuracy": acc, "grad_norm": grad_norm,
               "lr": self.lr_fn(state.step)}
    return state.replace(params=params, opt_state=opt_state, ema_params=ema), metrics, ok

  # -- eval -------------------------------------------------------------------------------------

  def _eval_step(self, params, codes, labels, mask):
    logits, _ = self.model.apply({"params": params}, codes[:, :-1], labels)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, codes).sum(-1)
    hits = top1_hits(logits, codes).sum(-1)
    return jnp.where(mask, ce, 0.0).sum(), jnp.where(mask, hits, 0).sum()

  def held_out_metrics(self, program, params) -> dict[str, float]:
    """Teacher-forced loss and accuracy over the held-out examples (variant 0)."""
    _, held = self._splits()
    if not len(held):
      return {}
    if self._eval_fn is None:
      self._eval_fn = program.jit(self._eval_step)
    b = self.eval_batch_size
    ce_sum, hit_sum = 0.0, 0
    for start in range(0, len(held), b):
      idx = held[start:start + b]
      labels, codes = self.dataset.read(idx)
      pad = b - len(idx)
      batch = {"codes": np.pad(codes[:, 0], ((0, pad), (0, 0))),
               "label": np.pad(labels, (0, pad)),
               "mask": np.arange(b) < len(idx)}
      batch = {k: _global(v, program) for k, v in batch.items()}
      ce, hits = self._eval_fn(params, batch["codes"], batch["label"], batch["mask"])
      ce_sum += float(distributed.to_host(ce))
      hit_sum += int(distributed.to_host(hits))
    n = len(held) * self.model.block_size
    return {"eval_loss": ce_sum / n, "eval_accuracy": hit_sum / n,
            "eval_examples": float(len(held)), "eval_uniform_loss": float(np.log(
                self.model.vocab_size))}

  def sample_grid(self, params, key) -> np.ndarray | None:
    """uint8 grid: row 0 CFG-free, row 1 guided (`cfg_scale`), one column per class."""
    if not self.tokenizer_path:
      return None
    n = self.grid.classes or min(self.model.num_classes, 16)
    labels = np.arange(min(n, self.model.num_classes), dtype=np.int32)
    rows = []
    for scale in (1.0, self.grid.cfg_scale):
      settings = sampler.SamplingSettings(cfg_scale=scale, temperature=self.grid.temperature,
                                          top_k=self.grid.top_k, top_p=self.grid.top_p)
      tokens, _ = sampler.generate(self.model, params, labels, key, settings)
      images = self.tokenizer.decode_indices(distributed.to_host(tokens))
      rows.append(image_io.to_uint8(distributed.to_host(images)))
    return image_io.image_grid(rows)

  def evaluate(self, program, state, constants, step):
    del constants
    params = state.ema_params if self.eval_ema else state.params
    result = self.held_out_metrics(program, params)
    images = {}
    with program.context():
      grid = self.sample_grid(params, jax.random.PRNGKey(self.seed + 1))
    if grid is not None:
      images["samples"] = grid
    if self.sample_eval.enabled:
      result.update(self.sample_metrics(params))
    del step
    return result, images

  def sample_metrics(self, params) -> dict[str, float]:
    """ADM metrics of `sample_eval.num_samples` samples (fixed labels and seed at every eval)
    against the reference batch, as `eval_generator` computes them: eval_gen_{inception_score,
    fid, sfid, precision, recall}."""
    s = self.sample_eval
    labels = sampler.choose_labels(labels="", num=s.num_samples, per_class=False,
                                   num_classes=self.model.num_classes, seed=self.seed + 2)
    settings = sampler.SamplingSettings(cfg_scale=s.cfg_scale, temperature=s.temperature,
                                        top_k=s.top_k, top_p=s.top_p)
    images, _, _ = generator_eval.sample_images(
        self.model, params, self.tokenizer, labels, settings, seed=self.seed + 2,
        batch_size=s.batch_size, image_size=s.image_size, log=lambda _: None)
    if self._ref_side is None:  # the reference's features once per run
      self._ref_side = suite.side_of_file(s.ref_batch, self._inception, s.batch_size)
    feats = generator_eval.own_features(images, self._inception, s.batch_size)
    results, _ = suite.adm_metrics(self._ref_side, suite.Side("samples", {}, feats))
    return {f"eval_gen_{k}": v for k, v in results.items()}

  def eval_line(self, step, metrics):
    if "eval_loss" not in metrics:
      return f"eval step {step}: (no held-out examples)"
    return (f"eval step {step}: held-out loss={metrics['eval_loss']:.4f} "
            f"(uniform {metrics['eval_uniform_loss']:.4f}) "
            f"accuracy={metrics['eval_accuracy']:.4f}")

  def log_line(self, step, total_steps, metrics, eta):
    sps = metrics.get("steps_per_sec", 0.0)
    tokens = sps * self.batch_size * self.model.block_size
    return (f"step {step}/{total_steps} loss={metrics['loss']:.4f} "
            f"acc={metrics['accuracy']:.4f} lr={metrics['lr']:.2e} {sps:.2f} steps/s "
            f"{tokens:,.0f} tokens/s ETA {eta}")

  def export(self, state, workdir):
    params = state.ema_params if self.export_ema else state.params
    path = os.path.join(workdir, "gpt")
    tokenizer = None
    if self.data.codes:
      info = self.dataset.info
      tokenizer = dict(info.tokenizer, codebook_size=info.codebook_size,
                       num_tokens=info.num_tokens, codes=os.path.abspath(self.data.codes))
    gpt_io.save_gpt(path, self.model, params,
                    source=f"trained in {workdir} ({int(state.step)} steps)",
                    tokenizer=tokenizer)
    return {"export": path}


def _global(x: np.ndarray, program) -> jax.Array:
  """A host batch (the same on every process) as a global array over the batch axes."""
  sharding = program.batch_sharding(x.ndim)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


# ------------------------------------------------------------------------------------------------
# From a config (configs/gpt.py).
# ------------------------------------------------------------------------------------------------

def from_config(config, platform: str | None = None) -> GPTTask:
  """The task of a GPT config; `platform` (default: JAX's backend) resolves the model's
  by-platform settings (`gpt_io.layer_loop_unroll`)."""
  settings_check.check_training_config(config)
  model = gpt_io.model_from_config(config.model, platform)
  o = config.optim
  lr_fn = optim.schedule(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=config.total_steps,
                         decay=o.decay)
  tx = optim.adam(lr_schedule=lr_fn, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                  grad_clip=o.grad_clip, mask=gpt_decay_mask)
  sample_eval = SampleEvalSettings(**config.sample_eval)
  extract = None
  if sample_eval.enabled:
    net, net_params = inception_lib.load_inception(
        None if sample_eval.inception == "default" else sample_eval.inception)
    extract = inception_lib.InceptionFeatures(net, net_params)
  return GPTTask(model=model, tx=tx, lr_fn=lr_fn, ema_decay=config.ema_decay,
                 batch_size=config.batch_size, eval_batch_size=config.eval_batch_size,
                 seed=config.seed, data=DataSettings(**config.data),
                 sample_grid=SampleGridSettings(**config.sample_grid),
                 tokenizer_path=config.tokenizer, eval_ema=config.eval_ema,
                 export_ema=config.export_ema, sample_eval=sample_eval,
                 inception_features=extract)


def build(config, devices=None, task: GPTTask | None = None):
  """(task, program) of a GPT config on a mesh over `devices` (default: all)."""
  mesh = shd.make_mesh(dict(config.mesh), devices)
  task = task or from_config(config, mesh.devices.flat[0].platform)
  return task, program_lib.program_from_config(task, mesh, config)


def train(config, workdir: str, devices=None, task: GPTTask | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir`); returns the final metrics."""
  task, program = build(config, devices, task)
  task.dataset  # pylint: disable=pointless-statement  (no codes folder: refused before writing)
  return loop.run(task, program, workdir, loop.settings_from_config(config),
                  config_json=config.to_json_best_effort(indent=2))
