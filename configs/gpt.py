r"""Class-conditional GPT configs (LlamaGen's GPT over VFMTok codes, spec section 7).

Variants (`--config configs/gpt.py:NAME`):
  gpt_b gpt_l gpt_xl gpt_xxl gpt_2b gpt_3b
            the paper's models (111M .. 3.1B params at vocab 16384, 1000 classes, 256 tokens),
            trained as the reference `train_c2i.py` does: AdamW(1e-4, 0.9/0.95, wd 0.05 on
            ndim >= 2), no schedule, clip 1.0, EMA 0.9999, global batch 512, bf16 compute.
  demo      offline CPU: a small GPT over the demo tokenizer's codes (the demo photos as
            classes), see `demo_updates`.
Add `runlocal` for a few-step CPU smoke run of any variant, e.g. `gpt_b,runlocal`.

`data.codes` is a folder written by `python -m vfmtok_jax.extract_codes`.
"""

import ml_collections

from configs import common
from vfmtok_jax.data import demo_photos

# name: (layers, heads, dim); FFN width = find_multiple(int(8 dim / 3), 256).
PRESETS = {
    "gpt_b": (12, 12, 768),
    "gpt_l": (24, 16, 1024),
    "gpt_xl": (36, 20, 1280),
    "gpt_xxl": (48, 24, 1536),
    "gpt_2b": (48, 32, 1920),
    "gpt_3b": (24, 32, 3200),
}
VARIANTS = tuple(PRESETS) + ("demo",)


def model_config(name: str) -> ml_collections.ConfigDict:
  """The `model` block: GPT fields, with `multiple_of` / `ffn_dim_multiplier` for the FFN."""
  layers, heads, dim = PRESETS[name]
  return ml_collections.ConfigDict(dict(
      vocab_size=16384, num_classes=1000, block_size=256, dim=dim, num_layers=layers,
      num_heads=heads, num_kv_heads=heads, multiple_of=256, ffn_dim_multiplier=0.0,
      rope_base=10000.0, norm_eps=1e-5, token_dropout=0.1, attn_dropout=0.0,
      resid_dropout=0.1, ffn_dropout=0.1, class_dropout=0.1, remat=False, scan_unroll=0,
      dtype="bfloat16"))


def get_config(arg=None):
  arg = common.parse_arg(arg, **{v: False for v in VARIANTS}, runlocal=False)
  chosen = [v for v in VARIANTS if arg[v]]
  if len(chosen) > 1:
    raise common.ConfigArgError(f"choose one variant, got {chosen}")
  variant = chosen[0] if chosen else "gpt_b"
  c = ml_collections.ConfigDict()
  c.model = model_config("gpt_b" if variant == "demo" else variant)
  # ffn_dim_multiplier 0.0 means none (the reference's None). scan_unroll: layers per iteration
  # of the layer loop, 0 = by platform (all of them on CPU, where the loop costs 5-6 % of the
  # step; 1 on TPU / GPU, where compile time then does not grow with depth).

  # Codes: a folder of `extract_codes` shards; `variants` which augmentations to draw from
  # ("all": one at random per example per epoch, as the reference's random flip; "first":
  # always the original). held_out: examples kept aside for the held-out loss, drawn with
  # held_out_seed (the training order comes from `seed`).
  c.data = dict(codes="", variants="all", held_out=0, held_out_seed=0)

  # Optimisation (spec 7.3): AdamW(1e-4, 0.9/0.95, wd 0.05 on params with ndim >= 2), clip 1.0,
  # EMA 0.9999; no warm-up or schedule in the reference (warmup_steps 0, decay "constant").
  c.optim = dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip=1.0, warmup_steps=0,
                 decay="constant")
  c.ema_decay = 0.9999
  c.batch_size = 512
  c.total_steps = 300 * 2502
  c.seed = 0
  # float32 matmul precision (params are float32; model.dtype is the compute dtype).
  c.matmul_precision = "default"

  # Sharding: mesh axes (one may be -1) and a rule preset (dp, fsdp, fsdp_tp).
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.sharding = "fsdp"

  # Loop, evals (held-out loss / accuracy, sample grids), checkpoints.
  c.log_every = 100
  c.eval_every = 10_000
  c.eval_batch_size = 64
  c.sample_grid = dict(classes=8, cfg_scale=2.0, temperature=1.0, top_k=0, top_p=1.0)
  c.tokenizer = ""  # tokenizer folder to decode sample grids at evals ("" = no grids)
  # ADM metrics of samples at each eval (eval_gen_*; off with num_samples=0, as the reference
  # has no in-training evaluation): needs `tokenizer`, an ADM ref_batch and Inception weights.
  c.sample_eval = dict(num_samples=0, ref_batch="", inception="default", cfg_scale=1.5,
                       temperature=1.0, top_k=0, top_p=1.0, batch_size=32, image_size=0)
  c.eval_ema = True
  c.export_ema = True
  c.ckpt_every = 10_000
  c.keep_last = 3
  c.keep_every = 100_000
  c.async_checkpoint = True
  c.max_nonfinite_streak = 10
  c.max_steps_per_run = 0

  if variant == "demo":
    demo_updates(c)
  if arg.runlocal:
    c.model.update(dim=64, num_layers=2, num_heads=4, num_kv_heads=4)
    c.batch_size = 8
    c.total_steps = 6
    c.log_every = 2
    c.eval_every = 6
    c.eval_batch_size = 8
    c.ckpt_every = 3
    c.keep_every = 0
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
  return common.locked(c)


def demo_updates(c) -> None:
  """The demo's differences from GPT-B: a 4-layer dim-256 GPT over the demo tokenizer's 1,024
  codes (8 x 8 = 64 tokens per image), the demo photos as classes, float32 on CPU."""
  c.model.update(vocab_size=1024, num_classes=len(demo_photos.photo_names()), block_size=64,
                 dim=256, num_layers=4,
                 num_heads=4, num_kv_heads=4, token_dropout=0.0, resid_dropout=0.0,
                 ffn_dropout=0.0, dtype="float32")
  c.optim.update(lr=3e-3, warmup_steps=20, decay="cosine", weight_decay=0.05)
  c.ema_decay = 0.99
  c.batch_size = 32
  c.total_steps = 600
  c.log_every = 50
  c.eval_every = 300
  c.eval_batch_size = 32
  c.data.held_out = 64
  c.sample_grid.update(classes=0, cfg_scale=2.0)
  c.eval_ema = False
  c.export_ema = False
  c.ckpt_every = 300
  c.keep_every = 0
