r"""Every speed comparison we publish, in one run, as one table.

  python benchmarks/run_all.py [--quick] [--only deform_attn,vfm,tokenizer,gpt] [--json out.json]

Runs each benchmark of this folder in its own process (one at a time, nothing else running is
assumed) and reads back its medians:

  deform_attn   deformable attention, official shapes, forward and forward + backward, against
                transformers' pure-PyTorch function in the same process (`deform_attn.py`)
  vfm           DINOv2-S/14 forward against transformers' PyTorch model in the same rounds,
                also with bf16 compute and with XLA's default options (`vfm_forward.py`)
  tokenizer     the tokenizer train step and eval forward (f32, bf16) at the configuration the
                official code was timed at (`tokenizer_step.py`)
  gpt           the GPT train step and KV-cache sampling at CFG 2.0 vs CFG-free, against a
                PyTorch GPT with the same weights in the same rounds (`sampling.py`)

Each figure is a median over interleaved rounds after compilation (compile time apart, in the
JSON). The official VFMTok code is not installed here, so the tokenizer rows, and as context the
GPT rows, compare against its figures on this machine type in `../shared/docs/perf-notes.md`
(side by side sessions of 2026-12-01 and 2026-12-06; the range of both is shown and the ratio
against each end): those ratios are not side by side and move with the CPU. Utilisation is the train
steps' achieved FLOP/s (FLOPs from the compiled cost analysis) over the f32 matmul peak
(2048^3) timed in the same rounds of the same process.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

# The official code's medians on this machine type (perf-notes, "Measured side by side"):
# (2026-12-01 AMD EPYC, 2026-12-06 Intel Xeon). Tokens/s count the B x 256 generated tokens.
OFFICIAL = {
    "tokenizer_step_s": (4.72, 4.63),         # 12-01: two runs, 6.49 and 4.72; the faster one
    "tokenizer_fwd_s": (1.54, 1.05),          # 12-01: 1.64 and 1.54
    "gpt_step_s": (0.50, 0.404),
    "sampling_cfg_free_b4_tokens_s": (385.0, 576.0),
    "sampling_cfg_b4_tokens_s": (4 * 256 / 5.79, 431.0),  # official at CFG 1.5; ours CFG 2.0
}

BENCHMARKS = {
    # name: (script, arguments, quick arguments)
    "deform_attn": ("deform_attn.py", ["--repeats", "10"], ["--repeats", "4", "--warmup", "1"]),
    "vfm": ("vfm_forward.py", ["--warmup", "1", "--runs", "5"], ["--warmup", "1", "--runs", "3"]),
    "tokenizer": ("tokenizer_step.py", ["--runs", "5"], ["--runs", "2", "--loss_steps", "1"]),
    "gpt": ("sampling.py", ["--runs", "3"],
            ["--runs", "2", "--step_runs", "5", "--big_batch", "32"]),
}


def _parse():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
  parser.add_argument("--only", default=",".join(BENCHMARKS),
                      help=f"comma-separated subset of {','.join(BENCHMARKS)}")
  parser.add_argument("--json", default="", help="also write every figure here")
  return parser.parse_args()


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown CPU"


def cpu_features() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      flags = next((l.split(":", 1)[1].split() for l in f if l.startswith("flags")), [])
  except OSError:
    return ""
  wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
  return " ".join(w for w in wanted if w in flags)


def run_one(name: str, quick: bool) -> dict:
  """Runs one benchmark script in a subprocess; its JSON (and its log, under "log")."""
  script, full, short = BENCHMARKS[name]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "out.json")
    cmd = [sys.executable, os.path.join(HERE, script), *(short if quick else full),
           "--json", out]
    print(f"[{name}] {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not os.path.exists(out):
      raise SystemExit(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with open(out) as f:
      result = json.load(f)
  result["log"] = proc.stdout
  return result


def _vs_official(ours: float, key: str, higher_is_better: bool = False) -> str:
  """'a-b' official range and our speed-up against each end (>1: ours faster)."""
  lo, hi = sorted(OFFICIAL[key])
  if higher_is_better:
    ratios = (ours / hi, ours / lo)
  else:
    ratios = (lo / ours, hi / ours)
  return f"{lo:.3g}-{hi:.3g}", f"{ratios[0]:.2f}-{ratios[1]:.2f}x"


def rows(results: dict) -> list[tuple[str, str, str, str]]:
  """(what, ours, theirs, ratio theirs/ours in time: > 1 means ours is faster)."""
  out = []
  if "deform_attn" in results:
    ms = results["deform_attn"]["ms"]
    for what in ("forward", "forward+backward"):
      r = ms[what]
      out.append((f"deformable attention {what} (vs transformers, side by side)",
                  f"{r['jax']:.1f} ms", f"{r['torch']:.1f} ms", f"{r['torch'] / r['jax']:.2f}x"))
  if "vfm" in results:
    v = results["vfm"]
    out.append(("DINOv2-S/14 forward, batch 8, 224 px, f32 (vs transformers, side by side)",
                f"{v['ours_f32_ms']:.0f} ms", f"{v['torch_ms']:.0f} ms",
                f"{v['torch_ms'] / v['ours_f32_ms']:.2f}x"))
    out.append(("same, ours with bf16 compute (vs torch f32)", f"{v['ours_bf16_ms']:.0f} ms",
                f"{v['torch_ms']:.0f} ms", f"{v['torch_ms'] / v['ours_bf16_ms']:.2f}x"))
    if "ours_f32_xla_default_options_ms" in v:
      d = v["ours_f32_xla_default_options_ms"]
      out.append(("same, f32, ours with XLA's default options (YNNPACK dot fusion on)",
                  f"{d:.0f} ms", f"{v['torch_ms']:.0f} ms", f"{v['torch_ms'] / d:.2f}x"))
  if "tokenizer" in results:
    t = results["tokenizer"]
    for dtype in ("float32", "bfloat16"):
      if f"{dtype}_step" not in t:
        continue
      step, fwd = t[f"{dtype}_step"], t[f"{dtype}_fwd"]
      util = step["gflop"] / step["median_s"] / t["peak_f32_gflops"]
      theirs, ratio = _vs_official(step["median_s"], "tokenizer_step_s")
      out.append((f"tokenizer train step, {dtype} (vs official f32, perf-notes)",
                  f"{step['median_s']:.2f} s ({100 * util:.0f} % of the f32 peak)",
                  f"{theirs} s", ratio))
      theirs, ratio = _vs_official(fwd["median_s"], "tokenizer_fwd_s")
      out.append((f"tokenizer eval forward, {dtype} (vs official f32, perf-notes)",
                  f"{fwd['median_s']:.2f} s", f"{theirs} s", ratio))
  if "gpt" in results:
    g = results["gpt"]
    torch_side = g.get("torch") or {}
    t_step = (torch_side.get("train_step") or {}).get("median_s")
    for dtype, step in g["train_step"].items():
      util = step["gflop"] / step["median_s"] / g["peak_f32_gflops"]
      ours = f"{step['median_s']:.3f} s ({100 * util:.0f} % of the f32 peak)"
      if t_step:
        out.append((f"GPT train step, batch 4, {dtype} (vs PyTorch f32, side by side)", ours,
                    f"{t_step:.3f} s", f"{t_step / step['median_s']:.2f}x"))
      theirs, ratio = _vs_official(step["median_s"], "gpt_step_s")
      out.append((f"GPT train step, batch 4, {dtype} (vs official f32, perf-notes)", ours,
                  f"{theirs} s", ratio))
    by = {(s["dtype"], s["batch"], s["cfg"]): s for s in g["sampling"]}
    t_by = {(s["batch"], s["cfg"]): s for s in torch_side.get("sampling", [])}
    for dtype in ("float32", "bfloat16"):
      for (b, cfg), t in sorted(t_by.items()):
        if (dtype, b, cfg) in by:
          mine = by[(dtype, b, cfg)]["tokens_per_s"]
          what = "CFG-free" if cfg <= 1 else f"CFG {cfg:g}"
          out.append((f"GPT sampling, batch {b}, {what}, {dtype} (vs PyTorch f32, side by side)",
                      f"{mine:.0f} tokens/s", f"{t['tokens_per_s']:.0f} tokens/s",
                      f"{mine / t['tokens_per_s']:.2f}x"))
      free, cfg = by.get((dtype, 4, 1.0)), by.get((dtype, 4, 2.0))
      if free:
        theirs, ratio = _vs_official(free["tokens_per_s"], "sampling_cfg_free_b4_tokens_s", True)
        out.append((f"GPT sampling, batch 4, CFG-free, {dtype} (vs official, perf-notes)",
                    f"{free['tokens_per_s']:.0f} tokens/s", f"{theirs} tokens/s", ratio))
      if cfg:
        theirs, ratio = _vs_official(cfg["tokens_per_s"], "sampling_cfg_b4_tokens_s", True)
        out.append((f"GPT sampling, batch 4, CFG 2.0 (official: 1.5), {dtype}",
                    f"{cfg['tokens_per_s']:.0f} tokens/s", f"{theirs} tokens/s", ratio))
      for b in sorted({b for (d, b, _) in by if d == dtype}):
        if (dtype, b, 1.0) in by and (dtype, b, 2.0) in by:
          cost = by[(dtype, b, 2.0)]["median_s"] / by[(dtype, b, 1.0)]["median_s"]
          theirs = ""
          if (b, 1.0) in t_by and (b, 2.0) in t_by:
            theirs = f"{t_by[(b, 2.0)]['median_s'] / t_by[(b, 1.0)]['median_s']:.2f}"
          out.append((f"CFG time / CFG-free time, batch {b}, {dtype}", f"{cost:.2f}", theirs,
                      ""))
  return out


def table(results: dict, header: str) -> str:
  lines = [header, "", "| benchmark | vfmtok_jax | PyTorch / official | speed-up |",
           "|---|---|---|---|"]
  lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(results)]
  return "\n".join(lines)


def main():
  args = _parse()
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    raise SystemExit(f"--only: unknown {unknown}; choose from {sorted(BENCHMARKS)}")
  machine = f"{cpu_model()} ({cpu_features()}), {os.cpu_count()} CPUs"
  started = datetime.datetime.now(datetime.timezone.utc)
  results = {name: run_one(name, args.quick) for name in names}
  header = (f"{started:%Y-%m-%d}, {machine}; `python benchmarks/run_all.py"
            f"{' --quick' if args.quick else ''}`")
  print(table(results, header))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"date": started.isoformat(), "machine": machine, "quick": args.quick,
                 "official": OFFICIAL, "results": results,
                 "table": [dict(zip(("what", "ours", "theirs", "speed_up"), r))
                           for r in rows(results)]}, f, indent=1)


if __name__ == "__main__":
  main()
