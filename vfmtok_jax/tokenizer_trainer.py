"""Training the VFMTok tokenizer: state, sharded jitted steps, loop, checkpoints, evals.

`train_and_evaluate(config, workdir)` runs the whole job; the pieces are importable for tests:
`build(config)` gives the model, mesh and shardings, `make_train_step` the pure step.
Order of `train_and_evaluate` (big_vision style): mesh -> frozen VFM -> model & optimizer
(shapes only) -> sharded init or restore -> data -> loop (step, log, eval, checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vfmtok_jax import checkpoint as ckpt_lib
from vfmtok_jax import metrics as metrics_lib
from vfmtok_jax import optim
from vfmtok_jax import sharding as shd
from vfmtok_jax import tokenizer_io
from vfmtok_jax import vfmtok
from vfmtok_jax.data import images as image_io
from vfmtok_jax.losses import gan as gan_losses
from vfmtok_jax.losses import lpips as lpips_lib
from vfmtok_jax.losses import tokenizer_losses as losses
from vfmtok_jax.models import dino_disc
from vfmtok_jax.models import quantizer
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.models.vfm import zoo


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite losses or gradients."""


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs (besides the data position, stored in the meta item)."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_streak: jax.Array
  # The GAN discriminator's trainable heads, their optimizer state and spectral-norm vectors
  # (empty dicts when the discriminator is off).
  disc_params: Any = None
  disc_opt_state: Any = None
  disc_spectral: Any = None


# ----------------------------------------------------------------------------------------------
# Building.
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Components:
  mesh: jax.sharding.Mesh
  rules: list
  tok: vfmtok.VFMTok              # params=None: the trainable params live in the state
  tx: optax.GradientTransformation
  lr_fn: optax.Schedule
  vfm_params: Any                 # device arrays, sharded
  vfm_shardings: Any
  state_shardings: Any
  abstract_state: Any             # unboxed ShapeDtypeStructs with shardings
  init_state: Any                 # jitted rng -> TrainState
  batch_sharding: jax.sharding.NamedSharding
  aux_params: Any                 # frozen loss networks: {"lpips": ..., "disc_backbone": ...}
  aux_shardings: Any
  lpips: Any = None               # LPIPS module, when the perceptual loss is on
  disc: Any = None                # DinoDisc module, when the GAN is on
  disc_tx: Any = None


def _vfm(config) -> zoo.VFM:
  kwargs = {"num_heads": config.vfm.num_heads} if config.vfm.get("num_heads") else {}
  return zoo.load_vfm(config.vfm.source, **kwargs)


def _feature_shapes(tok: vfmtok.VFMTok, image_size: int):
  """Shapes of the VFM levels for one image (abstract evaluation, no compute)."""
  vfm = tok.vfm
  abstract_vfm = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), vfm.params)
  grids = []

  def fn(p):
    out = tok.features(p, jnp.zeros((1, image_size, image_size, 3)))
    grids.extend(out["grids"])  # python ints, captured while tracing
    return out["levels"]
  levels = jax.eval_shape(fn, abstract_vfm)
  return [f.shape[1:] for f in levels], grids


def build(config, devices=None) -> Components:
  """Mesh (over `devices`, default all), frozen VFM (sharded), tokenizer, optimizer, the frozen
  loss networks and the sharded state layout."""
  mesh = shd.make_mesh(dict(config.mesh), devices)
  shd.check_batch(config.batch_size, mesh)
  rules = shd.rules(config.sharding)
  vfm = _vfm(config)
  model = tokenizer_lib.VFMTokenizer(**tokenizer_io.model_kwargs(config.model))
  if model.image_size != config.image_size:
    raise ValueError(f"image_size {config.image_size} but the model decodes "
                     f"{model.decoder_grid} x 2^{len(model.pixel_ch_mult) - 1} = "
                     f"{model.image_size} px; change model.decoder_grid/pixel_ch_mult")
  if config.input.image_size != config.image_size:
    raise ValueError(f"input.image_size {config.input.image_size} != image_size "
                     f"{config.image_size}")
  size = config.vfm.size
  tok = vfmtok.VFMTok(vfm, model, None, tuple(config.vfm.levels), (size, size) if size else None,
                      config.vfm.resize)
  feat_shapes, grids = _feature_shapes(tok, config.image_size)
  if config.loss.semantic_weight > 0:
    n_tokens, width = feat_shapes[-1]
    if model.decoder_pos_table ** 2 != n_tokens or model.semantic_dim != width:
      raise ValueError(
          f"semantic loss: the decoder predicts {model.decoder_pos_table}^2 tokens of width "
          f"{model.semantic_dim}, the VFM gives {n_tokens} tokens of width {width}; set "
          "model.decoder_pos_table / model.semantic_dim to match, or loss.semantic_weight=0")
  # Frozen VFM: its own shardings from its logical names.
  patch = vfm.module.patch_size
  boxed_vfm = jax.eval_shape(lambda: vfm.module.init(jax.random.PRNGKey(0),
                                                     jnp.zeros((1, patch, patch, 3))))["params"]
  vfm_shardings = shd.param_shardings(boxed_vfm, mesh, rules)
  vfm_params = jax.device_put(vfm.params, vfm_shardings)

  lr_fn = optim.schedule(lr=config.optim.lr, warmup_steps=config.optim.warmup_steps,
                         total_steps=config.total_steps, decay=config.optim.decay)
  tx = optim.adam(lr_schedule=lr_fn, b1=config.optim.b1, b2=config.optim.b2,
                  weight_decay=config.optim.weight_decay, grad_clip=config.optim.grad_clip)
  dummy = [jnp.zeros((1,) + s) for s in feat_shapes]

  # Frozen loss networks (weights from local files; clear errors when absent).
  aux, lpips_model, disc_model, disc_tx = {}, None, None, None
  if config.loss.perceptual_weight > 0:
    lpips_model, aux["lpips"] = lpips_lib.load_lpips(config.loss.lpips_path or None)
  if config.disc.enabled:
    disc_model, aux["disc_backbone"] = dino_disc.load_dino_backbone(config.disc.dino_path or None)
    disc_tx = optim.adam(lr_schedule=optax.constant_schedule(config.disc.lr), b1=config.disc.b1,
                         b2=config.disc.b2, grad_clip=config.disc.grad_clip)
  aux_shardings = jax.tree.map(lambda _: shd.replicated(mesh), aux)
  aux = jax.device_put(aux, aux_shardings)

  def boxed_state(rng):
    init_rng, state_rng, disc_rng = jax.random.split(rng, 3)
    params = model.init(init_rng, dummy, grids, train=False)["params"]
    disc_params, disc_opt, spectral = {}, {}, {}
    if disc_model is not None:
      disc_params, spectral = dino_disc.init_heads(disc_model, disc_rng)
      disc_opt = disc_tx.init(disc_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params, rng=state_rng,
                      nonfinite_total=jnp.zeros((), jnp.int32),
                      nonfinite_streak=jnp.zeros((), jnp.int32), disc_params=disc_params,
                      disc_opt_state=disc_opt, disc_spectral=spectral)
  boxed = jax.eval_shape(boxed_state, jax.random.PRNGKey(0))
  state_shardings = shd.param_shardings(boxed, mesh, rules)
  abstract = ckpt_lib.abstract_with_shardings(nn.unbox(boxed), state_shardings)
  init_state = jax.jit(lambda rng: nn.unbox(boxed_state(rng)), out_shardings=state_shardings)
  return Components(mesh, rules, tok, tx, lr_fn, vfm_params, vfm_shardings, state_shardings,
                    abstract, init_state, shd.batch_sharding(mesh, 4), aux, aux_shardings,
                    lpips_model, disc_model, disc_tx)


# ----------------------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------------------

def _tree_where(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def _global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(comps: Components, loss_cfg, disc_cfg, ema_decay: float):
  """(state, vfm_params, aux_params, batch) -> (state, metrics).

  Generator: weighted reconstruction, LPIPS, VQ, commitment, semantic and (after
  `disc_start`) non-saturating GAN terms; then the EMA; then the discriminator's hinge step on
  the detached reconstruction. A step whose loss or gradient is non-finite changes nothing
  but the counters.
  """
  tok, tx, lr_fn = comps.tok, comps.tx, comps.lr_fn
  semantic = loss_cfg.semantic_weight > 0
  disc = comps.disc

  def discriminate(aux, heads, spectral, images, rng):
    return dino_disc.disc_logits(disc, aux["disc_backbone"], heads, spectral, images,
                                 train=True, rng=rng)

  def step(state: TrainState, vfm_params, aux, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    drop_rng, lpips_rng, g_rng, d_rng = jax.random.split(rng, 4)
    images = batch["image"]
    w_gan = (gan_losses.disc_weight(state.step + 1, disc_start=disc_cfg.start,
                                    weight=disc_cfg.weight) if disc is not None else 0.0)

    def loss_fn(params):
      out = tok.forward(params, vfm_params, images, rng=drop_rng, train=True, semantic=semantic)
      recon = out["recon"]
      terms = {
          "loss_rec": losses.reconstruction(images, recon, loss_cfg.rec),
          "loss_vq": out["vq_loss"],
          "loss_commit": out["commit_loss"],
      }
      weights = {"loss_rec": loss_cfg.rec_weight, "loss_vq": loss_cfg.vq_weight,
                 "loss_commit": loss_cfg.commit_weight}
      if semantic:
        terms["loss_semantic"] = losses.semantic(out["semantic"], out["vfm_target"])
        weights["loss_semantic"] = loss_cfg.semantic_weight
      if loss_cfg.entropy_weight:
        terms["loss_entropy"] = out["entropy_loss"]
        weights["loss_entropy"] = 1.0
      if comps.lpips is not None:
        terms["loss_lpips"] = jnp.mean(comps.lpips.apply(
            {"params": aux["lpips"]}, images, recon, deterministic=not loss_cfg.lpips_dropout,
            rngs={"dropout": lpips_rng}))
        weights["loss_lpips"] = loss_cfg.perceptual_weight
      spectral = state.disc_spectral
      if disc is not None:
        logits, spectral = discriminate(aux, state.disc_params, spectral, recon, g_rng)
        terms["loss_gan_g"] = gan_losses.softplus_g_loss(logits)
        weights["loss_gan_g"] = w_gan
      total = sum(weights[k] * v for k, v in terms.items())
      stats = {k: out[k] for k in ("codebook_usage", "codebook_perplexity",
                                   "codebook_max_ratio")}
      return total, (terms, stats, recon, spectral)

    (loss, (terms, stats, recon, spectral)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    grad_norm = _global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = dict(params=params, opt_state=opt_state,
               ema_params=optim.ema_update(state.ema_params, params, ema_decay))
    metrics = {}
    if disc is not None:
      fake = jax.lax.stop_gradient(recon)

      def d_loss_fn(heads):
        # Fake first, then real, as the reference calls it (each call iterates the spectral norm).
        logits_fake, sn = discriminate(aux, heads, spectral, fake, d_rng)
        logits_real, sn = discriminate(aux, heads, sn, images, jax.random.fold_in(d_rng, 1))
        return w_gan * gan_losses.hinge_d_loss(logits_real, logits_fake), (
            sn, logits_real.mean(), logits_fake.mean())
      (d_loss, (sn, real_mean, fake_mean)), d_grads = jax.value_and_grad(
          d_loss_fn, has_aux=True)(state.disc_params)
      d_updates, d_opt = comps.disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
      new.update(disc_params=optax.apply_updates(state.disc_params, d_updates),
                 disc_opt_state=d_opt, disc_spectral=sn)
      ok = ok & jnp.isfinite(d_loss)
      metrics.update(loss_disc=d_loss, disc_logits_real=real_mean, disc_logits_fake=fake_mean,
                     gan_weight=w_gan)
    old = {k: getattr(state, k) for k in new}
    new = _tree_where(ok, new, old)
    bad = (~ok).astype(jnp.int32)
    new_state = state.replace(step=state.step + 1, nonfinite_total=state.nonfinite_total + bad,
                              nonfinite_streak=(state.nonfinite_streak + bad) * bad, **new)
    metrics.update({"loss": loss, **terms, **stats, "grad_norm": grad_norm,
                    "param_norm": _global_norm(new_state.params), "lr": lr_fn(state.step),
                    "nonfinite_total": new_state.nonfinite_total,
                    "nonfinite_streak": new_state.nonfinite_streak})
    return new_state, metrics
  return step


def make_eval_step(tok: vfmtok.VFMTok):
  """(params, vfm_params, images) -> dict(recon decoded from the codes, indices, psnr)."""
  def step(params, vfm_params, images):
    feats = tok.features(vfm_params, images)
    enc = tok.model.apply({"params": params}, feats["levels"], feats["grids"],
                          method=tokenizer_lib.VFMTokenizer.encode)
    recon = tok.model.apply({"params": params}, enc["indices"],
                            method=tokenizer_lib.VFMTokenizer.decode_indices)
    return {"recon": recon, "indices": enc["indices"], "psnr": losses.psnr(images, recon)}
  return step


# ----------------------------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------------------------

def _host(x) -> np.ndarray:
  """A global (possibly multi-process) array as one numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def evaluate(eval_fn, params, vfm_params, batches, codebook_size: int, *,
             grid_images: int = 8) -> tuple[dict, np.ndarray | None]:
  """Mean PSNR over real (unpadded) examples, codebook usage over the set, and a PNG grid
  (originals above their reconstructions) of the first `grid_images` examples."""
  psnrs, counts, originals, recons = [], np.zeros(codebook_size, np.int64), [], []
  for batch in batches:
    out = eval_fn(params, vfm_params, batch["image"])
    mask = _host(batch["_mask"]).astype(bool)
    psnrs.append(_host(out["psnr"])[mask])
    idx = _host(out["indices"])[mask]
    counts += np.bincount(idx.ravel(), minlength=codebook_size)
    if sum(len(o) for o in originals) < grid_images:
      originals.append(_host(batch["image"])[mask])
      recons.append(_host(out["recon"])[mask])
  psnr = np.concatenate(psnrs)
  probs = counts / max(counts.sum(), 1)
  nz = probs[probs > 0]
  result = {"eval_psnr": float(psnr.mean()), "eval_examples": float(len(psnr)),
            "eval_codebook_usage": float((counts > 0).mean()),
            "eval_codebook_perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}
  grid = None
  if originals:
    o = np.concatenate(originals)[:grid_images]
    r = np.concatenate(recons)[:grid_images]
    grid = image_io.image_grid([image_io.to_uint8(o), image_io.to_uint8(r)])
  return result, grid


# ----------------------------------------------------------------------------------------------
# The job.
# ----------------------------------------------------------------------------------------------

def _log_line(step, total, m, eta):
  terms = " ".join(f"{k[5:]}={m[k]:.4f}" for k in sorted(m) if k.startswith("loss_"))
  return (f"step {step}/{total} loss={m['loss']:.4f} {terms} usage={m['codebook_usage']:.3f} "
          f"lr={m['lr']:.2e} {m.get('steps_per_sec', 0.0):.2f} steps/s ETA {eta}")


def _export(config, comps: Components, state: TrainState, workdir: str) -> str:
  params = state.ema_params if config.export_ema else state.params
  path = os.path.join(workdir, "export")
  vfm_cfg = {k: config.vfm[k] for k in ("source", "levels", "size", "resize", "num_heads")}
  vfm_cfg["source"] = os.path.abspath(vfm_cfg["source"]) if os.path.exists(
      vfm_cfg["source"]) else vfm_cfg["source"]
  tokenizer_io.save_tokenizer(path, comps.tok.model, params, vfm_cfg,
                              source=f"trained in {workdir} ({int(state.step)} steps)")
  return path


def train_and_evaluate(config, workdir: str, devices=None) -> dict:
  """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics."""
  from vfmtok_jax.data import input_pipeline  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  comps = build(config, devices)
  mesh, rules = comps.mesh, comps.rules
  writer = metrics_lib.MetricWriter(workdir)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"),
                                       save_every=config.ckpt_every, keep_last=config.keep_last,
                                       keep_every=config.keep_every or None,
                                       async_save=config.async_checkpoint)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  # State: restore the latest complete checkpoint, else a fresh sharded init.
  start_step = checkpointer.latest_step()
  if start_step is not None:
    state, meta = checkpointer.restore(comps.abstract_state, start_step)
    data_position = int(meta["data_position"])
    logging.info("restored step %d from %s", start_step, checkpointer.directory)
  else:
    state = comps.init_state(jax.random.PRNGKey(config.seed))
    start_step, data_position = 0, 0

  train_iter = input_pipeline.make_train_iterator(
      config.input, global_batch_size=config.batch_size, seed=config.seed,
      start_step=data_position, sharding=comps.batch_sharding)
  eval_batches = None

  def get_eval_batches():
    return input_pipeline.make_eval_batches(config.input, global_batch_size=config.eval_batch_size,
                                            sharding=comps.batch_sharding)

  repl = shd.replicated(mesh)
  step_fn = make_train_step(comps, config.loss, config.disc, config.ema_decay)
  with mesh, nn.logical_axis_rules(rules):
    train_step = jax.jit(step_fn, in_shardings=(comps.state_shardings, comps.vfm_shardings,
                                                comps.aux_shardings,
                                                {"image": comps.batch_sharding,
                                                 "label": shd.batch_sharding(mesh, 1)}),
                         out_shardings=(comps.state_shardings, repl), donate_argnums=(0,))
  eval_fn = jax.jit(make_eval_step(comps.tok))
  params_for_eval = (lambda s: s.ema_params) if config.eval_ema else (lambda s: s.params)

  preempt = ckpt_lib.PreemptionFlag()
  progress = metrics_lib.Progress(config.total_steps, start_step)
  final = {}
  nan_steps = set(config.testing.nan_at_steps)
  kill_step = int(os.environ.get("VFMTOK_TEST_SIGKILL_DURING_SAVE", "0"))

  def run_eval(step):
    nonlocal eval_batches
    if eval_batches is None:
      eval_batches = get_eval_batches()
    with mesh, nn.logical_axis_rules(rules):
      result, grid = evaluate(eval_fn, params_for_eval(state), comps.vfm_params, eval_batches,
                              comps.tok.model.codebook_size)
    writer.scalars(step, result)
    if grid is not None and jax.process_index() == 0:
      os.makedirs(os.path.join(workdir, "images"), exist_ok=True)
      image_io.save_png(os.path.join(workdir, "images", f"recon_{step:06d}.png"), grid)
      writer.image(step, "recon", grid)
    logging.info("eval step %d: %s", step, json.dumps(result))
    print(f"eval step {step}: psnr={result['eval_psnr']:.2f} dB "
          f"usage={result['eval_codebook_usage']:.3f}", flush=True)
    return result

  if start_step == 0 and config.eval_every:
    final.update({f"{k}_start": v for k, v in run_eval(0).items()})
  step = start_step
  try:
    while step < config.total_steps:
      batch = next(train_iter)
      if step + 1 in nan_steps:  # fault injection for tests
        batch = dict(batch, image=batch["image"] * jnp.nan)
      with mesh, nn.logical_axis_rules(rules):
        state, m = train_step(state, comps.vfm_params, comps.aux_params, batch)
      step += 1
      streak = int(m["nonfinite_streak"])
      if streak > config.max_nonfinite_streak:
        raise NonFiniteError(
            f"{streak} consecutive non-finite losses/gradients at step {step} (limit "
            f"{config.max_nonfinite_streak}); the last good checkpoint is "
            f"{checkpointer.latest_step()} in {checkpointer.directory}")
      if step % config.log_every == 0 or step == config.total_steps:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        m.update(progress.report(step))
        m["data_skipped"] = float(getattr(train_iter, "num_skipped", 0))
        writer.scalars(step, m)
        print(_log_line(step, config.total_steps, m, metrics_lib.format_eta(m["eta_sec"])),
              flush=True)
        final.update(m)
      if config.eval_every and (step % config.eval_every == 0 or step == config.total_steps):
        final.update(run_eval(step))
      meta = {"step": step, "data_position": step, "config": config.to_json_best_effort()}
      if preempt.any_process_set():
        checkpointer.save(step, state, meta, force=True)
        checkpointer.close()
        print(f"{preempt.signal_name or 'preemption'}: saved step {step}, exiting", flush=True)
        final["preempted_at"] = step
        return final
      stop_now = bool(config.max_steps_per_run) and step - start_step >= config.max_steps_per_run
      checkpointer.save(step, state, meta, force=step == config.total_steps or stop_now)
      if kill_step and step == kill_step:  # fault injection: die while the async save runs
        ckpt_lib.kill_when_save_in_progress(checkpointer.directory, step)
      if stop_now:
        checkpointer.wait()
        print(f"stopping after {config.max_steps_per_run} steps of this run at step {step}; "
              "run again to continue", flush=True)
        final["stopped_at"] = step
        return final
    checkpointer.wait()
    final["export"] = _export(config, comps, state, workdir)  # collective: every process
  finally:
    preempt.restore_handlers()
    checkpointer.close()
    writer.close()
  return final
