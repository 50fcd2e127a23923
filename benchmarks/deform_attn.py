r"""Multi-scale deformable attention: our jitted JAX function vs transformers' pure-PyTorch one.

Official VFMTok shapes: B=8, 256 queries, 4 levels of 24x24, 8 heads, 4 points, head dim 64
(d = 512). Times the forward, and the forward + backward of `sum(output)` w.r.t. value,
sampling locations and attention weights, in alternating blocks (ours, theirs, ours, theirs);
prints medians after warm-up. Both frameworks get the same CPU count: the process is pinned to
`--threads` CPUs before JAX starts (XLA:CPU sizes its thread pool from the affinity mask) and
torch uses `set_num_threads(--threads)`.

  python benchmarks/deform_attn.py --threads 2 --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPUs for both frameworks (default: all available)")
  parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement")
  parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
  parser.add_argument("--impl", default="auto", choices=("auto", "packed", "unrolled"),
                      help="lowering of ms_deform_attn")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--json", default="", help="also write the medians here")
  return parser.parse_args()


def main():
  args = _parse()
  cpus = sorted(os.sched_getaffinity(0))[:args.threads]
  os.sched_setaffinity(0, cpus)  # before jax/torch start their thread pools

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from transformers.models.deformable_detr import modeling_deformable_detr  # pylint: disable=g-import-not-at-top

  from vfmtok_jax.models.deform_attn import ms_deform_attn  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(args.threads)
  n, lq, m, dh, npt = args.batch, 256, 8, 64, 4
  shapes = ((24, 24),) * 4
  nl, s = len(shapes), sum(h * w for h, w in shapes)
  print(f"shapes: B={n} Lq={lq} levels={nl}x{shapes[0]} heads={m} points={npt} head_dim={dh} "
        f"(d={m * dh}, S={s})")
  print(f"threads: torch {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}), "
        f"XLA:CPU pinned to CPUs {cpus}; jax {jax.__version__} on {jax.devices()[0].platform}, "
        f"torch {torch.__version__}, impl={args.impl}")

  rng = np.random.default_rng(0)
  value = rng.standard_normal((n, s, m, dh)).astype(np.float32)
  loc = rng.uniform(-0.1, 1.1, (n, lq, m, nl, npt, 2)).astype(np.float32)
  logits = rng.standard_normal((n, lq, m, nl * npt)).astype(np.float32)
  attn = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  attn = attn.reshape(n, lq, m, nl, npt).astype(np.float32)

  # --- ours
  fwd = jax.jit(lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl=args.impl))
  fwd_bwd = jax.jit(jax.value_and_grad(
      lambda v, l, a: ms_deform_attn(v, shapes, l, a, impl=args.impl).sum(), argnums=(0, 1, 2)))
  jargs = [jnp.asarray(x) for x in (value, loc, attn)]

  def jax_fwd():
    return jax.block_until_ready(fwd(*jargs))

  def jax_fwd_bwd():
    return jax.block_until_ready(fwd_bwd(*jargs))

  # --- theirs
  module = modeling_deformable_detr.MultiScaleDeformableAttention()
  shapes_t = torch.tensor(shapes, dtype=torch.long)
  starts_t = torch.tensor(np.cumsum([0] + [h * w for h, w in shapes])[:-1])
  targs = [torch.tensor(x, requires_grad=True) for x in (value, loc, attn)]

  def torch_call(v, l, a):
    return module(v, shapes_t, list(shapes), starts_t, l, a, im2col_step=64)

  def torch_fwd():
    with torch.no_grad():
      return torch_call(*targs)

  def torch_fwd_bwd():
    for t in targs:
      t.grad = None
    out = torch_call(*targs)
    out.sum().backward()
    return out

  # Agreement check (also a warm-up).
  out_j = np.asarray(jax_fwd())
  out_t = torch_fwd().numpy()
  _, grads_j = jax_fwd_bwd()
  torch_fwd_bwd()
  grad_err = max(float(np.abs(np.asarray(g) - t.grad.numpy()).max())
                 for g, t in zip(grads_j, targs))
  print(f"max |ours - torch|: output {np.abs(out_j - out_t).max():.2e}, grads {grad_err:.2e}")

  results = {}
  for name, ours, theirs in (("forward", jax_fwd, torch_fwd),
                             ("forward+backward", jax_fwd_bwd, torch_fwd_bwd)):
    for _ in range(args.warmup):
      ours()
      theirs()
    times = {"jax": [], "torch": []}
    # Blocks A B A B: drift on a shared machine hits both alike, while neither framework's
    # idle-spinning worker threads steal CPU from the other's timed runs (strict run-by-run
    # interleaving slowed torch ~2x here).
    for block in range(2):
      for key, fn in (("jax", ours), ("torch", theirs)):
        time.sleep(0.2)
        for _ in range(args.repeats // 2 + (block == 0) * (args.repeats % 2)):
          t0 = time.perf_counter()
          fn()
          times[key].append(1e3 * (time.perf_counter() - t0))
    results[name] = {k: statistics.median(v) for k, v in times.items()}

  print(f"medians of {args.repeats} runs after {args.warmup} warm-up runs (ms):")
  print(f"{'':18s}{'jax':>10s}{'torch':>10s}{'torch/jax':>11s}")
  for name, r in results.items():
    print(f"{name:18s}{r['jax']:10.1f}{r['torch']:10.1f}{r['torch'] / r['jax']:10.2f}x")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"repeats": args.repeats, "ms": results}, f, indent=1)


if __name__ == "__main__":
  main()
