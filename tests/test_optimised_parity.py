"""Golden parity on the programs users run: the suite compiles with most XLA optimisations off
(conftest, for compile time), so the tokenizer's and the GPT's golden tests run again here in a
child pytest with them on (fusion, algebraic simplification, layout changes)."""

import os
import pathlib
import subprocess
import sys

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
GOLDEN_TESTS = [
    "tests/test_tokenizer_golden.py",
    "tests/test_gpt.py::test_teacher_forced_logits_and_loss_match_golden",
    "tests/test_gpt.py::test_greedy_kv_cache_generation_matches_golden",
    "tests/test_optimised_parity.py::test_this_process_compiles_optimised",
]


def test_this_process_compiles_optimised():
  """Run alone, a check of the setting (the child below must run optimised programs)."""
  import jax  # pylint: disable=g-import-not-at-top
  want = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False")
  assert jax.config.read("jax_disable_most_optimizations") == want


def test_golden_parity_holds_on_the_optimised_programs():
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="0")
  run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        *GOLDEN_TESTS], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
  assert " passed" in run.stdout and "skipped" not in run.stdout and "deselected" not in \
      run.stdout, run.stdout[-3000:]
