"""`python -m vfmtok_jax.sample`: the golden GPT decoded by the golden tokenizer; bad inputs."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from vfmtok_jax import compute_dtype
from vfmtok_jax import tokenizer_io as tok_io
from vfmtok_jax.tasks import sampler

ROOT = str(pathlib.Path(__file__).resolve().parents[1])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _sample(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "vfmtok_jax.sample", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, check=False)


def test_sample_command_writes_tokens_images_and_grid(golden_gpt, golden_tokenizer, tmp_path):
  gpt_dir, model, params = golden_gpt
  tok_dir, tok = golden_tokenizer
  out = tmp_path / "s.npz"
  result = _sample("--gpt", gpt_dir, "--tokenizer", tok_dir, "--labels", "3,7,7,1,0",
                   "--cfg", "2.0", "--top_k", "1", "--batch_size", "2", "--out", str(out),
                   "--dtype", "float32")  # auto would pick bf16 on a CPU with AMX
  assert result.returncode == 0, result.stderr[-3000:]
  assert "tokens/s" in result.stdout and "images/s" in result.stdout
  with np.load(out) as f:
    got = {k: f[k] for k in f.files}
  want, _ = sampler.generate(model, params, np.array([3, 7, 7, 1, 0]), jax.random.PRNGKey(0),
                             sampler.SamplingSettings(cfg_scale=2.0, top_k=1))
  # Exact: draws use one uniform per (row, token); batches of 2 round the logits differently by
  # ~1e-6, which moves a token only if that number falls within ~1e-6 of a CDF step.
  np.testing.assert_array_equal(got["indices"], want)  # batches of 2 change nothing
  np.testing.assert_array_equal(got["labels"], [3, 7, 7, 1, 0])
  assert got["arr_0"].shape == (5, 32, 32, 3) and got["arr_0"].dtype == np.uint8
  decoded = np.clip(np.asarray(tok.decode_indices(want)) * 127.5 + 128, 0, 255).astype(np.uint8)
  # Decoded in batches of 2 vs 5: float reorderings can move a pixel across a uint8 boundary.
  np.testing.assert_allclose(got["arr_0"].astype(int), decoded.astype(int), atol=1)
  assert (got["arr_0"] != decoded).mean() < 1e-3
  assert (tmp_path / "s.png").is_file()


def test_sample_command_refuses_bad_labels(golden_gpt, tmp_path):
  result = _sample("--gpt", golden_gpt[0], "--labels", "3,10", "--out", str(tmp_path / "x.npz"))
  assert result.returncode == 1 and "outside the GPT's 10 classes" in result.stderr
  assert "Traceback" not in result.stderr  # one line, not a traceback around it
  assert not (tmp_path / "x.npz").exists()


def test_choose_labels():
  assert sampler.choose_labels(labels="", num=3, per_class=True, num_classes=2,
                              seed=0).tolist() == [0, 0, 0, 1, 1, 1]
  a = sampler.choose_labels(labels="", num=500, per_class=False, num_classes=10, seed=1)
  assert a.min() == 0 and a.max() == 9 and len(set(a.tolist())) == 10
  with pytest.raises(ValueError, match="exactly one"):
    sampler.choose_labels(labels="1", num=2, per_class=False, num_classes=10, seed=0)
  with pytest.raises(ValueError, match="integers"):
    sampler.choose_labels(labels="1,x", num=0, per_class=False, num_classes=10, seed=0)


def test_gpt_and_tokenizer_must_match(golden_gpt, golden_tokenizer):
  _, model, _ = golden_gpt
  _, tok = golden_tokenizer
  sampler.check_pair({}, model, tok)
  with pytest.raises(ValueError, match="vocabulary"):
    sampler.check_pair({}, model.clone(vocab_size=256), tok)
  with pytest.raises(ValueError, match="tokens"):
    sampler.check_pair({}, model.clone(block_size=64), tok)
  with pytest.raises(ValueError, match="another tokenizer"):
    sampler.check_pair({"tokenizer": {"fingerprint": "0" * 16, "path": "x"}}, model, tok)
  sampler.check_pair({"tokenizer": {"fingerprint": tok_io.fingerprint(tok)}}, model, tok)


def test_decoding_resizes_like_the_reference(golden_tokenizer, tokenizer_io):
  """`decode_codes_to_img(indices, 48)` of the official code: decode, bicubic 32 -> 48, uint8."""
  _, tok = golden_tokenizer
  indices = tokenizer_io["indices"].astype(np.int32)
  for size, name in ((32, "codes_to_img_uint8"), (48, "codes_to_img_uint8_48")):
    got = sampler.decode_to_uint8(tok, indices, size, batch_size=1)
    want = tokenizer_io[name]
    assert got.shape == want.shape
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)  # truncation edges
    assert (got != want).mean() < 0.01
  assert sampler.output_size(tok, 0) == 32 and sampler.output_size(tok, 64) == 64


def run_processes(args, *, processes: int = 2, devices_each: int, tmp_path) -> list[str]:
  """`python ARGS` as a `processes`-process CPU cluster on loopback (`devices_each` devices per
  process); asserts every one exits 0 and returns their outputs."""
  port = _free_port()
  base = dict(os.environ, JAX_PLATFORMS="cpu",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_each}")
  # A multi-process executable must not be confused with a 1-process one in the persistent cache.
  cache = os.path.join(os.environ.get("JAX_COMPILATION_CACHE_DIR", str(tmp_path)),
                       f"{processes}_processes")
  procs = [subprocess.Popen(
      [sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True,
      env=dict(base, VFMTOK_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i),
               VFMTOK_CPU_COLLECTIVES="gloo", JAX_COMPILATION_CACHE_DIR=cache))
      for i in range(processes)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_two_processes_sample_what_one_samples(golden_gpt, tmp_path):
  """The batch sharded over 2 processes x 2 devices draws exactly the one-process samples."""
  args = ["--gpt", golden_gpt[0], "--labels", "0,1,2,3,4,5,6,7,8,9,1,2", "--cfg", "2.0",
          "--top_k", "50", "--top_p", "0.9", "--seed", "3", "--batch_size", "8"]
  outs = run_processes(["-m", "vfmtok_jax.sample", *args, "--out", str(tmp_path / "two.npz")],
                       devices_each=2, tmp_path=tmp_path)
  one = _sample(*args, "--out", str(tmp_path / "one.npz"))
  assert one.returncode == 0, one.stderr[-3000:]
  want = "compute dtype " + compute_dtype.auto("cpu")[0]  # --dtype auto says what it chose
  assert want in one.stdout and all(want in out for out in outs), one.stdout[-2000:]
  with np.load(tmp_path / "two.npz") as a, np.load(tmp_path / "one.npz") as b:
    np.testing.assert_array_equal(a["indices"], b["indices"])
    np.testing.assert_array_equal(a["labels"], b["labels"])


def test_batches_that_do_not_divide_the_devices_are_padded(golden_gpt):
  """13 labels on 8 devices, in batches of 5, 13 and 1: each batch rounds up to a multiple of 8
  (every device works) and the padding rows are dropped; row i's randomness is keyed by i, so
  every split gives each row the tokens `generate` gives that row alone."""
  _, model, params = golden_gpt
  assert jax.device_count() == 8
  assert [sampler.padded_batch(b, 13, 8) for b in (5, 13, 1, 64)] == [8, 16, 8, 16]
  labels = np.arange(13, dtype=np.int32) % 10
  settings = sampler.SamplingSettings(cfg_scale=2.0, top_k=20)
  key = jax.random.PRNGKey(4)
  alone = np.concatenate([np.asarray(sampler.generate(
      model, params, labels[i:i + 1], key, settings, row_ids=np.array([i], np.int32))[0])
      for i in range(13)])
  assert len(np.unique(alone, axis=0)) == 13  # distinct rows: a doubled row would show
  # Timed rows: those after the first (compiling) call, padding not counted.
  for batch_size, timed in ((5, 5), (13, 13), (1, 5)):
    tokens, _, _, rows = sampler.generate_all(model, params, labels, settings, seed=4,
                                              batch_size=batch_size)
    assert rows == timed
    np.testing.assert_array_equal(tokens, alone, err_msg=f"batch_size {batch_size}")
  with pytest.raises(ValueError, match="does not split over 8 devices"):
    sampler.shardings(jax.devices(), 12)


def test_compute_dtype_follows_the_hardware(tmp_path):
  """bf16 where it runs natively (TPU, GPU, CPUs with AMX tiles), float32 elsewhere; the CPU's
  flags read from /proc/cpuinfo's format."""
  assert compute_dtype.auto("tpu")[0] == compute_dtype.auto("gpu")[0] == "bfloat16"
  assert compute_dtype.auto("cpu", {"avx512f", "amx_bf16", "amx_tile"})[0] == "bfloat16"
  assert compute_dtype.auto("cpu", {"avx512f", "avx512_bf16"})[0] == "float32"
  info = tmp_path / "cpuinfo"
  info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512_bf16\n\nprocessor\t: 1\n")
  assert compute_dtype.cpu_flags(str(info)) == {"fpu", "sse2", "avx512_bf16"}
  assert compute_dtype.cpu_flags(str(tmp_path / "absent")) == set()
