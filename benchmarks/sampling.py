r"""GPT sampling (CFG vs CFG-free) and the GPT train step at a small size, against this machine's
matmul peaks measured in the same run.

  python benchmarks/sampling.py [--runs 5] [--threads N] [--big_batch 64]

Configuration (the one the official code was timed at, `../shared/docs/perf-notes.md`): dim 256,
4 layers, 4 heads, vocab 16384, 256 tokens (16 x 16), 1000 classes, random weights (output head
included), float32. Sampling: temperature 1, top-k 0, top-p 1, at CFG 2.0 and CFG-free, batch 4
and `--big_batch`; one compiled program per batch shape (compile time reported apart), timed in
interleaved rounds; tokens/s counts the B x 256 generated tokens; in float32 and with bf16
compute (bf16 weights in the matmuls and a bf16 KV cache, as the reference's bf16 sampling).
Train step: batch 4, the reference's dropouts, AdamW + clip + EMA, in float32 and with bf16
compute; FLOPs from the compiled program's cost analysis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--runs", type=int, default=5, help="timed rounds")
  parser.add_argument("--big_batch", type=int, default=64, help="a compute-bound batch")
  parser.add_argument("--json", default="", help="also write the medians here")
  return parser.parse_args()


def main():
  args = _parse()
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])

  # pylint: disable=g-import-not-at-top
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import gpt as gpt_configs
  from vfmtok_jax import gpt_io
  from vfmtok_jax.tasks import gpt as gpt_task
  from vfmtok_jax.tasks import sampler
  # pylint: enable=g-import-not-at-top

  def config(dtype):
    c = gpt_configs.get_config("gpt_b")
    c.model.update(dim=256, num_layers=4, num_heads=4, num_kv_heads=4, dtype=dtype)
    c.batch_size = 4
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding = "dp"
    return c

  devices = jax.devices()[:1]
  model = gpt_io.model_from_config(config("float32").model)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 3), jnp.int32),
                      jnp.zeros((1,), jnp.int32))["params"]
  params = nn.unbox(params)
  params["output"] = 0.02 * jax.random.normal(jax.random.PRNGKey(1), params["output"].shape)
  key = jax.random.PRNGKey(0)

  programs, compile_s = {}, {}
  for dtype in ("float32", "bfloat16"):
    m = model.clone(dtype=getattr(jnp, dtype))  # compute dtype (weights cast, bf16 KV cache)
    for batch in (4, args.big_batch):
      for cfg in (1.0, 2.0):
        s = sampler.SamplingSettings(cfg_scale=cfg)
        scales, guided = sampler.guidance(s, m.block_size)
        labels = jnp.arange(batch, dtype=jnp.int32) % 1000
        fn = sampler._compiled(m, s.guided, 0, 1.0, False)  # pylint: disable=protected-access
        start = time.perf_counter()
        compiled = fn.lower(params, labels, jnp.arange(batch), key, scales, guided,
                            jnp.float32(1.0)).compile()
        compile_s[(dtype, batch, cfg)] = time.perf_counter() - start
        inputs = (params, labels, jnp.arange(batch), key, jnp.asarray(scales),
                  jnp.asarray(guided), jnp.float32(1.0))
        programs[(dtype, batch, cfg)] = (compiled, inputs)

  steps = {}
  for dtype in ("float32", "bfloat16"):
    c = config(dtype)
    task = gpt_task.from_config(c)
    task, program = gpt_task.build(c, devices, task)
    state = program.init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batch = {"codes": rng.integers(0, 16384, (4, 256)).astype(np.int32),
             "label": rng.integers(0, 1000, 4).astype(np.int32)}
    batch = jax.device_put(batch, program.batch_shardings)
    start = time.perf_counter()
    step = program.lower().compile()
    steps[dtype] = dict(step=step, state=state, batch=batch,
                        compile=time.perf_counter() - start,
                        flops=step.cost_analysis()["flops"])

  n = 2048
  a32 = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  mm32 = jax.jit(lambda a: a @ a).lower(a32).compile()

  def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  times = {"peak_f32": []}
  for k in programs:
    times[k] = []
  for d in steps:
    times[d] = []
  for k, (compiled, inputs) in programs.items():  # warm-up round
    jax.block_until_ready(compiled(*inputs))
  for _ in range(args.runs):
    times["peak_f32"].append(timed(lambda: mm32(a32)))
    for k, (compiled, inputs) in programs.items():
      times[k].append(timed(lambda c=compiled, i=inputs: c(*i)))
    for d, r in steps.items():
      def one(r=r):
        r["state"], m = r["step"](r["state"], {}, r["batch"])
        return m
      times[d].append(timed(one))

  med = {k: statistics.median(v) for k, v in times.items()}
  peak = 2 * n ** 3 / med["peak_f32"] / 1e9
  print(f"jax {jax.__version__}, {args.threads} threads, {devices[0].platform}; medians of "
        f"{args.runs} interleaved rounds after compilation; f32 matmul peak ({n}^3) "
        f"{peak:.0f} GFLOP/s (runs {[round(2 * n**3 / t / 1e9) for t in times['peak_f32']]})")
  print(f"{'sampling':28s}{'median s':>9s}{'tokens/s':>10s}{'images/s':>9s}{'compile s':>10s}"
        f"   runs (s)")
  for (d, b, cfg), _ in programs.items():
    t = med[(d, b, cfg)]
    label = f"{d} batch {b}, " + ("CFG-free" if cfg <= 1 else f"CFG {cfg}")
    print(f"{label:28s}{t:9.3f}{b * 256 / t:10.0f}{b / t:9.2f}{compile_s[(d, b, cfg)]:10.1f}   "
          f"{[round(x, 3) for x in times[(d, b, cfg)]]}")
  for d in ("float32", "bfloat16"):
    for b in (4, args.big_batch):
      print(f"{d} CFG-free / CFG time at batch {b}: "
            f"{med[(d, b, 1.0)] / med[(d, b, 2.0)]:.2f}")
  print(f"{'train step (batch 4)':28s}{'median s':>9s}{'GFLOP':>8s}{'GFLOP/s':>9s}"
        f"{'% f32 pk':>9s}{'compile s':>10s}   runs (s)")
  for d, r in steps.items():
    rate = r["flops"] / med[d] / 1e9
    print(f"{d:28s}{med[d]:9.3f}{r['flops'] / 1e9:8.1f}{rate:9.0f}{100 * rate / peak:8.0f}%"
          f"{r['compile']:10.1f}   {[round(x, 3) for x in times[d]]}")

  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_f32_gflops": peak, "runs": args.runs, "sampling": [
          {"dtype": d, "batch": b, "cfg": cfg, "median_s": med[(d, b, cfg)],
           "tokens_per_s": b * 256 / med[(d, b, cfg)], "compile_s": compile_s[(d, b, cfg)]}
          for (d, b, cfg) in programs], "train_step": {
              d: {"median_s": med[d], "runs_s": times[d], "gflop": r["flops"] / 1e9,
                  "compile_s": r["compile"]} for d, r in steps.items()}}, f, indent=1)


if __name__ == "__main__":
  main()
