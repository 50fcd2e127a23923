"""The GPT trainer on the training library: presets vs one device, resume, outputs, errors."""

import json
import os
import re
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import gpt as gpt_configs
from tests import equivalence
from tests.test_codes import _write_folder
from vfmtok_jax import gpt_io
from vfmtok_jax import tokenizer_io
from vfmtok_jax.data import codes as codes_lib
from vfmtok_jax.tasks import gpt as gpt_task
from vfmtok_jax.tasks import sampler
from vfmtok_jax.train import checkpoint as ckpt_lib
from vfmtok_jax.train import loop

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
LR = 1e-3
T, VOCAB, CLASSES = 16, 64, 4


@pytest.fixture(scope="module")
def codes_dir(tmp_path_factory):
  """48 examples x 2 variants: each class is a fixed sequence with a few random tokens."""
  rng = np.random.default_rng(0)
  base = rng.integers(0, VOCAB, (CLASSES, T))
  labels = np.arange(48) % CLASSES
  codes = np.stack([base[labels], base[labels][:, ::-1]], axis=1).copy()
  noise = rng.random(codes.shape) < 0.1
  codes[noise] = rng.integers(0, VOCAB, noise.sum())
  path = tmp_path_factory.mktemp("gptcodes")
  _write_folder(path, labels, codes, [20, 28])
  info = json.load(open(path / "codes.json"))
  info["codebook_size"] = VOCAB
  json.dump(info, open(path / "codes.json", "w"))
  return str(path)


def tiny_config(codes_dir, **overrides):
  c = gpt_configs.get_config("gpt_b,runlocal")
  c.model.update(vocab_size=VOCAB, num_classes=CLASSES, block_size=T, dim=32, num_layers=2,
                 num_heads=4, num_kv_heads=2, multiple_of=32, dtype="float32")
  c.data.codes = codes_dir
  c.data.held_out = 8
  c.optim.update(lr=LR, warmup_steps=0, decay="constant")
  c.eval_batch_size = 8
  c.async_checkpoint = False
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def _run_steps(config, devices, n, *, duplicate_half=False):
  task, program = gpt_task.build(config, devices)
  state = program.init(jax.random.PRNGKey(config.seed))
  it = codes_lib.CodesIterator(task.dataset, global_batch=config.batch_size, seed=config.seed,
                               examples=task._splits()[0])  # pylint: disable=protected-access
  losses, deltas = [], []
  for _ in range(n):
    batch = next(it)
    if duplicate_half:
      half = config.batch_size // 2
      batch = {k: np.concatenate([v[:half], v[:half]]) for k, v in batch.items()}
    batch = {k: jax.device_put(v, program.batch_shardings[k]) for k, v in batch.items()}
    before = jax.device_get(state.params)
    state, metrics = program.step(state, {}, batch)
    losses.append(float(metrics["loss"]))
    deltas.append(equivalence.updates(before, jax.device_get(state.params)))
  return program, losses, deltas


@pytest.fixture(scope="module")
def one_device_run(codes_dir):
  _, losses, deltas = _run_steps(tiny_config(codes_dir), jax.devices()[:1], 3)
  return losses, deltas


@pytest.mark.parametrize("preset,mesh", [("dp", dict(data=8, fsdp=1, tensor=1)),
                                         ("fsdp", dict(data=2, fsdp=4, tensor=1)),
                                         ("fsdp_tp", dict(data=2, fsdp=2, tensor=2))])
def test_presets_match_one_device(codes_dir, one_device_run, preset, mesh):
  cfg = tiny_config(codes_dir, sharding=preset, mesh=mesh)
  program, losses, deltas = _run_steps(cfg, jax.devices(), 3)
  assert equivalence.compare_runs(*one_device_run, losses, deltas, lr=LR, steps_per_interval=1,
                                  zero_grad=set()) == []
  specs = [s.spec for s in jax.tree.leaves(program.state_shardings.params)]
  if preset != "dp":
    assert any("fsdp" in spec for spec in specs)
  if preset == "fsdp_tp":
    assert any("tensor" in spec for spec in specs)


def test_equivalence_check_catches_a_data_parallel_bug(codes_dir, one_device_run):
  cfg = tiny_config(codes_dir, sharding="dp", mesh=dict(data=8, fsdp=1, tensor=1))
  _, losses, deltas = _run_steps(cfg, jax.devices(), 3, duplicate_half=True)
  problems = equivalence.compare_runs(*one_device_run, losses, deltas, lr=LR,
                                      steps_per_interval=1, zero_grad=set())
  assert any("losses differ" in p for p in problems), problems


def test_decay_mask_skips_norm_scales(codes_dir):
  task, _ = gpt_task.build(tiny_config(codes_dir), jax.devices()[:1])
  params = jax.eval_shape(lambda: task.model.init(jax.random.PRNGKey(0),
                                                  np.zeros((1, 3), np.int32),
                                                  np.zeros((1,), np.int32))["params"])
  mask = gpt_task.gpt_decay_mask(jax.tree.map(lambda x: np.zeros(x.shape),
                                              jax.device_get(params)))
  flat = {k: v for k, v in equivalence.flat(mask).items()}
  decayed = sorted(k for k, v in flat.items() if v)
  kept = sorted(k for k, v in flat.items() if not v)
  assert all("scale" in k for k in kept) and len(kept) == 3, kept
  assert any("tok_embeddings" in k for k in decayed) and any("wq" in k for k in decayed)


def test_train_resume_bitwise_and_export(codes_dir, tmp_path, capsys):
  straight = tiny_config(codes_dir)
  final = gpt_task.train(straight, str(tmp_path / "a"))
  out = capsys.readouterr().out
  assert "tokens/s" in out and "held-out loss=" in out
  assert final["eval_examples"] == 8 and np.isfinite(final["eval_loss"])
  sliced = tiny_config(codes_dir, max_steps_per_run=4)
  assert gpt_task.train(sliced, str(tmp_path / "b"))["stopped_at"] == 4
  gpt_task.train(sliced, str(tmp_path / "b"))
  model_a, params_a, meta = gpt_io.load_gpt(str(tmp_path / "a" / "gpt"))
  _, params_b, _ = gpt_io.load_gpt(str(tmp_path / "b" / "gpt"))
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert meta["tokenizer"]["codebook_size"] == VOCAB and model_a.num_kv_heads == 2
  tokens, _ = sampler.generate(model_a, params_a, np.arange(CLASSES), jax.random.PRNGKey(0))
  assert tokens.shape == (CLASSES, T)
  assert os.path.isfile(tmp_path / "a" / "metrics.jsonl")


def test_loss_falls_on_learnable_codes(codes_dir, tmp_path):
  cfg = tiny_config(codes_dir, total_steps=60, log_every=60, eval_every=60, ckpt_every=60,
                    **{"optim.lr": 5e-3})
  cfg.model.update(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
  cfg.eval_ema = False  # EMA 0.9999 barely moves in 60 steps
  final = gpt_task.train(cfg, str(tmp_path / "w"))
  assert final["eval_loss"] < final["eval_loss_start"] - 1.0, final


def test_mismatched_codes_are_refused(codes_dir):
  with pytest.raises(codes_lib.CodesError, match="vocab_size 128"):
    gpt_task.from_config(tiny_config(codes_dir, **{"model.vocab_size": 128}))
  with pytest.raises(codes_lib.CodesError, match="block_size 64"):
    gpt_task.from_config(tiny_config(codes_dir, **{"model.block_size": 64}))
  with pytest.raises(codes_lib.CodesError, match="held_out"):
    task = gpt_task.from_config(tiny_config(codes_dir, **{"data.held_out": 48}))
    task._splits()  # pylint: disable=protected-access


@pytest.mark.parametrize("key,value,message", [
    ("optim.lr", -1.0, "optim.lr=-1.0: the learning rate must be in (0, inf)"),
    ("optim.warmup_steps", -5, "optim.warmup_steps=-5: expected an integer >= 0"),
    ("optim.weight_decay", -0.1, "optim.weight_decay=-0.1: weight decay must be in [0, inf)"),
    ("optim.grad_clip", -1.0, "optim.grad_clip=-1.0: the gradient-norm clip (0: off) must be"),
    ("optim.b1", 1.0, "optim.b1=1.0: Adam's decay rate must be in [0, 1)"),
    ("ema_decay", 1.01, "ema_decay=1.01: the EMA decay must be in [0, 1]"),
    ("batch_size", 0, "batch_size=0: expected an integer >= 1"),
    ("total_steps", 0, "total_steps=0: expected an integer >= 1"),
])
def test_settings_that_make_no_sense_are_refused(codes_dir, key, value, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    gpt_task.from_config(tiny_config(codes_dir, **{key: value}))


class _PoisonedTask(gpt_task.GPTTask):
  """Test hook: a batch whose first label is -1 runs the real step on NaN params."""

  def train_step(self, state, constants, batch):
    poison = batch["label"][0] < 0
    nan_params = jax.tree.map(lambda p: jnp.where(poison, p * jnp.nan, p), state.params)
    new, metrics, ok = super().train_step(state.replace(params=nan_params), constants,
                                          dict(batch, label=jnp.maximum(batch["label"], 0)))
    return new, metrics, ok


def _poisoned(config, steps):
  base = gpt_task.from_config(config)
  task = _PoisonedTask(**{k: getattr(base, k) for k in (
      "model", "tx", "lr_fn", "ema_decay", "batch_size", "eval_batch_size", "seed")},
      data=base.data, sample_grid=base.grid, tokenizer_path="", eval_ema=base.eval_ema,
      export_ema=base.export_ema)
  plain = task.train_iterator

  def train_iterator(start, shardings):
    for step, batch in enumerate(plain(start, {"codes": None}), start + 1):
      if step in steps:
        batch = dict(batch, label=np.full_like(batch["label"], -1))
      yield {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
  task.train_iterator = train_iterator
  return task


def test_nonfinite_steps_are_skipped_then_stop(codes_dir, tmp_path):
  cfg = tiny_config(codes_dir, eval_every=0, log_every=1)
  final = gpt_task.train(cfg, str(tmp_path / "one"), task=_poisoned(cfg, {2}))
  assert final["nonfinite_total"] == 1 and np.isfinite(final["loss"])
  lines = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
  by_step = {l["step"]: l for l in lines if "loss" in l}
  assert not np.isfinite(by_step[2]["loss"])
  assert by_step[2]["param_norm"] == by_step[1]["param_norm"]  # the bad step changed nothing
  assert by_step[3]["param_norm"] != by_step[2]["param_norm"]
  cfg = tiny_config(codes_dir, eval_every=0, max_nonfinite_streak=1)
  with pytest.raises(loop.NonFiniteError, match="2 consecutive non-finite"):
    gpt_task.train(cfg, str(tmp_path / "many"), task=_poisoned(cfg, {3, 4, 5}))


def test_sigterm_saves_and_restart_continues(codes_dir, tmp_path):
  def start(*flags):
    return subprocess.Popen(
        [sys.executable, "-m", "vfmtok_jax.train_gpt", "--config",
         os.path.join(ROOT, "tests", "tiny_gpt_config.py"), "--workdir", str(tmp_path / "run"),
         f"--config.data.codes={codes_dir}", "--config.log_every=1", *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  proc = start("--config.total_steps=100000", "--config.ckpt_every=100000")
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, _ = proc.communicate(timeout=300)
  text = "".join(lines) + out
  assert proc.returncode == 0, text[-3000:]
  saved = int(text.split("SIGTERM: saved step ")[1].split(",")[0])
  assert saved >= 3
  proc = start(f"--config.total_steps={saved + 2}")
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f"step {saved + 2}/{saved + 2}" in out and f"step {saved}/" not in out


def _gpt_command(codes_dir, workdir, *flags, script=None):
  head = ["-m", "vfmtok_jax.train_gpt"] if script is None else [script, "gpt"]
  return [sys.executable, *head, "--config", os.path.join(ROOT, "tests", "tiny_gpt_config.py"),
          "--workdir", str(workdir), f"--config.data.codes={codes_dir}", *flags]


def test_sigkill_during_save_resumes_from_last_complete(codes_dir, tmp_path):
  """Killed while step 3's async save is being written: the half-written step is ignored, the
  run resumes from step 2 and finishes. (The tokenizer trainer's twin is a slow test.)"""
  flags = ["--config.total_steps=6", "--config.ckpt_every=1", "--config.async_checkpoint=True",
           "--config.log_every=1",
           "--config.eval_every=0"]
  killed = subprocess.run(
      _gpt_command(codes_dir, tmp_path / "run", *flags, "--kill_during_save=3",
                   script=os.path.join(ROOT, "tests", "kill_during_save.py")),
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stdout[-3000:] + killed.stderr[-3000:]
  ckpt_dir = tmp_path / "run" / "ckpt"
  assert any(n.startswith("3.") and "tmp" in n for n in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
  rerun = subprocess.run(_gpt_command(codes_dir, tmp_path / "run", *flags), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
  out = rerun.stdout + rerun.stderr
  assert rerun.returncode == 0, out[-3000:]
  assert "step 3/6" in out and "step 2/6" not in out, out[-3000:]
  assert f"resuming from step 2 of {ckpt_dir}" in rerun.stdout, rerun.stdout[-3000:]
  assert "CheckpointManager" not in out and "_NonBlockingMetadataStore" not in out  # Orbax INFO
  with ckpt_lib.Checkpointer(str(ckpt_dir), save_every=1) as ckpt:
    assert ckpt.latest_step() == 6


def test_mismatched_checkpoint_fails_before_writing(codes_dir, tmp_path):
  """A checkpoint of another model size: an error naming the first mismatching array, the
  workdir byte for byte as it was, and a clean exit (no checkpoint-thread tracebacks)."""
  run = tmp_path / "run"
  first = subprocess.run(_gpt_command(codes_dir, run, "--config.total_steps=2"), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  second = subprocess.run(_gpt_command(codes_dir, run, "--config.total_steps=4",
                                       "--config.model.dim=64"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  out = second.stdout + second.stderr
  assert second.returncode == 1
  assert "Traceback" not in out and second.stderr.strip().splitlines()[-1].startswith(
      "error: "), out[-3000:]
  assert "stored shape" in out and "requested" in out, out[-3000:]
  assert "Event loop is closed" not in out and "Exception ignored" not in out, out[-3000:]
  assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_users_mistake_ends_with_one_line(codes_dir, tmp_path):
  """Bad settings and a missing codes folder: exit status 1, the message as the last line of
  stderr, no traceback (`--verbosity=1` shows it), nothing written."""
  for flags, message in [(["--config.optim.lr=-1"], "error: optim.lr=-1.0: the learning rate"),
                         (["--config.data.codes="], "error: data.codes is not set")]:
    run = subprocess.run(_gpt_command(codes_dir, tmp_path / "run", *flags), cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(message), run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not (tmp_path / "run").exists()
  verbose = subprocess.run(_gpt_command(codes_dir, tmp_path / "run", "--config.optim.lr=-1",
                                        "--verbosity=1"),
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert verbose.returncode == 1 and "Traceback" in verbose.stderr, verbose.stderr[-3000:]


def test_sample_grids_decode_with_the_tokenizer_that_made_the_codes(golden_tokenizer, tmp_path):
  """`tokenizer` (sample grids) must be the one the codes folder records, by its codebook's
  fingerprint: one with the same sizes but another codebook is refused."""
  tok_path, tok = golden_tokenizer
  k, t = tok.model.codebook_size, tok.model.num_queries
  labels = np.arange(8) % CLASSES
  codes = np.random.default_rng(0).integers(0, k, (8, 1, t))
  for name, fingerprint in [("same", tokenizer_io.fingerprint(tok)), ("other", "0" * 16)]:
    folder = tmp_path / name
    _write_folder(folder, labels, codes, [8])
    info = json.load(open(folder / "codes.json"))
    info.update(codebook_size=k, tokenizer={"path": "/somewhere/tok", "fingerprint": fingerprint})
    json.dump(info, open(folder / "codes.json", "w"))
    config = tiny_config(str(folder), tokenizer=tok_path, **{
        "model.vocab_size": k, "model.block_size": t, "data.held_out": 0})
    if name == "same":
      gpt_task.from_config(config)
    else:
      with pytest.raises(ValueError, match=f"tokenizer {tok_path} did not make the codes in "
                         f"{folder}.*/somewhere/tok, codebook fingerprint 0000"):
        gpt_task.from_config(config)
