"""Our jitted DinoV2 forward vs transformers' PyTorch `Dinov2Model`, same weights and input.

  python benchmarks/vfm_forward.py [--variant S|B] [--batch 8] [--size 224] [--threads N]
      [--warmup 2] [--runs 7] [--attn sdpa|eager]

A randomly initialised HF Dinov2Model of the published shape is saved with `save_pretrained`
and loaded with `vfm_zoo.load_dinov2_hf_folder`. Both frameworks get the same cores: the
process is pinned to `--threads` cores (sched_setaffinity, before jax/torch start their pools;
XLA's CPU pool follows the affinity) and torch.set_num_threads(--threads). Reports the median
wall time of `--runs` calls after `--warmup` calls (jax and torch calls alternate, so background
load affects both alike), and the max abs difference of the outputs. The same rounds also time
our forward with bf16 compute (its cosine to f32 reported), our f32 forward compiled with XLA's
default options instead of the VFM's (`ops.compiler_options.dense_forward_options`), and
2048^3 f32 / bf16 matmuls: the machine's peaks, against which the forward's FLOPs from the cost
analysis are set.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time

from absl import app
from absl import flags
# Importing jax starts no thread pool: XLA's CPU client is created at the first device use,
# after main() has pinned the process.
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax import vfm_zoo
from vfmtok_jax.ops import compiler_options

VARIANTS = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16)}

_VARIANT = flags.DEFINE_enum("variant", "S", list(VARIANTS), "DINOv2 ViT/14 size.")
_BATCH = flags.DEFINE_integer("batch", 8, "Batch size.")
_SIZE = flags.DEFINE_integer("size", 224, "Image side (pixels, multiple of 14).")
_THREADS = flags.DEFINE_integer("threads", None, "Cores for both frameworks (default: all "
                                "cores this process may use).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls first (the first one compiles).")
_RUNS = flags.DEFINE_integer("runs", 7, "Timed calls; the median is reported.")
_ATTN = flags.DEFINE_enum("attn", "sdpa", ["sdpa", "eager"], "transformers attention kernel.")
_JSON = flags.DEFINE_string("json", "", "Also write the medians here.")


def _time_interleaved(fns, warmup: int, runs: int) -> list[list[float]]:
  """Milliseconds per call for each fn; calls alternate so background load hits both alike."""
  for _ in range(warmup):
    for fn in fns:
      fn()
  times = [[] for _ in fns]
  for _ in range(runs):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      fn()
      out.append((time.perf_counter() - start) * 1e3)
  return times


def main(argv):
  del argv
  cores = sorted(os.sched_getaffinity(0))
  threads = _THREADS.value or len(cores)
  if threads > len(cores):
    raise app.UsageError(f"--threads {threads} > the {len(cores)} cores available")
  os.sched_setaffinity(0, cores[:threads])

  import torch  # pylint: disable=g-import-not-at-top  # after pinning, like its thread pools
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  dim, depth, heads = VARIANTS[_VARIANT.value]
  torch.manual_seed(0)
  config = transformers.Dinov2Config(hidden_size=dim, num_hidden_layers=depth,
                                     num_attention_heads=heads, image_size=518, patch_size=14,
                                     attn_implementation=_ATTN.value)
  hf = transformers.Dinov2Model(config).eval()
  with tempfile.TemporaryDirectory() as tmp:
    hf.save_pretrained(tmp)
    model, params = vfm_zoo.load_dinov2_hf_folder(tmp)
  params = jax.device_put(params)

  x = np.random.default_rng(0).standard_normal(
      (_BATCH.value, 3, _SIZE.value, _SIZE.value)).astype(np.float32)
  x_torch = torch.from_numpy(x)
  x_jax = jax.device_put(jnp.asarray(x.transpose(0, 2, 3, 1)))
  # The frozen VFM's programs compile with `dense_forward_options` (as features and FD-VFM do);
  # the same forward with XLA's default options is timed in the same rounds.
  options = compiler_options.dense_forward_options()

  def apply(p, im):
    return model.apply({"params": p}, im, levels=(depth - 1,))["last_hidden_state"]
  forward = jax.jit(apply, compiler_options=options)
  forward_default = jax.jit(apply)
  bf16_model = model.clone(dtype=jnp.bfloat16)  # bf16 compute; f32 params, softmax and norms
  forward_bf16 = jax.jit(lambda p, im: bf16_model.apply({"params": p}, im, levels=(depth - 1,))
                         ["last_hidden_state"].astype(jnp.float32),
                         compiler_options=options)
  n = 2048
  a32 = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32)
  a16 = a32.astype(jnp.bfloat16)
  mm32 = jax.jit(lambda a: a @ a)
  mm16 = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=jnp.float32))
  flops = forward.lower(params, x_jax).compile().cost_analysis()["flops"]

  def run_jax():
    return forward(params, x_jax).block_until_ready()

  def run_jax_default():
    return forward_default(params, x_jax).block_until_ready()

  def run_jax_bf16():
    return forward_bf16(params, x_jax).block_until_ready()

  def run_peak_f32():
    return mm32(a32).block_until_ready()

  def run_peak_bf16():
    return mm16(a16).block_until_ready()

  def run_torch():
    with torch.inference_mode():
      return hf(pixel_values=x_torch).last_hidden_state

  start = time.perf_counter()
  first = run_jax()
  compile_s = time.perf_counter() - start  # trace + compile + one run
  diff = float(np.abs(np.asarray(first) - run_torch().numpy()).max())
  a, b = np.asarray(first).reshape(-1, dim), np.asarray(run_jax_bf16()).reshape(-1, dim)
  cosine = float(np.min(np.sum(a * b, -1) / np.linalg.norm(a, axis=-1) /
                        np.linalg.norm(b, axis=-1)))
  load_before = os.getloadavg()[0]
  t_jax, t_torch, t_bf16, t_default, t_p32, t_p16 = _time_interleaved(
      [run_jax, run_torch, run_jax_bf16, run_jax_default, run_peak_f32, run_peak_bf16],
      _WARMUP.value, _RUNS.value)
  load_after = os.getloadavg()[0]
  m_jax, m_torch = statistics.median(t_jax), statistics.median(t_torch)
  m_bf16, m_default = statistics.median(t_bf16), statistics.median(t_default)
  peak32 = 2 * n ** 3 / statistics.median(t_p32) / 1e6  # GFLOP/s (times are in ms)
  peak16 = 2 * n ** 3 / statistics.median(t_p16) / 1e6

  print(f"DINOv2 ViT-{_VARIANT.value}/14 (width {dim}, depth {depth}, heads {heads}), batch "
        f"{_BATCH.value}, {_SIZE.value} px ({(_SIZE.value // 14) ** 2} patches), float32")
  print(f"threads: torch.get_num_threads()={torch.get_num_threads()}; XLA CPU pool follows the "
        f"process affinity = {len(os.sched_getaffinity(0))} cores; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; jax devices {jax.devices()}")
  print(f"versions: jax {jax.__version__}, torch {torch.__version__}, transformers "
        f"{transformers.__version__} (attn_implementation={_ATTN.value})")
  print(f"max |jax - torch| on last_hidden_state: {diff:.2e}; 1-min load average "
        f"{load_before:.2f} before, {load_after:.2f} after the timed runs (interleaved)")
  print(f"jax   (jit; first call {compile_s:.1f} s): median {m_jax:8.1f} ms  "
        f"[{', '.join(f'{t:.0f}' for t in t_jax)}]")
  print(f"torch (eager, inference_mode):     median {m_torch:8.1f} ms  "
        f"[{', '.join(f'{t:.0f}' for t in t_torch)}]")
  print(f"ratio torch / jax: {m_torch / m_jax:.2f}x  ({'jax' if m_jax < m_torch else 'torch'} "
        "faster)")
  print(f"jax f32, XLA's default options:    median {m_default:8.1f} ms  "
        f"[{', '.join(f'{t:.0f}' for t in t_default)}]; ours use {options or 'the defaults'}")
  print(f"jax bf16 compute:                  median {m_bf16:8.1f} ms  "
        f"[{', '.join(f'{t:.0f}' for t in t_bf16)}]; torch f32 / jax bf16 "
        f"{m_torch / m_bf16:.2f}x; min cosine to jax f32 per token {cosine:.5f}")
  print(f"{flops / 1e9:.0f} GFLOP per forward (cost analysis): jax f32 "
        f"{flops / m_jax / 1e6:.0f} GFLOP/s = {100 * flops / m_jax / 1e6 / peak32:.0f} % of the "
        f"f32 matmul peak {peak32:.0f} GFLOP/s; bf16 {flops / m_bf16 / 1e6:.0f} GFLOP/s = "
        f"{100 * flops / m_bf16 / 1e6 / peak16:.0f} % of the bf16 peak {peak16:.0f} GFLOP/s "
        f"({n}^3 matmuls timed in the same rounds)")

  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"runs": _RUNS.value, "ours_f32_ms": m_jax, "torch_ms": m_torch,
                 "ours_bf16_ms": m_bf16, "ours_f32_xla_default_options_ms": m_default,
                 "compiler_options": options, "gflop": flops / 1e9, "peak_f32_gflops": peak32,
                 "peak_bf16_gflops": peak16, "compile_s": compile_s,
                 "runs_ms": {"ours_f32": t_jax, "torch": t_torch, "ours_bf16": t_bf16,
                             "ours_f32_xla_default_options": t_default}}, f,
                indent=1)


if __name__ == "__main__":
  app.run(main)
