"""The README's main command end to end at its smoke size (`--runlocal`): all four stages."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def test_demo_runs_all_four_stages(tmp_path):
  """~1.5 min here with a cold compilation cache (the tokenizer stage's compiles: ~60 s)."""
  work = tmp_path / "demo"
  env = dict(os.environ, XLA_FLAGS="")  # one CPU device, as a user's run
  run = subprocess.run([sys.executable, "-m", "vfmtok_jax.demo", "--runlocal",
                        "--samples_per_class=1", "--workdir", str(work)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  for stage in ("1/4 tokenizer", "2/4 codes", "3/4 GPT", "4/4 samples"):
    assert f"=== {stage}" in run.stdout, stage
  assert "24 crops x 2 variants x 64 codes" in run.stdout
  assert (work / "tokenizer" / "export" / "tokenizer.json").is_file()
  assert (work / "gpt" / "gpt" / "gpt.json").is_file() and (work / "samples.png").is_file()
  with np.load(work / "samples.npz") as f:
    assert f["indices_cfg"].shape == (12, 64) and f["labels"].tolist() == list(range(12))
  report = json.loads((work / "demo_report.json").read_text())
  assert np.isfinite(report["eval_loss"]) and report["total_s"] > 0
  assert "Traceback" not in run.stderr
