"""benchmarks/run_all.py: the published table from the benchmarks' JSON (no timing here)."""

from benchmarks import run_all


def test_rows_compute_speed_ups_both_ways():
  results = {
      "deform_attn": {"ms": {"forward": {"jax": 10.0, "torch": 40.0},
                             "forward+backward": {"jax": 50.0, "torch": 25.0}}},
      "vfm": {"ours_f32_ms": 500.0, "torch_ms": 600.0, "ours_bf16_ms": 400.0,
              "ours_f32_xla_default_options_ms": 750.0},
      "gpt": {"peak_f32_gflops": 100.0,
              "train_step": {"float32": {"median_s": 0.5, "gflop": 25.0}},
              "sampling": [{"dtype": "float32", "batch": 4, "cfg": 1.0, "median_s": 1.0,
                            "tokens_per_s": 1152.0},
                           {"dtype": "float32", "batch": 64, "cfg": 1.0, "median_s": 3.0,
                            "tokens_per_s": 1.0},
                           {"dtype": "float32", "batch": 64, "cfg": 2.0, "median_s": 6.0,
                            "tokens_per_s": 1.0}],
              "torch": {"train_step": {"median_s": 0.6},
                        "sampling": [{"batch": 4, "cfg": 1.0, "median_s": 2.0,
                                      "tokens_per_s": 512.0},
                                     {"batch": 64, "cfg": 1.0, "median_s": 8.0,
                                      "tokens_per_s": 1.0},
                                     {"batch": 64, "cfg": 2.0, "median_s": 12.0,
                                      "tokens_per_s": 1.0}]}}}
  got = {r[0]: r[1:] for r in run_all.rows(results)}
  fwd = got["deformable attention forward (vs transformers, side by side)"]
  assert fwd == ("10.0 ms", "40.0 ms", "4.00x")
  assert got["deformable attention forward+backward (vs transformers, side by side)"][2] == \
      "0.50x"
  assert got["DINOv2-S/14 forward, batch 8, 224 px, f32 (vs transformers, side by side)"] == (
      "500 ms", "600 ms", "1.20x")
  assert got["same, f32, ours with XLA's default options (YNNPACK dot fusion on)"][2] == "0.80x"
  # 25 GFLOP in 0.5 s = 50 GFLOP/s of a 100 GFLOP/s peak; official 0.404-0.5 s.
  step = got["GPT train step, batch 4, float32 (vs official f32, perf-notes)"]
  assert step == ("0.500 s (50 % of the f32 peak)", "0.404-0.5 s", "0.81-1.00x")
  # Throughput: 1152 tokens/s against 385-576: 2x to 2.99x.
  free = got["GPT sampling, batch 4, CFG-free, float32 (vs official, perf-notes)"]
  assert free[2] == "2.00-2.99x"
  # Side by side: PyTorch's step 0.6 s against our 0.5 s; 1152 against 512 tokens/s.
  assert got["GPT train step, batch 4, float32 (vs PyTorch f32, side by side)"] == (
      "0.500 s (50 % of the f32 peak)", "0.600 s", "1.20x")
  assert got["GPT sampling, batch 4, CFG-free, float32 (vs PyTorch f32, side by side)"][2] == \
      "2.25x"
  # CFG costs 2x the CFG-free time in ours (6 s / 3 s) and 1.5x in PyTorch's (12 s / 8 s).
  assert got["CFG time / CFG-free time, batch 64, float32"][:2] == ("2.00", "1.50")
