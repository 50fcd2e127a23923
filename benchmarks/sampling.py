r"""The GPT train step and KV-cache sampling (CFG vs CFG-free), ours against a PyTorch GPT with the
same weights in the same rounds, and this machine's f32 matmul peak.

  python benchmarks/sampling.py [--runs 5] [--step_runs 15] [--threads N] [--big_batch 64]
                                [--no_torch]

Configuration (the one the official code was timed at, `../shared/docs/perf-notes.md`): dim 256,
4 layers, 4 heads, vocab 16384, 256 tokens (16 x 16), 1000 classes, float32, random weights made
by the PyTorch side and converted (`gpt_io.gpt_from_state`), so both sides run the same model.

The PyTorch side is `tests/gpt_reference.py`, the test oracle our GPT is checked against, written
in the reference's formulation (fused wqkv, SDPA, per-layer KV cache indexed by position):
  * train step as the reference's `train_c2i.py` runs it in f32: train mode with its dropouts
    (token, residual, FFN 0.1, class dropout 0.1), cross-entropy over all positions, backward,
    `clip_grad_norm_(1.0)`, AdamW(1e-4, 0.9/0.95, weight decay 0.05 on params with ndim >= 2)
    and the EMA update (`update_ema`, 0.9999); ours is the trainer's compiled step (the same,
    plus the non-finite guard and the accuracy metric);
  * sampling as the reference's `generate()`: prefill the class token, then one token per call,
    CFG on the raw logits, temperature 1, top-k 0, top-p 1, `torch.multinomial`.
Ours: one compiled program per batch shape (compile time reported apart), in float32 and with
bf16 compute (bf16 matmul inputs and a bf16 KV cache, as the reference's bf16 sampling).
The train steps (both sides, with the f32 matmul peak) are timed first, in `--step_runs`
interleaved rounds after a warm-up round, then the sampling programs in `--runs` rounds; tokens/s
counts the B x 256 generated tokens; FLOPs from our compiled program's cost analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

SIZE = dict(dim=256, n_layer=4, n_head=4, n_kv_head=4, vocab_size=16384, block_size=256,
            num_classes=1000)
DROPOUTS = dict(token_dropout=0.1, resid_dropout=0.1, ffn_dropout=0.1, class_dropout=0.1)
OPTIM = dict(lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip=1.0, ema_decay=0.9999)
STEP_BATCH = 4


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--runs", type=int, default=5, help="timed sampling rounds")
  parser.add_argument("--step_runs", type=int, default=15, help="timed train-step rounds")
  parser.add_argument("--big_batch", type=int, default=64, help="a compute-bound batch")
  parser.add_argument("--no_torch", action="store_true", help="ours only")
  parser.add_argument("--json", default="", help="also write the medians here")
  return parser.parse_args()


def torch_train_step(torch, ref, codes, labels):
  """A closure running one reference training step on (codes (B, T), labels (B,)) in place."""
  f = torch.nn.functional
  decay = [p for p in ref.parameters() if p.dim() >= 2]
  no_decay = [p for p in ref.parameters() if p.dim() < 2]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": OPTIM["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=OPTIM["lr"], betas=(OPTIM["b1"], OPTIM["b2"]))
  ema = {n: p.detach().clone() for n, p in ref.named_parameters()}
  d = OPTIM["ema_decay"]

  def step():
    ref.train()
    logits = ref(codes[:, :-1], labels)
    loss = f.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), OPTIM["grad_clip"])
    opt.step()
    with torch.no_grad():  # the reference's update_ema, one tensor at a time
      for n, p in ref.named_parameters():
        ema[n].mul_(d).add_(p.data, alpha=1 - d)
    return loss
  return step


def main():
  args = _parse()
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])

  # pylint: disable=g-import-not-at-top  # after pinning: the thread pools follow the affinity
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch

  from configs import gpt as gpt_configs
  from tests import gpt_reference
  from vfmtok_jax import gpt_io
  from vfmtok_jax.tasks import gpt as gpt_task
  from vfmtok_jax.tasks import sampler
  # pylint: enable=g-import-not-at-top
  torch.set_num_threads(args.threads)

  torch.manual_seed(0)
  ref = gpt_reference.GPT(**SIZE, **DROPOUTS)
  with torch.no_grad():  # the reference initialises Linear weights N(0, 0.02)
    for p in ref.parameters():
      if p.dim() >= 2:
        p.normal_(0.0, 0.02)
  state = {k: v.detach().numpy().copy() for k, v in ref.state_dict().items()}
  model, params = gpt_io.gpt_from_state(state, source="benchmark", num_heads=SIZE["n_head"],
                                        block_size=SIZE["block_size"])
  params = jax.tree.map(jnp.asarray, params)
  key = jax.random.PRNGKey(0)

  # -- ours: sampling programs --------------------------------------------------------------------
  programs, compile_s = {}, {}
  for dtype in ("float32", "bfloat16"):
    m = model.clone(dtype=getattr(jnp, dtype))  # compute dtype (weights cast, bf16 KV cache)
    for batch in (4, args.big_batch):
      for cfg in (1.0, 2.0):
        s = sampler.SamplingSettings(cfg_scale=cfg)
        scales, guided = sampler.guidance(s, m.block_size)
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        fn = sampler._compiled(m, s.guided, 0, 1.0, False)  # pylint: disable=protected-access
        inputs = (params, labels, jnp.arange(batch), key, jnp.asarray(scales),
                  jnp.asarray(guided), jnp.float32(1.0))
        start = time.perf_counter()
        compiled = fn.lower(*inputs).compile()
        compile_s[(dtype, batch, cfg)] = time.perf_counter() - start
        programs[(dtype, batch, cfg)] = (compiled, inputs)

  # -- ours: the trainer's step, starting from the same weights -----------------------------------
  rng = np.random.default_rng(0)
  codes = rng.integers(0, SIZE["vocab_size"], (STEP_BATCH, 256)).astype(np.int32)
  labels = rng.integers(0, SIZE["num_classes"], STEP_BATCH).astype(np.int32)
  steps = {}
  for dtype in ("float32", "bfloat16"):
    c = gpt_configs.get_config("gpt_b")
    c.model.update(dim=SIZE["dim"], num_layers=SIZE["n_layer"], num_heads=SIZE["n_head"],
                   num_kv_heads=SIZE["n_kv_head"], dtype=dtype, **DROPOUTS)
    c.optim.update(lr=OPTIM["lr"], b1=OPTIM["b1"], b2=OPTIM["b2"],
                   weight_decay=OPTIM["weight_decay"], grad_clip=OPTIM["grad_clip"])
    c.ema_decay = OPTIM["ema_decay"]
    c.batch_size = STEP_BATCH
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding = "dp"
    _, program = gpt_task.build(c, jax.devices()[:1], gpt_task.from_config(c))
    st = program.init(jax.random.PRNGKey(0))
    same = lambda: jax.tree.map(  # fresh buffers each: the step donates its state  # noqa
        lambda old, new: jax.device_put(jnp.copy(new), old.sharding), st.params, params)
    st = st.replace(params=same(), ema_params=same())
    batch = jax.device_put({"codes": codes, "label": labels}, program.batch_shardings)
    start = time.perf_counter()
    step = program.lower().compile()
    steps[dtype] = dict(step=step, state=st, batch=batch, compile=time.perf_counter() - start,
                        flops=step.cost_analysis()["flops"])

  # -- the PyTorch side ----------------------------------------------------------------------------
  torch_fns = {}
  if not args.no_torch:
    t_codes, t_labels = torch.from_numpy(codes).long(), torch.from_numpy(labels).long()
    with torch.no_grad():  # same model: eval-mode losses agree before any step
      ref.eval()
      want = torch.nn.functional.cross_entropy(
          ref(t_codes[:, :-1], t_labels).reshape(-1, SIZE["vocab_size"]), t_codes.reshape(-1))
    got, _ = model.apply({"params": params}, jnp.asarray(codes[:, :-1]), jnp.asarray(labels))
    got = gpt_task.cross_entropy(got, jnp.asarray(codes))[0]
    print(f"same model: eval-mode loss ours {float(got):.6f}, PyTorch {float(want):.6f}")
    gen = torch.Generator().manual_seed(0)
    for batch in (4, args.big_batch):
      for cfg in (1.0, 2.0):
        t_lab = torch.arange(batch) % 1000
        torch_fns[("torch", batch, cfg)] = (
            lambda lab=t_lab, cfg=cfg: gpt_reference.generate(ref, lab, cfg, generator=gen,
                                                              keep_logits=False)[0])
    torch_fns["torch_step"] = torch_train_step(torch, ref, t_codes, t_labels)

  n = 2048
  a32 = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm32 = jax.jit(lambda a: a @ a).lower(a32).compile()

  def timed(fn):
    start = time.perf_counter()
    out = fn()
    if not isinstance(out, torch.Tensor):
      jax.block_until_ready(out)
    return time.perf_counter() - start

  def one_step(r):
    r["state"], metrics = r["step"](r["state"], {}, r["batch"])
    return metrics

  # Two phases, each in interleaved rounds after a warm-up round: the train steps (ours and
  # PyTorch's, with the matmul peak) over `--step_runs` rounds, then the sampling programs.
  steps_phase = {"peak_f32": lambda: mm32(a32)}
  for d, r in steps.items():
    steps_phase[d] = lambda r=r: one_step(r)
  if "torch_step" in torch_fns:
    steps_phase["torch_step"] = torch_fns["torch_step"]
  sampling_phase = {k: (lambda c=compiled, i=inputs: c(*i)) for k, (compiled, inputs) in
                    programs.items()}
  sampling_phase.update({k: f for k, f in torch_fns.items() if k != "torch_step"})
  times = {}
  for phase, rounds in ((steps_phase, args.step_runs), (sampling_phase, args.runs)):
    for fn in phase.values():
      timed(fn)
    times.update({k: [] for k in phase})
    for _ in range(rounds):
      for k, fn in phase.items():
        times[k].append(timed(fn))
  med = {k: statistics.median(v) for k, v in times.items()}

  peak = 2 * n ** 3 / med["peak_f32"] / 1e9
  print(f"jax {jax.__version__}, torch {torch.__version__}, {args.threads} threads "
        f"(torch.get_num_threads()={torch.get_num_threads()}); medians of {args.step_runs} "
        f"(train steps) and {args.runs} (sampling) interleaved rounds after compilation; f32 "
        f"matmul peak ({n}^3) {peak:.0f} GFLOP/s "
        f"(runs {[round(2 * n**3 / t / 1e9) for t in times['peak_f32']]})")
  print(f"{'sampling':30s}{'median s':>9s}{'tokens/s':>10s}{'vs torch':>9s}{'compile s':>10s}"
        f"   runs (s)")
  keys = [k for k in programs] + [k for k in torch_fns if k != "torch_step"]
  for k in keys:
    d, b, cfg = k
    t = med[k]
    label = f"{d} batch {b}, " + ("CFG-free" if cfg <= 1 else f"CFG {cfg}")
    vs = f"{med[('torch', b, cfg)] / t:8.2f}x" if ("torch", b, cfg) in med else f"{'':9s}"
    comp = f"{compile_s[k]:10.1f}" if k in compile_s else f"{'':10s}"
    print(f"{label:30s}{t:9.3f}{b * 256 / t:10.0f}{vs}{comp}   {[round(x, 3) for x in times[k]]}")
  for d in ("float32", "bfloat16", "torch"):
    for b in (4, args.big_batch):
      if (d, b, 1.0) in med:
        print(f"{d} CFG time / CFG-free time at batch {b}: "
              f"{med[(d, b, 2.0)] / med[(d, b, 1.0)]:.2f}")
  print(f"{'train step (batch 4)':30s}{'median s':>9s}{'GFLOP':>8s}{'GFLOP/s':>9s}"
        f"{'% f32 pk':>9s}{'vs torch':>9s}{'compile s':>10s}   runs (s)")
  for d, r in steps.items():
    rate = r["flops"] / med[d] / 1e9
    vs = f"{med['torch_step'] / med[d]:8.2f}x" if "torch_step" in med else f"{'':9s}"
    print(f"{d:30s}{med[d]:9.3f}{r['flops'] / 1e9:8.1f}{rate:9.0f}{100 * rate / peak:8.0f}%"
          f"{vs}{r['compile']:10.1f}   {[round(x, 3) for x in times[d]]}")
  if "torch_step" in med:
    rate = steps["float32"]["flops"] / med["torch_step"] / 1e9
    print(f"{'torch float32':30s}{med['torch_step']:9.3f}{'':8s}{rate:9.0f}"
          f"{100 * rate / peak:8.0f}%{'':19s}   {[round(x, 3) for x in times['torch_step']]}"
          "   (GFLOP/s counts our program's FLOPs)")

  if args.json:
    torch_side = {}
    if torch_fns:
      torch_side = {"train_step": {"median_s": med["torch_step"], "runs_s": times["torch_step"]},
                    "sampling": [{"batch": b, "cfg": cfg, "median_s": med[("torch", b, cfg)],
                                  "tokens_per_s": b * 256 / med[("torch", b, cfg)]}
                                 for (side, b, cfg) in keys if side == "torch"]}
    with open(args.json, "w") as f:
      json.dump({"peak_f32_gflops": peak, "runs": args.runs, "torch": torch_side, "sampling": [
          {"dtype": d, "batch": b, "cfg": cfg, "median_s": med[(d, b, cfg)],
           "tokens_per_s": b * 256 / med[(d, b, cfg)], "compile_s": compile_s[(d, b, cfg)]}
          for (d, b, cfg) in programs], "train_step": {
              d: {"median_s": med[d], "runs_s": times[d], "gflop": r["flops"] / 1e9,
                  "compile_s": r["compile"]} for d, r in steps.items()}}, f, indent=1)


if __name__ == "__main__":
  main()
