"""The VFMTok tokenizer as a task of the training loop (train/loop.py).

What is tokenizer-specific lives here: the frozen VFM and loss networks (the step's constants),
the generator loss (reconstruction, LPIPS, VQ, commitment, entropy, semantic, GAN), the
discriminator's own step, the held-out evaluation (PSNR, codebook usage and perplexity, a
reconstruction grid) and the export to a tokenizer folder. `from_config` builds it, `build`
gives it with its program on a mesh, `train` runs it (train_tokenizer.py is the command line).
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vfmtok_jax import distributed
from vfmtok_jax import sharding as shd
from vfmtok_jax import tokenizer_io
from vfmtok_jax import vfm_zoo
from vfmtok_jax import vfmtok
from vfmtok_jax.ops import codebook as codebook_ops
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.losses import gan as gan_losses
from vfmtok_jax.losses import lpips as lpips_lib
from vfmtok_jax.losses import tokenizer_losses as losses
from vfmtok_jax.models import dino_disc
from vfmtok_jax.models import quantizer as quantizer_lib
from vfmtok_jax.models import region_encoder
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.tasks import tokenizer_eval
from vfmtok_jax.train import loop
from vfmtok_jax.train import optim
from vfmtok_jax.train import program as program_lib
from vfmtok_jax.train import settings_check
from vfmtok_jax.train import state as state_lib
from vfmtok_jax.train import task as task_lib
from vfmtok_jax.weights import training_checkpoint


@dataclasses.dataclass(frozen=True)
class LossSettings:
  rec: str = "l2x2"             # "l2x2" (the reference's 2 * MSE), "l2" or "l1"
  rec_weight: float = 1.0
  vq_weight: float = 1.0
  commit_weight: float = 1.0
  semantic_weight: float = 1.0
  perceptual_weight: float = 0.0
  lpips_path: str = ""          # "" = $VFMTOK_JAX_WEIGHTS/lpips_vgg16.safetensors
  lpips_dropout: bool = True    # the reference trains with LPIPS' lin-layer dropout on


@dataclasses.dataclass(frozen=True)
class DiscSettings:
  enabled: bool = False
  dino_path: str = ""           # "" = $VFMTOK_JAX_WEIGHTS/dino_deitsmall16_pretrain.pth
  start: int = 0                # the GAN terms count from this step on
  weight: float = 0.5
  lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  # "per_device": each device's slice of the batch has its own BatchNormLocal groups and its own
  # random crop-or-resize, as the reference's per-GPU batches; "global": over the global batch.
  norm_groups: str = "per_device"


NORM_GROUPS = ("per_device", "global")

# "copies": the encoder's layers and level projectors start identical (the reference's deep
# copies); "independent": each drawn on its own.
ENCODER_INITS = ("copies", "independent")


@dataclasses.dataclass(frozen=True)
class CodebookSettings:
  """Codebook health (all off = the reference's behaviour).

  kmeans_init: on a fresh run, set the codebook to spherical k-means centroids of the
    normalised encoder outputs of the first `kmeans_batches` global batches (`kmeans_iters`
    Lloyd iterations, all devices and processes together).
  restart_window: > 0 re-seeds, inside the step, every code no global batch chose for that
    many steps from the batch's encoder outputs plus Gaussian noise of std `restart_noise`
    (the code's age is part of the checkpointed state).
  """
  kmeans_init: bool = False
  kmeans_batches: int = 4
  kmeans_iters: int = 10
  restart_window: int = 0
  restart_noise: float = 0.01

  def check(self, *, tokens_per_batch: int, codebook_size: int):
    if self.kmeans_init:
      for key in ("kmeans_batches", "kmeans_iters"):
        if getattr(self, key) < 1:
          raise ValueError(f"codebook.{key}={getattr(self, key)} must be >= 1")
      points = self.kmeans_batches * tokens_per_batch
      if points < codebook_size:
        raise ValueError(
            f"codebook.kmeans_batches={self.kmeans_batches} gives {points} encoder outputs "
            f"({tokens_per_batch} per batch), fewer than the {codebook_size} codes to seed; "
            f"use at least {-(-codebook_size // tokens_per_batch)} batches")
    if self.restart_window < 0:
      raise ValueError(f"codebook.restart_window={self.restart_window} must be >= 0 (0: off)")
    if self.restart_noise < 0:
      raise ValueError(f"codebook.restart_noise={self.restart_noise} must be >= 0")


class TokenizerTask(task_lib.Task):
  """Trains a `VFMTokenizer` on a frozen VFM (see module docstring)."""

  rule_families = ("tokenizer",)

  def __init__(self, *, tok: vfmtok.VFMTok, tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, loss: LossSettings, disc: DiscSettings,
               codebook: CodebookSettings, encoder_init: str, ema_decay: float,
               input_cfg: ml_collections.ConfigDict, batch_size: int, eval_batch_size: int,
               seed: int, eval_ema: bool, export_ema: bool, vfm_record: dict,
               batch_shards: int = 1, init_from: str = "",
               scorers: tokenizer_eval.Scorers | None = None):
    self.tok, self.model, self.tx, self.lr_fn = tok, tok.model, tx, lr_fn
    self.loss, self.disc_cfg, self.ema_decay = loss, disc, ema_decay
    self.codebook = codebook
    if encoder_init not in ENCODER_INITS:
      raise ValueError(f"encoder_init {encoder_init!r}: expected one of {ENCODER_INITS}")
    self.encoder_init = encoder_init
    codebook.check(tokens_per_batch=batch_size * self.model.num_queries,
                   codebook_size=self.model.codebook_size)
    if init_from and codebook.kmeans_init:
      raise ValueError(f"init_from={init_from!r} and codebook.kmeans_init=True: k-means would "
                       "replace the checkpoint's codebook; switch one off")
    self.init_from = init_from
    self.input_cfg, self.batch_size, self.eval_batch_size = input_cfg, batch_size, eval_batch_size
    self.seed, self.eval_ema, self.export_ema = seed, eval_ema, export_ema
    self.vfm_record = vfm_record
    self.scorers = scorers or tokenizer_eval.Scorers()
    self.semantic = loss.semantic_weight > 0
    self.lpips = lpips_lib.LPIPS() if loss.perceptual_weight > 0 else None
    if disc.norm_groups not in NORM_GROUPS:
      raise ValueError(f"disc.norm_groups {disc.norm_groups!r}: expected one of {NORM_GROUPS}")
    groups = batch_shards if disc.norm_groups == "per_device" else 1
    self.disc = dino_disc.DinoDisc(batch_groups=groups) if disc.enabled else None
    self.disc_tx = None
    if self.disc is not None:
      self.disc_tx = optim.adam(lr_schedule=optax.constant_schedule(disc.lr), b1=disc.b1,
                                b2=disc.b2, grad_clip=disc.grad_clip)
    self._feature_shapes, self._grids = self._vfm_feature_shapes()
    self._check_semantic()
    self._eval_batches = None
    self._eval_fn = None

  # -- shapes -----------------------------------------------------------------------------------

  def _vfm_feature_shapes(self):
    """Shapes of the VFM levels for one image and their grids (abstract, no compute)."""
    grids = []

    def fn(p):
      out = self.tok.features(p, jnp.zeros((1, self.model.image_size, self.model.image_size, 3)))
      grids.extend(out["grids"])  # python ints, captured while tracing
      return out["levels"]
    levels = jax.eval_shape(fn, nn.unbox(self._abstract_vfm()))
    return [f.shape[1:] for f in levels], grids

  def _check_semantic(self):
    if not self.semantic:
      return
    n_tokens, width = self._feature_shapes[-1]
    if self.model.decoder_pos_table ** 2 != n_tokens or self.model.semantic_dim != width:
      raise ValueError(
          f"semantic loss: the decoder predicts {self.model.decoder_pos_table}^2 tokens of width "
          f"{self.model.semantic_dim}, the VFM gives {n_tokens} tokens of width {width}; set "
          "model.decoder_pos_table / model.semantic_dim to match, or loss.semantic_weight=0")

  def _abstract_vfm(self):
    module = self.tok.vfm.module
    x = jnp.zeros((1, module.patch_size, module.patch_size, 3))
    return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x))["params"]

  def abstract_constants(self):
    consts = {"vfm": self._abstract_vfm()}
    if self.lpips is not None:
      x = jnp.zeros((1, 32, 32, 3))
      consts["lpips"] = nn.unbox(jax.eval_shape(
          lambda: self.lpips.init(jax.random.PRNGKey(0), x, x)))["params"]
    if self.disc is not None:
      consts["disc_backbone"] = gan_losses.abstract_dino_backbone(self.disc)
    return consts

  def load_constants(self):
    consts = {"vfm": self.tok.vfm.params}
    if self.lpips is not None:
      consts["lpips"] = lpips_lib.load_lpips(self.loss.lpips_path or None)[1]
    if self.disc is not None:
      consts["disc_backbone"] = gan_losses.load_dino_backbone(self.disc_cfg.dino_path or None,
                                                              model=self.disc)[1]
    return consts

  def batch_shapes(self):
    s = self.model.image_size
    return {"image": jax.ShapeDtypeStruct((self.batch_size, s, s, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((self.batch_size,), jnp.int32)}

  def init_state(self, rng):
    init_rng, state_rng, disc_rng = jax.random.split(rng, 3)
    dummy = [jnp.zeros((1,) + s) for s in self._feature_shapes]
    params = self.model.init(init_rng, dummy, self._grids, train=False)["params"]
    if self.encoder_init == "copies":
      params = {**params, "encode_transformer": region_encoder.identical_copies(
          params["encode_transformer"])}
    extra = {}
    if self.codebook.restart_window:
      extra["code_age"] = jnp.zeros((self.model.codebook_size,), jnp.int32)
      extra["codes_restarted"] = jnp.zeros((), jnp.int32)
    if self.disc is not None:
      heads, spectral = dino_disc.init_heads(self.disc, disc_rng)
      extra.update(disc_params=heads, disc_opt_state=self.disc_tx.init(heads),
                   disc_spectral=spectral)
    return state_lib.new_state(params, self.tx.init(params), state_rng, extra)

  # -- the step ---------------------------------------------------------------------------------

  def _discriminate(self, consts, heads, spectral, images, rng):
    return dino_disc.disc_logits(self.disc, consts["disc_backbone"], heads, spectral, images,
                                 train=True, rng=rng)

  def generator_loss(self, params, state, consts, images, gan_weight, rngs):
    """(total, (terms, codebook stats, recon, spectral state after the G pass, codes)).

    codes: {"indices" (B, n), "latents" (B, n, e) normalised pre-quantisation vectors}.

    images: (B, H, W, 3) in [-1, 1]; rngs: (dropout, LPIPS dropout, discriminator) keys.
    """
    drop_rng, lpips_rng, g_rng = rngs
    cfg = self.loss
    out = self.tok.forward(params, consts["vfm"], images, rng=drop_rng, train=True,
                           semantic=self.semantic)
    recon = out["recon"]
    terms = {"loss_rec": losses.reconstruction(images, recon, cfg.rec),
             "loss_vq": out["vq_loss"], "loss_commit": out["commit_loss"]}
    weights = {"loss_rec": cfg.rec_weight, "loss_vq": cfg.vq_weight,
               "loss_commit": cfg.commit_weight}
    if self.model.entropy_weight > 0:  # already scaled by the quantizer's entropy_weight
      terms["loss_entropy"], weights["loss_entropy"] = out["entropy_loss"], 1.0
    if self.semantic:
      terms["loss_semantic"] = losses.semantic(out["semantic"], out["vfm_target"])
      weights["loss_semantic"] = cfg.semantic_weight
    if self.lpips is not None:
      terms["loss_lpips"] = jnp.mean(self.lpips.apply(
          {"params": consts["lpips"]}, images, recon, deterministic=not cfg.lpips_dropout,
          rngs={"dropout": lpips_rng}))
      weights["loss_lpips"] = cfg.perceptual_weight
    spectral = state.extra.get("disc_spectral")
    if self.disc is not None:
      logits, spectral = self._discriminate(consts, state.extra["disc_params"], spectral, recon,
                                            g_rng)
      terms["loss_gan_g"], weights["loss_gan_g"] = gan_losses.softplus_g_loss(logits), gan_weight
    total = sum(weights[k] * v for k, v in terms.items())
    stats = {k: out[k] for k in ("codebook_usage", "codebook_perplexity", "codebook_max_ratio")}
    codes = {"indices": out["indices"],
             "latents": quantizer_lib.l2_normalize(jax.lax.stop_gradient(out["z"]))}
    return total, (terms, stats, recon, spectral, codes)

  def _disc_step(self, state, consts, images, fake, spectral, gan_weight, rng):
    """The hinge step of the discriminator heads on the detached reconstruction."""
    extra = state.extra

    def d_loss_fn(heads):
      # Fake first, then real, as the reference calls it (each call iterates the spectral norm).
      logits_fake, sn = self._discriminate(consts, heads, spectral, fake, rng)
      logits_real, sn = self._discriminate(consts, heads, sn, images, jax.random.fold_in(rng, 1))
      return gan_weight * gan_losses.hinge_d_loss(logits_real, logits_fake), (
          sn, logits_real.mean(), logits_fake.mean())
    (d_loss, (sn, real_mean, fake_mean)), d_grads = jax.value_and_grad(
        d_loss_fn, has_aux=True)(extra["disc_params"])
    updates, d_opt = self.disc_tx.update(d_grads, extra["disc_opt_state"], extra["disc_params"])
    new_extra = {"disc_params": optax.apply_updates(extra["disc_params"], updates),
                 "disc_opt_state": d_opt, "disc_spectral": sn}
    metrics = {"loss_disc": d_loss, "disc_logits_real": real_mean,
               "disc_logits_fake": fake_mean, "gan_weight": gan_weight}
    return new_extra, metrics, jnp.isfinite(d_loss)

  def train_step(self, state, constants, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    drop_rng, lpips_rng, g_rng, d_rng = jax.random.split(rng, 4)
    restart_rng = jax.random.fold_in(rng, _RESTART_STREAM)
    images = batch["image"]
    gan_weight = 0.0
    if self.disc is not None:
      gan_weight = gan_losses.disc_weight(state.step + 1, disc_start=self.disc_cfg.start,
                                          weight=self.disc_cfg.weight)
    (loss, (terms, stats, recon, spectral, codes)), grads = jax.value_and_grad(
        self.generator_loss, has_aux=True)(state.params, state, constants, images, gan_weight,
                                            (drop_rng, lpips_rng, g_rng))
    grad_norm = state_lib.global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = optim.ema_update(state.ema_params, params, self.ema_decay)
    metrics = {"loss": loss, **terms, **stats, "grad_norm": grad_norm,
               "lr": self.lr_fn(state.step)}
    extra = dict(state.extra)
    if self.codebook.restart_window:
      params, ema_params, extra, restart_metrics = self._restart_dead_codes(
          params, ema_params, extra, codes, restart_rng)
      metrics.update(restart_metrics)
    new = state.replace(params=params, opt_state=opt_state, ema_params=ema_params, extra=extra)
    if self.disc is not None:
      d_extra, d_metrics, d_ok = self._disc_step(state, constants, images,
                                                 jax.lax.stop_gradient(recon), spectral,
                                                 gan_weight, d_rng)
      new, ok = new.replace(extra={**extra, **d_extra}), ok & d_ok
      metrics.update(d_metrics)
    return new, metrics, ok

  def _restart_dead_codes(self, params, ema_params, extra, codes, rng):
    """Ages the codes on this global batch and re-seeds the dead ones (params and EMA)."""
    cb, size = self.codebook, self.model.codebook_size
    age = codebook_ops.code_age(extra["code_age"], codes["indices"], size)
    embedding, age, dead = codebook_ops.restart_dead_codes(
        params["slot_quantize"]["embedding"], age, codes["latents"], cb.restart_window,
        cb.restart_noise, rng)
    ema_embedding = jnp.where(dead[:, None], embedding, ema_params["slot_quantize"]["embedding"])
    restarted = dead.sum().astype(jnp.int32)
    total = extra["codes_restarted"] + restarted
    extra = {**extra, "code_age": age, "codes_restarted": total}
    return _with_embedding(params, embedding), _with_embedding(ema_params, ema_embedding), extra, {
        "codebook_restarted": restarted.astype(jnp.float32),
        "codebook_restarted_total": total.astype(jnp.float32)}

  def init_from_data(self, program, state, constants):
    """A reference training checkpoint (`init_from`), or the k-means codebook init
    (`codebook.kmeans_init`) on the first training batches."""
    if self.init_from:
      return self._from_training_checkpoint(state)
    cb = self.codebook
    if not cb.kmeans_init:
      return state
    batches = self.train_iterator(0, program.batch_shardings)
    try:
      images = [next(batches)["image"] for _ in range(cb.kmeans_batches)]
    finally:
      getattr(batches, "close", lambda: None)()
    latents_fn = program.jit(self._latents)
    latents = [latents_fn(state.params, constants["vfm"], im) for im in images]
    seed_fn = program.jit(self._kmeans_into_state, out_shardings=program.state_shardings,
                          donate_argnums=(0,))
    state = seed_fn(state, latents)
    if not bool(jnp.isfinite(state.params["slot_quantize"]["embedding"]).all()):
      raise FloatingPointError(
          f"codebook.kmeans_init: the encoder outputs of the first {cb.kmeans_batches} batches "
          "are not all finite, so neither are the k-means centroids")
    return state

  def _from_training_checkpoint(self, state):
    """`state` with the weights, EMA, Adam and discriminator states of the reference training
    checkpoint `init_from`, as `vq_train.py --vq-ckpt PATH --finetune` starts: step 0 (the lr
    warm-up starts again), Adam's moments and bias-correction step carried on."""
    path = self.init_from
    ck = training_checkpoint.read_training_checkpoint(path)
    expected = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state.params)

    def tree(flat, what):
      return tokenizer_io.params_from_state(flat, expected, source=f"{path} [{what}]")
    params = tree(ck.model, "model")
    used = [f"model ({len(ck.model)} tensors)"]
    if ck.ema is not None:
      ema = tree(ck.ema, "ema")
      used.append("ema")
    else:
      ema = params
      used.append("no ema entry: the EMA starts as a copy of the weights")
    opt_state = state.opt_state
    if ck.optimizer is not None:
      opt = ck.optimizer
      opt_state = _with_adam_state(opt_state, tree(opt.exp_avg, "optimizer exp_avg"),
                                   tree(opt.exp_avg_sq, "optimizer exp_avg_sq"), opt.step)
      used.append(f"optimizer (Adam at step {opt.step})")
    else:
      used.append("no optimizer entry: Adam starts fresh")
    extra = dict(state.extra)
    if self.disc is None:
      if ck.discriminator is not None:
        used.append("discriminator not used (disc.enabled is False)")
    elif ck.discriminator is None:
      used.append("no discriminator entry: the heads start fresh")
    else:
      heads, spectral = gan_losses.heads_from_torch_state(ck.discriminator, self.disc,
                                                          source=f"{path} [discriminator]")
      extra.update(disc_params=heads, disc_spectral=spectral)
      used.append(f"discriminator ({len(ck.discriminator)} tensors)")
      if ck.optimizer_disc is not None:
        opt = ck.optimizer_disc

        def heads_tree(moments, what):  # the u/v vectors only complete the mapping
          return gan_losses.heads_from_torch_state({**ck.discriminator, **moments}, self.disc,
                                                   source=f"{path} [{what}]")[0]
        extra["disc_opt_state"] = _with_adam_state(
            extra["disc_opt_state"], heads_tree(opt.exp_avg, "optimizer_disc exp_avg"),
            heads_tree(opt.exp_avg_sq, "optimizer_disc exp_avg_sq"), opt.step)
        used.append(f"optimizer_disc (Adam at step {opt.step})")
      else:
        used.append("no optimizer_disc entry: the discriminator's Adam starts fresh")
    new = state.replace(params=params, ema_params=ema, opt_state=opt_state, extra=extra)
    new = jax.tree.map(lambda v, old: _placed_like(v, old) if isinstance(v, np.ndarray) else v,
                       new, state)
    steps = "" if ck.steps is None else f", trained {ck.steps} steps"
    line = f"initialised from {path}{steps}: " + "; ".join(used) + "; training starts at step 0"
    logging.info(line)
    if jax.process_index() == 0:
      print(line, flush=True)
    return new

  def _encode(self, params, vfm_params, images):
    feats = self.tok.features(vfm_params, images)
    return self.model.apply({"params": params}, feats["levels"], feats["grids"],
                            method=tokenizer_lib.VFMTokenizer.encode)

  def _latents(self, params, vfm_params, images):
    return quantizer_lib.l2_normalize(self._encode(params, vfm_params, images)["z"])

  def _kmeans_into_state(self, state, latents):
    e = self.model.code_dim
    points = jnp.concatenate([x.reshape(-1, e) for x in latents])
    centroids = codebook_ops.spherical_kmeans(points, self.model.codebook_size,
                                              self.codebook.kmeans_iters,
                                              jax.random.fold_in(state.rng, _KMEANS_STREAM))
    return state.replace(params=_with_embedding(state.params, centroids),
                         ema_params=_with_embedding(state.ema_params, centroids))

  # -- data, evaluation, logs, export ------------------------------------------------------------

  def train_iterator(self, start_position, batch_shardings):
    return input_pipeline.make_train_iterator(
        self.input_cfg, global_batch_size=self.batch_size, seed=self.seed,
        start_step=start_position, sharding=batch_shardings["image"])

  def _eval_step(self, params, vfm_params, images):
    enc = self._encode(params, vfm_params, images)
    recon = self.model.apply({"params": params}, enc["indices"],
                             method=tokenizer_lib.VFMTokenizer.decode_indices)
    return {"recon": recon, "indices": enc["indices"], "psnr": losses.psnr(images, recon)}

  def evaluate(self, program, state, constants, step, *, grid_images: int = 8):
    """Mean PSNR over the real (unpadded) held-out examples, decoded from their codes; codebook
    usage and perplexity over the whole set; SSIM (both ranges) and whatever `eval_scorers`
    turns on (rFID, rIS, FD-VFM, LPIPS) as `eval_tokenizer` computes them on the uint8 pairs;
    a grid of originals above reconstructions."""
    del step
    if self._eval_batches is None:
      self._eval_batches = input_pipeline.make_eval_batches(
          self.input_cfg, global_batch_size=self.eval_batch_size,
          sharding=program.batch_sharding(4))
      self._eval_fn = program.jit(self._eval_step)
    params = state.ema_params if self.eval_ema else state.params
    size = self.model.codebook_size
    psnrs, counts, originals, recons = [], np.zeros(size, np.int64), [], []
    scored = tokenizer_eval.ReconAccumulator(self.scorers, codebook_size=size)
    for batch in self._eval_batches:
      out = self._eval_fn(params, constants["vfm"], batch["image"])
      own = distributed.local_rows(batch["_mask"]).astype(bool)  # this process' real rows
      scored.add(image_io.to_uint8(distributed.local_rows(batch["image"])[own]),
                 image_io.to_uint8(distributed.local_rows(out["recon"])[own]),
                 distributed.local_rows(out["indices"])[own])
      mask = distributed.to_host(batch["_mask"]).astype(bool)
      psnrs.append(distributed.to_host(out["psnr"])[mask])
      counts += np.bincount(distributed.to_host(out["indices"])[mask].ravel(), minlength=size)
      if sum(len(o) for o in originals) < grid_images:
        originals.append(distributed.to_host(batch["image"])[mask])
        recons.append(distributed.to_host(out["recon"])[mask])
    psnr = np.concatenate(psnrs)
    probs = counts / max(counts.sum(), 1)
    nz = probs[probs > 0]
    result = {"eval_psnr": float(psnr.mean()), "eval_examples": float(len(psnr)),
              "eval_codebook_usage": float((counts > 0).mean()),
              "eval_codebook_unused": float((counts == 0).sum()),
              "eval_codebook_perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}
    extra, _ = scored.result()
    result.update({f"eval_{k}": v for k, v in extra.items()
                   if k in ("ssim", "ssim_reference", "lpips", "rfid", "ris", "fd_vfm")})
    images = {}
    if originals:
      o = np.concatenate(originals)[:grid_images]
      r = np.concatenate(recons)[:grid_images]
      images["recon"] = image_io.image_grid([image_io.to_uint8(o), image_io.to_uint8(r)])
    return result, images

  def eval_line(self, step, metrics):
    return (f"eval step {step}: psnr={metrics['eval_psnr']:.2f} dB "
            f"usage={metrics['eval_codebook_usage']:.3f} "
            f"perplexity={metrics['eval_codebook_perplexity']:.1f} "
            f"unused={metrics['eval_codebook_unused']:.0f}")

  def log_line(self, step, total_steps, metrics, eta):
    terms = " ".join(f"{k[5:]}={metrics[k]:.4f}" for k in sorted(metrics)
                     if k.startswith("loss_"))
    restarts = (f"restarted={metrics['codebook_restarted_total']:.0f} "
                if "codebook_restarted_total" in metrics else "")
    return (f"step {step}/{total_steps} loss={metrics['loss']:.4f} {terms} "
            f"usage={metrics['codebook_usage']:.3f} {restarts}lr={metrics['lr']:.2e} "
            f"{metrics.get('steps_per_sec', 0.0):.2f} steps/s ETA {eta}")

  def export(self, state, workdir):
    params = state.ema_params if self.export_ema else state.params
    path = os.path.join(workdir, "export")
    tokenizer_io.save_tokenizer(path, self.model, params, self.vfm_record,
                                source=f"trained in {workdir} ({int(state.step)} steps)")
    return {"export": path}


# Folded into the state's rng / the step's rng: the k-means draw and the restarts, apart from
# the streams the step already splits (so switching them on changes no other random draw).
_KMEANS_STREAM = 0x6b6d
_RESTART_STREAM = 0x7273


def _with_adam_state(opt_state, mu, nu, count: int):
  """`opt_state` with its one Adam state's moments and step replaced."""
  found = []

  def visit(node):
    if isinstance(node, optax.ScaleByAdamState):
      found.append(node)
      return node._replace(count=np.asarray(count, node.count.dtype), mu=mu, nu=nu)
    if isinstance(node, tuple) and not hasattr(node, "_fields"):
      return tuple(visit(n) for n in node)
    return node
  out = visit(opt_state)
  if len(found) != 1:
    raise ValueError(f"expected one Adam state in the optimizer state, found {len(found)}")
  return out


def _placed_like(value: np.ndarray, like: jax.Array) -> jax.Array:
  """`value` as a global array with `like`'s shape, dtype and sharding (any process count)."""
  value = np.asarray(value, like.dtype)
  if value.shape != like.shape:
    raise ValueError(f"shape {value.shape} where the state has {like.shape}")
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def _with_embedding(params, embedding):
  """`params` with the quantizer's codebook replaced."""
  return {**params, "slot_quantize": {**params["slot_quantize"], "embedding": embedding}}


# ------------------------------------------------------------------------------------------------
# From a config (configs/tokenizer.py).
# ------------------------------------------------------------------------------------------------

def vfm_record(vfm_cfg) -> dict:
  """The `vfm` block a tokenizer folder records (an existing local source made absolute)."""
  record = {k: vfm_cfg[k] for k in ("source", "levels", "size", "resize", "num_heads")}
  if os.path.exists(record["source"]):
    record["source"] = os.path.abspath(record["source"])
  return record


def from_config(config, vfm: vfm_zoo.VFM | None = None, *,
                batch_shards: int | None = None) -> TokenizerTask:
  """The task of a tokenizer config; loads the frozen VFM from `config.vfm` unless given.

  batch_shards: devices the batch is split over (the discriminator's per-device groups);
    None: those of `config.mesh` over all devices.
  """
  settings_check.check_training_config(config)
  if config.disc.enabled:
    settings_check.check_optimizer("disc", config.disc)
  if batch_shards is None:
    batch_shards = _batch_shards(shd.make_mesh(dict(config.mesh)))
  model = tokenizer_lib.VFMTokenizer(**tokenizer_io.model_kwargs(config.model))
  if model.image_size != config.image_size:
    raise ValueError(f"image_size {config.image_size} but the model decodes "
                     f"{model.decoder_grid} x 2^{len(model.pixel_ch_mult) - 1} = "
                     f"{model.image_size} px; change model.decoder_grid/pixel_ch_mult")
  if config.input.image_size != config.image_size:
    raise ValueError(f"input.image_size {config.input.image_size} != image_size "
                     f"{config.image_size}")
  if vfm is None:
    kwargs = {"num_heads": config.vfm.num_heads} if config.vfm.get("num_heads") else {}
    vfm = vfm_zoo.load_vfm(config.vfm.source, **kwargs)
  if config.vfm.dtype not in ("float32", "bfloat16"):
    raise ValueError(f"vfm.dtype {config.vfm.dtype!r}: expected float32 or bfloat16")
  # The compute dtype only (the params stay float32); also resets a given VFM's.
  vfm = dataclasses.replace(vfm, module=vfm.module.clone(dtype=getattr(jnp, config.vfm.dtype)))
  size = config.vfm.size
  tok = vfmtok.VFMTok(vfm, model, None, tuple(config.vfm.levels), (size, size) if size else None,
                      config.vfm.resize)
  o = config.optim
  lr_fn = optim.schedule(lr=o.lr, warmup_steps=o.warmup_steps, total_steps=config.total_steps,
                         decay=o.decay)
  tx = optim.adam(lr_schedule=lr_fn, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                  grad_clip=o.grad_clip)
  return TokenizerTask(
      tok=tok, tx=tx, lr_fn=lr_fn, loss=LossSettings(**config.loss),
      disc=DiscSettings(**config.disc), codebook=CodebookSettings(**config.codebook),
      encoder_init=config.encoder_init,
      ema_decay=config.ema_decay, input_cfg=config.input, batch_size=config.batch_size,
      eval_batch_size=config.eval_batch_size, seed=config.seed, eval_ema=config.eval_ema,
      export_ema=config.export_ema, vfm_record=vfm_record(config.vfm),
      batch_shards=batch_shards, init_from=config.init_from,
      scorers=tokenizer_eval.scorers_from_config(config.eval_scorers, tok))


def _batch_shards(mesh) -> int:
  """Devices a batch is split over (`sharding.batch_sharding`: the data and fsdp axes)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def build(config, devices=None, task: TokenizerTask | None = None):
  """(task, program) of a tokenizer config on a mesh over `devices` (default: all; for an
  ahead-of-time plan, a topology's devices). `task` overrides the one `config` describes."""
  mesh = shd.make_mesh(dict(config.mesh), devices)
  task = task or from_config(config, batch_shards=_batch_shards(mesh))
  return task, program_lib.program_from_config(task, mesh, config)


def train(config, workdir: str, devices=None, task: TokenizerTask | None = None) -> dict:
  """Trains (resuming from `workdir`); returns the final metrics."""
  task, program = build(config, devices, task)
  return loop.run(task, program, workdir, loop.settings_from_config(config),
                  config_json=config.to_json_best_effort(indent=2))
