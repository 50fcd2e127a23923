"""The tokenizer trainer on the training library: sharding presets, resume, preemption, faults,
failed starts, errors, outputs."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import equivalence
from tests import tiny_training
from vfmtok_jax import sharding as shd
from vfmtok_jax import tokenizer_io
from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.tasks import tokenizer as tokenizer_task
from vfmtok_jax.train import checkpoint as ckpt_lib
from vfmtok_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 1e-4
OPT = {"optim.warmup_steps": 0, "optim.lr": LR, "optim.decay": "constant"}


def _batches(config, n, sharding, *, duplicate_half=False):
  it = input_pipeline.make_train_iterator(config.input, global_batch_size=config.batch_size,
                                          seed=config.seed)
  out = []
  for _ in range(n):
    b = next(it)
    if duplicate_half:  # a data-parallel bug: the second half of the devices see the first's data
      half = len(b["image"]) // 2
      b = {k: np.concatenate([v[:half], v[:half]]) for k, v in b.items()}
    out.append(input_pipeline.to_global(b, sharding))
  return out


def _run_steps(config, devices, n, *, task=None, duplicate_half=False):
  """Per-step losses and per-step param updates of `n` steps from the seed's init."""
  task, program = tokenizer_task.build(config, devices, task)
  consts = jax.device_put(task.load_constants(), program.constant_shardings)
  state = task.init_from_data(program, program.init(jax.random.PRNGKey(config.seed)), consts)
  losses, deltas = [], []
  for batch in _batches(config, n, program.batch_shardings["image"],
                        duplicate_half=duplicate_half):
    before = jax.device_get(state.params)
    state, metrics = program.step(state, consts, batch)
    losses.append(float(metrics["loss"]))
    deltas.append(equivalence.updates(before, jax.device_get(state.params)))
  return program, losses, deltas


@pytest.fixture(scope="module")
def zero_grad(tmp_path_factory):
  return equivalence.tokenizer_zero_gradient_paths(
      tiny_training.tiny_config(tmp_path_factory.mktemp("zg"), **OPT))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  config = tiny_training.tiny_config(tmp_path_factory.mktemp("one"), **OPT)
  _, losses, deltas = _run_steps(config, jax.devices()[:1], 3)
  return losses, deltas


@pytest.mark.parametrize("preset,mesh", [("dp", dict(data=8, fsdp=1, tensor=1)),
                                         ("fsdp", dict(data=2, fsdp=4, tensor=1)),
                                         ("fsdp_tp", dict(data=2, fsdp=2, tensor=2))])
def test_presets_match_one_device(tmp_path, preset, mesh, one_device_run, zero_grad):
  cfg = tiny_training.tiny_config(tmp_path, sharding=preset, mesh=mesh, **OPT)
  program, losses, deltas = _run_steps(cfg, jax.devices(), 3)
  assert equivalence.compare_runs(*one_device_run, losses, deltas, lr=LR, steps_per_interval=1,
                                  zero_grad=zero_grad) == []
  specs = [s.spec for s in jax.tree.leaves(program.state_shardings.params)]
  if preset == "dp":
    assert all(all(a is None for a in spec) for spec in specs)
  else:
    assert any("fsdp" in spec for spec in specs)
  if preset == "fsdp_tp":
    assert any("tensor" in spec for spec in specs)


def test_program_lowers_from_shapes_alone(tmp_path):
  """The step compiles for a mesh from a VFM without weights (what an AOT planner does)."""
  cfg = tiny_training.tiny_config(tmp_path, sharding="fsdp", mesh=dict(data=2, fsdp=4, tensor=1))
  vfm = vfm_zoo.load_vfm(cfg.vfm.source, num_heads=cfg.vfm.num_heads)
  task = tokenizer_task.from_config(cfg, vfm=dataclasses.replace(vfm, params=None))
  _, program = tokenizer_task.build(cfg, task=task)
  compiled = program.lower().compile()
  assert compiled.cost_analysis()["flops"] > 0
  assert compiled.memory_analysis().argument_size_in_bytes > 0
  with pytest.raises(TypeError):
    task.load_constants()["vfm"]["cls_token"]  # nothing was loaded


def _drop_gradient(path_fragment):
  """An optax transform that zeroes the gradient of the leaves whose path contains the text."""
  def init(params):
    del params
    return optax.EmptyState()

  def update(grads, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda p, g: jnp.zeros_like(g) if path_fragment in jax.tree_util.keystr(p) else g,
        grads), state
  return optax.GradientTransformation(init, update)


@pytest.mark.slow  # shows the preset comparison can fail; CI runs the comparison itself
def test_equivalence_check_catches_wrong_variants(tmp_path, one_device_run, zero_grad):
  """The comparison above has teeth: a dropped gradient and a data-parallel bug both fail it."""
  cfg = tiny_training.tiny_config(tmp_path, sharding="fsdp", mesh=dict(data=2, fsdp=4, tensor=1),
                                  **OPT)
  task = tokenizer_task.from_config(cfg)
  task.tx = optax.chain(_drop_gradient("carrier_tokens"), task.tx)
  _, losses, deltas = _run_steps(cfg, jax.devices(), 3, task=task)
  problems = equivalence.compare_runs(*one_device_run, losses, deltas, lr=LR,
                                      steps_per_interval=1, zero_grad=zero_grad)
  assert any("carrier_tokens" in p for p in problems), problems
  _, losses, deltas = _run_steps(cfg, jax.devices(), 3, duplicate_half=True)
  problems = equivalence.compare_runs(*one_device_run, losses, deltas, lr=LR,
                                      steps_per_interval=1, zero_grad=zero_grad)
  assert any("losses differ" in p for p in problems), problems


def _restore(config, workdir):
  _, program = tokenizer_task.build(config)
  with ckpt_lib.Checkpointer(os.path.join(workdir, "ckpt"), save_every=2) as ckpt:
    return ckpt.restore(program.abstract_state)


def test_resume_is_bitwise(tmp_path):
  straight = tiny_training.tiny_config(tmp_path)
  tokenizer_task.train(straight, str(tmp_path / "a"))
  sliced = tiny_training.tiny_config(tmp_path, max_steps_per_run=2)
  assert tokenizer_task.train(sliced, str(tmp_path / "b"))["stopped_at"] == 2
  assert tokenizer_task.train(sliced, str(tmp_path / "b"))["stopped_at"] == 4
  a, meta_a = _restore(straight, str(tmp_path / "a"))
  b, meta_b = _restore(straight, str(tmp_path / "b"))
  assert meta_a["step"] == meta_b["step"] == 4 and meta_b["data_position"] == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))
  assert int(a.step) == 4 and int(a.nonfinite_total) == 0


def test_outputs_logs_images_export(tmp_path):
  cfg = tiny_training.tiny_config(tmp_path, eval_every=2)
  cfg.eval_scorers.update(fd_vfm=cfg.vfm.source, fd_size=28)  # the evaluation job's FD-VFM
  final = tokenizer_task.train(cfg, str(tmp_path / "run"))
  run = tmp_path / "run"
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [1, 2, 3, 4]
  last = train_lines[-1]
  for key in ("loss_rec", "loss_vq", "loss_commit", "loss_semantic", "codebook_usage",
              "steps_per_sec", "eta_sec", "lr", "grad_norm", "param_norm"):
    assert np.isfinite(last[key]), key
  # The total is the weighted sum of the logged terms (all weights 1 in this config).
  assert last["loss"] == pytest.approx(last["loss_rec"] + last["loss_vq"] + last["loss_commit"]
                                       + last["loss_semantic"], rel=1e-5)
  assert last["eta_sec"] == 0 and train_lines[0]["eta_sec"] > 0
  # Dead-code restarts (window 2) are counted, and never-used codes at each eval.
  assert last["codebook_restarted_total"] >= last["codebook_restarted"] > 0
  evals = {l["step"]: l for l in lines if "eval_psnr" in l}
  assert set(evals) == {0, 2, 4}
  assert evals[4]["eval_codebook_unused"] == 64 * (1 - evals[4]["eval_codebook_usage"])
  # Usage and perplexity at step 4 from the exported (final, non-EMA) tokenizer's codes of the
  # 12 held-out crops, computed here: the codes are an argmin over f32 distances that another
  # batch split may flip at a near-tie, so allow one code's worth (a wrong count, set or
  # formula moves them by far more).
  tok = tokenizer_io.load_tokenizer(final["export"])
  codes = np.concatenate([np.asarray(tok.encode(np.asarray(b["image"])[np.asarray(b["_mask"])]))
                          for b in input_pipeline.make_eval_batches(cfg.input,
                                                                    global_batch_size=8)])
  assert codes.shape == (12, 4)
  freq = np.bincount(codes.ravel(), minlength=64) / codes.size
  nz = freq[freq > 0]
  assert abs(evals[4]["eval_codebook_usage"] - (freq > 0).mean()) <= 1 / 64 + 1e-9
  np.testing.assert_allclose(evals[4]["eval_codebook_perplexity"],
                             np.exp(-(nz * np.log(nz)).sum()), rtol=0.1)
  assert 0 < evals[4]["eval_ssim"] < evals[4]["eval_ssim_reference"] <= 1  # range 1 vs 2.0
  assert np.isfinite(evals[4]["eval_fd_vfm"]) and "eval_rfid" not in evals[4]  # Inception off
  assert sorted(os.listdir(run / "images")) == ["recon_000000.png", "recon_000002.png",
                                                "recon_000004.png"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
  assert final["eval_examples"] == 12  # one held-out crop per bundled photo
  assert json.loads((run / "config.json").read_text())["total_steps"] == 4
  tok = tokenizer_io.load_tokenizer(final["export"])
  images = np.asarray(input_pipeline.make_eval_batches(cfg.input, global_batch_size=8)
                      .__iter__().__next__()["image"])
  # The export is a working tokenizer holding the final params.
  recon = np.asarray(tok.decode_indices(tok.encode(images)))
  assert recon.shape == images.shape
  state, _ = _restore(cfg, str(run))
  np.testing.assert_array_equal(jax.tree.leaves(tok.params)[0],
                                jax.tree.leaves(jax.device_get(state.params))[0])


def _with_nan_batches(config, steps):
  """The config's task, its batches at the given (1-based) steps made NaN."""
  task = tokenizer_task.from_config(config)
  batches = task.train_iterator

  def train_iterator(start, shardings):
    for step, batch in enumerate(batches(start, shardings), start + 1):
      yield dict(batch, image=batch["image"] * jnp.nan) if step in steps else batch
  task.train_iterator = train_iterator
  return task


def test_kmeans_init_refuses_nonfinite_encoder_outputs(tmp_path):
  # k-means reads the first batches: NaN ones make it refuse to start.
  cfg = tiny_training.tiny_config(tmp_path)
  with pytest.raises(FloatingPointError, match="kmeans_init: the encoder outputs of the first 8"):
    tokenizer_task.train(cfg, str(tmp_path / "kmeans"), task=_with_nan_batches(cfg, {2}))


@pytest.mark.slow  # the loop's guard is tested fast in test_train_lib.py and test_train_gpt.py
def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  cfg = tiny_training.tiny_config(tmp_path, **{"codebook.kmeans_init": False})
  final = tokenizer_task.train(cfg, str(tmp_path / "one"), task=_with_nan_batches(cfg, {2}))
  assert final["nonfinite_total"] == 1 and np.isfinite(final["loss"])
  lines = [json.loads(l) for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
  by_step = {l["step"]: l for l in lines if "loss" in l}
  assert not np.isfinite(by_step[2]["loss"]) and by_step[2]["nonfinite_streak"] == 1
  # The skipped step changed no parameter: its param norm is the one after step 1.
  assert by_step[2]["param_norm"] == by_step[1]["param_norm"]
  assert by_step[3]["param_norm"] != by_step[2]["param_norm"]
  cfg = tiny_training.tiny_config(tmp_path, total_steps=6, max_nonfinite_streak=1,
                                  **{"codebook.kmeans_init": False})
  with pytest.raises(loop.NonFiniteError, match="2 consecutive non-finite"):
    tokenizer_task.train(cfg, str(tmp_path / "many"), task=_with_nan_batches(cfg, {3, 4, 5}))
  with ckpt_lib.Checkpointer(str(tmp_path / "many" / "ckpt"), save_every=2) as ckpt:
    assert max(ckpt.all_steps()) == 2  # the last good checkpoint stays; nothing after the failure


def _subprocess_train(workdir, config_flags, *, script=None, extra=()):
  cmd = [sys.executable, *(["-m", "vfmtok_jax.train_tokenizer"] if script is None
                           else [script, "tokenizer"]),
         "--config", os.path.join(ROOT, "tests", "tiny_training_config.py"),
         "--workdir", str(workdir), *config_flags, *extra]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


@pytest.mark.slow  # the loop's twin: tests/test_train_gpt.py
def test_sigterm_saves_and_restart_continues(tmp_path):
  vfm = tiny_training.golden_vfm_file(tmp_path)
  flags = [f"--config.vfm.source={vfm}", "--config.total_steps=1000", "--config.ckpt_every=1000"]
  proc = _subprocess_train(tmp_path / "run", flags)
  lines = []
  for line in proc.stdout:
    lines.append(line)
    if line.startswith("step 3/"):
      proc.send_signal(signal.SIGTERM)
      break
  out, _ = proc.communicate(timeout=300)
  lines.append(out)
  assert proc.returncode == 0, "".join(lines)[-3000:]
  text = "".join(lines)
  assert "SIGTERM: saved step" in text
  saved = int(text.split("SIGTERM: saved step ")[1].split(",")[0])
  assert saved >= 3
  with ckpt_lib.Checkpointer(str(tmp_path / "run" / "ckpt"), save_every=1) as ckpt:
    assert ckpt.latest_step() == saved  # ckpt_every=1000: Orbax's first save, then this one
  proc = _subprocess_train(tmp_path / "run", flags[:1] + [f"--config.total_steps={saved + 2}"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f"step {saved + 2}/{saved + 2}" in out
  assert f"step {saved}/" not in out and "step 1/" not in out


@pytest.mark.slow  # the loop's twin: tests/test_train_gpt.py
def test_sigkill_during_save_resumes_from_last_complete(tmp_path):
  vfm = tiny_training.golden_vfm_file(tmp_path)
  flags = [f"--config.vfm.source={vfm}", "--config.total_steps=6", "--config.ckpt_every=1",
           "--config.async_checkpoint=True"]
  proc = _subprocess_train(tmp_path / "run", flags,
                           script=os.path.join(ROOT, "tests", "kill_during_save.py"),
                           extra=["--kill_during_save=3"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  ckpt_dir = tmp_path / "run" / "ckpt"
  assert any(n.startswith("3.") and "tmp" in n for n in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
  with ckpt_lib.Checkpointer(str(ckpt_dir), save_every=1) as ckpt:
    assert ckpt.latest_step() == 2
  proc = _subprocess_train(tmp_path / "run", flags)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "step 3/6" in out and "step 2/6" not in out
  with ckpt_lib.Checkpointer(str(ckpt_dir), save_every=1) as ckpt:
    assert ckpt.latest_step() == 6


@pytest.mark.slow  # the loop's twin: tests/test_train_gpt.py
def test_mismatched_checkpoint_fails_before_writing(tmp_path):
  """A checkpoint of another model config: a clear error naming the first mismatching array,
  the workdir exactly as it was, and a clean exit (no checkpoint-thread tracebacks)."""
  vfm = tiny_training.golden_vfm_file(tmp_path)
  run = tmp_path / "run"
  proc = _subprocess_train(run, [f"--config.vfm.source={vfm}", "--config.total_steps=2"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  proc = _subprocess_train(run, [f"--config.vfm.source={vfm}", "--config.total_steps=4",
                                 "--config.model.dim=48"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode != 0
  assert "error: checkpoint" in out and "does not match this run's train state" in out, \
      out[-3000:]
  assert ("ema_params/decode_transformer/cls_token: stored shape (1, 1, 32), requested "
          "(1, 1, 48)") in out, out[-3000:]
  assert "Event loop is closed" not in out and "Exception ignored" not in out, out[-3000:]
  after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
  assert after == before


def test_discriminator_and_restart_state_live_side_by_side(tmp_path):
  """Shapes only (no DINO weights offline): both keep their state through a step."""
  cfg = tiny_training.tiny_config(tmp_path, **{"disc.enabled": True})
  task = tokenizer_task.from_config(cfg)
  state = nn.unbox(jax.eval_shape(task.init_state, jax.random.PRNGKey(0)))
  assert set(state.extra) == {"code_age", "codes_restarted", "disc_params", "disc_opt_state",
                              "disc_spectral"}
  new, metrics, _ = jax.eval_shape(task.train_step, state, nn.unbox(task.abstract_constants()),
                                   dict(task.batch_shapes()))
  assert jax.tree.structure(new) == jax.tree.structure(state)
  assert {"loss_disc", "codebook_restarted", "codebook_restarted_total"} <= set(metrics)
  # The discriminator's norm groups and crops follow the devices the batch is split over.
  assert task.disc.batch_groups == 8
  assert tokenizer_task.from_config(cfg, batch_shards=2).disc.batch_groups == 2
  glob = tiny_training.tiny_config(tmp_path, **{"disc.enabled": True,
                                                "disc.norm_groups": "global"})
  assert tokenizer_task.from_config(glob).disc.batch_groups == 1
  with pytest.raises(ValueError, match="disc.norm_groups 'local'"):
    tokenizer_task.from_config(tiny_training.tiny_config(
        tmp_path, **{"disc.enabled": True, "disc.norm_groups": "local"}))


@pytest.mark.parametrize("encoder_init", ["copies", "independent"])
def test_encoder_layers_and_projectors_start_as_copies(tmp_path, encoder_init):
  cfg = tiny_training.tiny_config(tmp_path, encoder_init=encoder_init,
                                  **{"model.encoder_depth": 2})
  task = tokenizer_task.from_config(cfg)
  enc = jax.jit(lambda k: nn.unbox(task.init_state(k)).params)(
      jax.random.PRNGKey(0))["encode_transformer"]
  same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(enc[a]),
                                                                 jax.tree.leaves(enc[b])))
  pairs = [("layers_0", "layers_1")] + [("projectors_0", f"projectors_{i}") for i in (1, 2, 3)]
  assert [same(a, b) for a, b in pairs] == [encoder_init == "copies"] * 4


def test_clear_errors(tmp_path):
  with pytest.raises(shd.MeshError, match="does not divide 8 devices"):
    tokenizer_task.build(tiny_training.tiny_config(tmp_path, mesh=dict(data=3, fsdp=-1,
                                                                         tensor=1)))
  with pytest.raises(shd.MeshError, match="global batch 6 is not divisible"):
    tokenizer_task.build(tiny_training.tiny_config(tmp_path, batch_size=6))
  with pytest.raises(shd.MeshError, match="unknown sharding preset 'fsdb'"):
    tokenizer_task.build(tiny_training.tiny_config(tmp_path, sharding="fsdb"))
  cfg = tiny_training.tiny_config(tmp_path, **{"loss.perceptual_weight": 1.0,
                                               "loss.lpips_path": ""})
  with pytest.raises(FileNotFoundError, match="lpips_vgg16.safetensors"):
    tokenizer_task.train(cfg, str(tmp_path / "lpips"))
  assert not os.path.exists(tmp_path / "lpips" / "config.json")
  for key, value, message in [("optim.lr", -1.0, "the learning rate must be in (0, inf)"),
                              ("disc.b2", 1.0, "Adam's decay rate must be in [0, 1)"),
                              ("ema_decay", 1.5, "the EMA decay must be in [0, 1]")]:
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}: {message}")):
      tokenizer_task.from_config(tiny_training.tiny_config(tmp_path, **{key: value,
                                                                        "disc.enabled": True}))
  with pytest.raises(ValueError, match="codebook.kmeans_batches=1 gives 32 encoder outputs"):
    tokenizer_task.from_config(tiny_training.tiny_config(tmp_path,
                                                         **{"codebook.kmeans_batches": 1}))
  with pytest.raises(ValueError, match="encoder_init 'copy'"):
    tokenizer_task.from_config(tiny_training.tiny_config(tmp_path, encoder_init="copy"))
  with pytest.raises(ValueError, match="matmul_precision 'tf32'"):
    tokenizer_task.build(tiny_training.tiny_config(tmp_path, matmul_precision="tf32"))
  with pytest.raises(ValueError, match="nosuchset"):
    tokenizer_task.train(tiny_training.tiny_config(
        tmp_path, **{"input.dataset": "tfds:nosuchset"}), str(tmp_path / "x"))


def test_corrupt_image_stops_or_is_counted(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path / "folder"
  rng = np.random.default_rng(0)
  for cls in ("a", "b"):
    (root / "train" / cls).mkdir(parents=True)
    for i in range(4):
      Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(
          root / "train" / cls / f"{i}.png")
  (root / "train" / "b" / "broken.png").write_bytes(b"\x89PNG\r\n truncated")
  cfg = tiny_training.tiny_config(tmp_path, **{"input.dataset": f"folder:{root}"})
  with pytest.raises(input_pipeline.CorruptImageError, match="broken.png"):
    tokenizer_task.train(cfg, str(tmp_path / "stop"))
  cfg = tiny_training.tiny_config(tmp_path, **{"input.dataset": f"folder:{root}",
                                               "input.skip_corrupt": True})
  final = tokenizer_task.train(cfg, str(tmp_path / "skip"))
  assert final["data_skipped"] >= 1
