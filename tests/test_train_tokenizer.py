"""The tokenizer trainer: sharding presets, resume, preemption, faults, errors, outputs."""

import json
import os
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from tests import tiny_training
from vfmtok_jax import checkpoint as ckpt_lib
from vfmtok_jax import sharding as shd
from vfmtok_jax import tokenizer_io
from vfmtok_jax import tokenizer_trainer as trainer
from vfmtok_jax.data import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _batch(config, comps, seed=0):
  it = input_pipeline.make_train_iterator(config.input, global_batch_size=config.batch_size,
                                          seed=seed, sharding=comps.batch_sharding)
  return next(it)


def _run_steps(config, devices, n):
  comps = trainer.build(config, devices)
  state = comps.init_state(jax.random.PRNGKey(config.seed))
  step = trainer.make_train_step(comps, config.loss, config.disc, config.ema_decay)
  losses = []
  with comps.mesh, nn.logical_axis_rules(comps.rules):
    fn = jax.jit(step, out_shardings=(comps.state_shardings, shd.replicated(comps.mesh)))
    for i in range(n):
      state, metrics = fn(state, comps.vfm_params, comps.aux_params, _batch(config, comps, i))
      losses.append(float(metrics["loss"]))
  return comps, jax.device_get(state), np.asarray(losses)


@pytest.mark.parametrize("preset,mesh", [("dp", dict(data=8, fsdp=1, tensor=1)),
                                         ("fsdp", dict(data=2, fsdp=4, tensor=1)),
                                         ("fsdp_tp", dict(data=2, fsdp=2, tensor=2))])
def test_presets_match_one_device(tmp_path, preset, mesh):
  opt = {"optim.warmup_steps": 0, "optim.lr": 1e-4}
  base = tiny_training.tiny_config(tmp_path, **opt)
  _, one, losses1 = _run_steps(base, jax.devices()[:1], 3)
  cfg = tiny_training.tiny_config(tmp_path, sharding=preset, mesh=mesh, **opt)
  comps, many, losses8 = _run_steps(cfg, jax.devices(), 3)
  np.testing.assert_allclose(losses1, losses8, rtol=1e-5)
  # Params whose true gradient is zero (biases before a GroupNorm, attention key biases) get
  # Adam updates from float noise, whose sign depends on the reduction order; so compare
  # with an absolute tolerance above the largest possible drift (2 * lr per step, 3 steps =
  # 6e-4); the losses of all three steps above must agree to 1e-5.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3), one, many)
  specs = [s.spec for s in jax.tree.leaves(comps.state_shardings.params)]
  if preset == "dp":
    assert all(all(a is None for a in spec) for spec in specs)
  else:
    assert any("fsdp" in spec for spec in specs)
  if preset == "fsdp_tp":
    assert any("tensor" in spec for spec in specs)


def test_resume_is_bitwise(tmp_path):
  straight = tiny_training.tiny_config(tmp_path)
  trainer.train_and_evaluate(straight, str(tmp_path / "a"))
  sliced = tiny_training.tiny_config(tmp_path, max_steps_per_run=2)
  assert trainer.train_and_evaluate(sliced, str(tmp_path / "b"))["stopped_at"] == 2
  assert trainer.train_and_evaluate(sliced, str(tmp_path / "b"))["stopped_at"] == 4
  comps = trainer.build(straight)
  a, meta_a = ckpt_lib.Checkpointer(str(tmp_path / "a" / "ckpt"), save_every=2).restore(
      comps.abstract_state)
  b, meta_b = ckpt_lib.Checkpointer(str(tmp_path / "b" / "ckpt"), save_every=2).restore(
      comps.abstract_state)
  assert meta_a["step"] == meta_b["step"] == 4 and meta_b["data_position"] == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_outputs_logs_images_export(tmp_path):
  cfg = tiny_training.tiny_config(tmp_path, eval_every=2)
  final = trainer.train_and_evaluate(cfg, str(tmp_path / "run"))
  run = tmp_path / "run"
  lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == [1, 2, 3, 4]
  for key in ("loss_rec", "loss_vq", "loss_commit", "loss_semantic", "codebook_usage",
              "steps_per_sec", "eta_sec", "lr", "grad_norm"):
    assert np.isfinite(train_lines[-1][key]), key
  assert {l["step"] for l in lines if "eval_psnr" in l} == {0, 2, 4}
  assert sorted(os.listdir(run / "images")) == ["recon_000000.png", "recon_000002.png",
                                                "recon_000004.png"]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(run / "tensorboard"))
  assert final["eval_examples"] == 12  # one held-out crop per bundled photo
  tok = tokenizer_io.load_tokenizer(final["export"])
  images = np.zeros((2, 16, 16, 3), np.float32)
  assert tok.decode_indices(tok.encode(images)).shape == (2, 16, 16, 3)


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
  cfg = tiny_training.tiny_config(tmp_path, **{"testing.nan_at_steps": (2,)})
  final = trainer.train_and_evaluate(cfg, str(tmp_path / "one"))
  assert final["nonfinite_total"] == 1 and np.isfinite(final["loss"])
  cfg = tiny_training.tiny_config(tmp_path, total_steps=6, max_nonfinite_streak=1,
                                  **{"testing.nan_at_steps": (3, 4, 5)})
  with pytest.raises(trainer.NonFiniteError, match="2 consecutive non-finite"):
    trainer.train_and_evaluate(cfg, str(tmp_path / "many"))
  steps = ckpt_lib.Checkpointer(str(tmp_path / "many" / "ckpt"), save_every=2).all_steps()
  assert max(steps) == 2  # the last good checkpoint stays; nothing after the failure


def _subprocess_train(workdir, config_flags, env=None):
  cmd = [sys.executable, "-m", "vfmtok_jax.train_tokenizer",
         "--config", os.path.join(ROOT, "tests", "tiny_training_config.py"),
         "--workdir", str(workdir), *config_flags]
  return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, **(env or {})))


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
  proc = _subprocess_train(tmp_path / "run", flags[:1] + [f"--config.total_steps={saved + 2}"])
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f"step {saved + 1}/" in out or f"step {saved + 2}/" in out
  assert "step 1/" not in out


def test_sigkill_during_save_resumes_from_last_complete(tmp_path):
  vfm = tiny_training.golden_vfm_file(tmp_path)
  flags = [f"--config.vfm.source={vfm}", "--config.total_steps=6", "--config.ckpt_every=1",
           "--config.async_checkpoint=True"]
  proc = _subprocess_train(tmp_path / "run", flags, env={"VFMTOK_TEST_SIGKILL_DURING_SAVE": "3"})
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == -signal.SIGKILL, out[-3000:]
  ckpt_dir = tmp_path / "run" / "ckpt"
  assert any(n.startswith("3.") and "tmp" in n for n in os.listdir(ckpt_dir)), os.listdir(ckpt_dir)
  assert ckpt_lib.Checkpointer(str(ckpt_dir), save_every=1).latest_step() == 2
  proc = _subprocess_train(tmp_path / "run", flags)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "step 3/6" in out and "step 2/6" not in out
  assert ckpt_lib.Checkpointer(str(ckpt_dir), save_every=1).latest_step() == 6


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
    trainer.train_and_evaluate(cfg, str(tmp_path / "stop"))
  cfg = tiny_training.tiny_config(tmp_path, **{"input.dataset": f"folder:{root}",
                                               "input.skip_corrupt": True})
  final = trainer.train_and_evaluate(cfg, str(tmp_path / "skip"))
  assert final["data_skipped"] >= 1


def test_clear_errors(tmp_path):
  with pytest.raises(shd.MeshError, match="does not divide 8 devices"):
    trainer.build(tiny_training.tiny_config(tmp_path, mesh=dict(data=3, fsdp=-1, tensor=1)))
  with pytest.raises(shd.MeshError, match="global batch 6 is not divisible"):
    trainer.build(tiny_training.tiny_config(tmp_path, batch_size=6))
  with pytest.raises(FileNotFoundError, match="lpips_vgg16.safetensors"):
    trainer.build(tiny_training.tiny_config(tmp_path, **{"loss.perceptual_weight": 1.0,
                                                         "loss.lpips_path": ""}))
  with pytest.raises(ValueError, match="nosuchset"):
    trainer.train_and_evaluate(tiny_training.tiny_config(
        tmp_path, **{"input.dataset": "tfds:nosuchset"}), str(tmp_path / "x"))
