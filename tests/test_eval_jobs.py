"""The tokenizer evaluation job: the reference's protocol, padded/masked batches, 1 vs 8 devices,
and its command line."""

import dataclasses
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import linear_model
from skimage import metrics as skm

from configs import eval_generator as gen_configs
from configs import gpt as gpt_configs
from configs import linear_probe as probe_configs
from configs import eval_tokenizer as eval_configs
from vfmtok_jax import sharding as shd
from vfmtok_jax import vfm_zoo
from vfmtok_jax.data import images as image_io
from vfmtok_jax.data import input_pipeline
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batches
from vfmtok_jax.evaluators import linear_probe
from vfmtok_jax.evaluators import suite
from vfmtok_jax.evaluators import vfm_features
from vfmtok_jax.losses import lpips as lpips_lib
from vfmtok_jax.models.vfm import dinov2
from vfmtok_jax.tasks import demo_scoring
from vfmtok_jax.tasks import generator_eval
from vfmtok_jax.tasks import gpt as gpt_task
from vfmtok_jax.tasks import probe_job
from vfmtok_jax.tasks import sampler
from vfmtok_jax.tasks import tokenizer_eval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_SIZE = 24  # the golden tokenizer's 32 px pairs, PIL-resized as the reference's 336 -> 256


def _stand_in_inception(images):
  """A cheap fixed function of the pixels with Inception's output names and widths (the real
  network is checked against its oracle in test_evaluation.py)."""
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  proj = np.random.default_rng(7).normal(size=(x.shape[1], 2048 + 1008)).astype(np.float32)
  out = np.tanh(x @ proj / np.sqrt(x.shape[1]))
  return {"pool": out[:, :2048], "logits": 5.0 * out[:, 2048:]}


@pytest.fixture(scope="module")
def scorers():
  vfm_module = dinov2.DinoV2(embed_dim=32, depth=4, num_heads=2, pos_grid=4)
  vfm_params = vfm_module.init(jax.random.PRNGKey(1), np.zeros((1, 56, 56, 3)))["params"]
  vfm = vfm_zoo.dinov2_vfm(vfm_module, vfm_params, "random tiny DINOv2")
  lpips = lpips_lib.LPIPS()
  lpips_params = lpips.init(jax.random.PRNGKey(2), np.zeros((1, 32, 32, 3)),
                            np.zeros((1, 32, 32, 3)))["params"]
  return tokenizer_eval.Scorers(
      inception=_stand_in_inception,
      fd=vfm_features.VFMFeatures(vfm, size=56, batch_size=16),
      lpips=tokenizer_eval.lpips_scorer(lpips, lpips_params, batch_size=16))


class _Recorded:
  """The stand-in Inception, keeping the uint8 images the job hands it: per batch, the
  reconstructions first, then the inputs (`ReconAccumulator.add`)."""

  def __init__(self):
    self.seen = []

  def __call__(self, images):
    self.seen.append(np.array(images))
    return _stand_in_inception(images)

  def scored(self):
    """(reconstructions, inputs) the job scored, uint8 (N, S, S, 3) in order."""
    return np.concatenate(self.seen[0::2]), np.concatenate(self.seen[1::2])


def _run(tok, scorers, devices, batch_size, monkeypatch):
  """Results of the job on `devices` with a global batch, the FID inputs and (when the
  scorers have an Inception) the scored uint8 images recorded."""
  calls, real = [], adm.frechet_distance

  def recorded(a, b):  # rFID's 2048-d square roots take ~20 s each here: recorded instead
    if a.mu.shape[0] != 2048:
      return real(a, b)
    calls.append((a, b))
    return 1.0
  monkeypatch.setattr(adm, "frechet_distance", recorded)
  seen = None
  if scorers.inception is not None:
    seen = _Recorded()
    scorers = dataclasses.replace(scorers, inception=seen)
  cfg = eval_configs.get_config("demo")
  input_cfg = input_pipeline.default_input_config(**cfg.input.to_dict())
  input_cfg.image_size = tok.model.image_size
  mesh = shd.make_mesh({"data": -1}, devices)
  batches = input_pipeline.make_eval_batches(input_cfg, global_batch_size=batch_size,
                                             sharding=shd.batch_sharding(mesh, 4))
  results, why, grid = tokenizer_eval.evaluate(tok, batches, scorers, mesh=mesh,
                                               eval_size=EVAL_SIZE, log=lambda _: None)
  return results, why, grid, calls, seen and seen.scored()


class _Unmasked:
  """Eval batches with every row marked real: the padding rows are scored too."""

  def __init__(self, batches):
    self._batches = batches

  def __len__(self):
    return len(self._batches)

  def __iter__(self):
    for batch in self._batches:
      yield dict(batch, _mask=jnp.ones_like(batch["_mask"]))


def test_eval_without_its_mask_fails_the_protocol_check(golden_tokenizer):
  """The 1-vs-8-device check below can fail: the same job with the padding rows unmasked (24
  images in batches of 16 on 8 devices: 8 padding rows) scores 32 images, and its PSNR is no
  longer the reference protocol's on the 24 crops."""
  _, tok = golden_tokenizer
  none = tokenizer_eval.Scorers(why_missing={"inception": "-", "lpips": "-", "fd": "-"})
  cfg = eval_configs.get_config("demo")
  input_cfg = input_pipeline.default_input_config(**cfg.input.to_dict())
  input_cfg.image_size = tok.model.image_size
  mesh = shd.make_mesh({"data": -1})
  runs = {}
  for name, wrap in (("masked", lambda b: b), ("unmasked", _Unmasked)):
    batches = input_pipeline.make_eval_batches(input_cfg, global_batch_size=16,
                                               sharding=shd.batch_sharding(mesh, 4))
    runs[name], _, _ = tokenizer_eval.evaluate(tok, wrap(batches), none, mesh=mesh,
                                               eval_size=EVAL_SIZE, log=lambda _: None)
  assert runs["masked"]["num_examples"] == 24 and runs["unmasked"]["num_examples"] == 32
  assert abs(runs["unmasked"]["psnr"] - runs["masked"]["psnr"]) > 1e-3


def _reference_protocol(rec, gt):
  """vqgan_test.py's per-image PSNR and SSIM on [0, 1] images, float64: {"psnr", "ssim"
  (data_range 1.0), "ssim_reference" (the reference's data_range 2.0)}."""
  unit = lambda x: x.astype(np.float64) / 255.0  # noqa: E731
  out = {"psnr": np.mean([skm.peak_signal_noise_ratio(unit(g), unit(r))
                          for g, r in zip(gt, rec)])}
  for k, data_range in (("ssim", 1.0), ("ssim_reference", 2.0)):
    out[k] = np.mean([skm.structural_similarity(unit(r), unit(g), channel_axis=-1,
                                                data_range=data_range) for g, r in zip(gt, rec)])
  return out


def test_tokenizer_eval_is_the_reference_protocol_on_1_and_8_devices(golden_tokenizer, scorers,
                                                                    monkeypatch):
  """Each run's numbers are the reference protocol applied to the very pixels it decoded
  (compared like with like); the two runs' pixels differ only by rounding flips."""
  _, tok = golden_tokenizer
  # 24 images: batches of 16 on 8 devices (the last one half padding), of 5 on one device.
  eight, why, grid, calls8, (rec8, in8) = _run(tok, scorers, jax.devices(), 16, monkeypatch)
  one, _, _, calls1, (rec1, in1) = _run(tok, scorers, jax.devices()[:1], 5, monkeypatch)
  assert not why and eight["num_examples"] == one["num_examples"] == 24
  assert grid.shape == (2 * (EVAL_SIZE + 2) + 2, 8 * (EVAL_SIZE + 2) + 2, 3)

  # The inputs: uint8 crops -> [-1, 1] -> uint8 -> PIL bicubic, exact whatever the split.
  crops, _ = input_pipeline.demo_eval_set(tok.model.image_size, 2, 0, 0.8, 1.0)
  np.testing.assert_array_equal(image_io.to_uint8(image_io.to_signed(crops)), crops)
  gt = image_io.pil_resize(crops, EVAL_SIZE)
  np.testing.assert_array_equal(in8, gt)
  np.testing.assert_array_equal(in1, gt)
  # The reconstructions against the reference's path run here directly (encode, decode, clamp
  # and truncate to uint8, PIL bicubic), all 24 in one batch. The f32 decoder rounds
  # differently per batch split and per CPU, and the truncating cast makes that a one-level
  # flip where a value sits within ~1e-6 of a level; PIL's bicubic (sum |w| < 2) keeps it
  # under 2 levels, on neighbours only. Measured here: 4 pixels of 41,472 between the runs.
  # Rounding instead of truncating, a wrong mask, row order or padding row moves a large
  # share of the pixels.
  indices = np.asarray(tok.encode(image_io.to_signed(crops)))
  direct = image_io.pil_resize(image_io.to_uint8(np.asarray(tok.decode_indices(indices))),
                               EVAL_SIZE)
  for rec in (rec8, rec1):
    diff = np.abs(rec.astype(np.int32) - direct.astype(np.int32))
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())

  for run, rec, calls in ((eight, rec8, calls8), (one, rec1, calls1)):
    # The same pixels, scored in f32 by the job and in float64 here. SSIM's variances come by
    # cancellation (E[x^2] - E[x]^2 over 49-pixel windows, ~1e-7 absolute error in f32) and
    # are divided by c2 = 9e-4 at data_range 1: measured 6.6e-6 relative (1.7e-6 at range 2,
    # 3e-9 for PSNR); a wrong data range, window or constant moves SSIM by > 1e-2.
    for k, v in _reference_protocol(rec, gt).items():
      np.testing.assert_allclose(run[k], v, rtol=5e-5, err_msg=k)
    # LPIPS of those pixels, by the same scorer in the same padded batches of 16.
    np.testing.assert_allclose(run["lpips"], scorers.lpips(rec, gt).mean(), rtol=1e-5)
    # rFID's inputs: the stand-in's features of those very images (the job's batches of 16
    # or 5 rows against one product of 24: BLAS blocking, f32 sums of 1,728 terms).
    (fid_rec, fid_in), = calls
    np.testing.assert_allclose(fid_in.mu, _stand_in_inception(gt)["pool"].mean(0), atol=1e-6)
    np.testing.assert_allclose(fid_rec.mu, _stand_in_inception(rec)["pool"].mean(0), atol=1e-6)
    np.testing.assert_allclose(run["ris"], adm.inception_score(
        _stand_in_inception(rec)["logits"]), rtol=1e-5)
  # FD-VFM: the same VFM programs (padded batches of 16) on the same rows as the job: equal
  # here. The matrix square root of a rank-deficient 32-d covariance product amplifies any
  # ulp-level feature difference (the 1-device run, batches of 5, is 1.7e-6 away): rtol 1e-5.
  np.testing.assert_allclose(eight["fd_vfm"], vfm_features.frechet_distance(
      scorers.fd(rec8), scorers.fd(gt)), rtol=1e-5)

  counts = np.bincount(indices.ravel(), minlength=tok.model.codebook_size)
  assert eight["codebook_usage"] == (counts > 0).mean()
  # The codes are an argmin over f32 distances; a batch split could only change one at a
  # near-tie, which this tokenizer's codes do not have (exact on every machine so far).
  for k in ("codebook_usage", "codebook_unused", "codebook_perplexity"):
    assert eight[k] == one[k], k


def test_missing_scorers_are_named_not_guessed(golden_tokenizer, monkeypatch):
  _, tok = golden_tokenizer
  results, why, _, _, _ = _run(tok, tokenizer_eval.Scorers(why_missing={
      "inception": "Inception turned off (inception=off)"}), jax.devices(), 8, monkeypatch)
  assert "rfid" not in results and why["rfid"] == why["ris"] == "Inception turned off " \
      "(inception=off)"
  assert "fd_vfm" in why and "lpips" in why and results["num_examples"] == 24
  cfg = eval_configs.get_config("demo")
  with cfg.unlocked():
    cfg.inception = "/nonexistent/pt_inception.pth"
  with pytest.raises(FileNotFoundError, match="pt_inception"):
    tokenizer_eval.scorers_from_config(cfg, tok)


def test_eval_tokenizer_command_line(golden_tokenizer, tmp_path):
  tok_path, tok = golden_tokenizer
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "vfmtok_jax.eval_tokenizer", "--tokenizer", tok_path,
       "--config", "configs/eval_tokenizer.py:demo", "--config.batch_size=16",
       f"--config.fd_vfm={tok.vfm.source}", "--config.fd_size=56",  # the tokenizer's own VFM
       "--workdir", str(tmp_path)],
      cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  record = json.load(open(tmp_path / "results.json"))
  assert record["results"]["num_examples"] == 24
  assert "Inception turned off" in record["unavailable"]["rfid"]
  assert record["fd_vfm"].startswith("FD-dinov2 (")
  assert "PSNR (dB)" in out.stdout and "rFID" in out.stdout and "FD-dinov2" in out.stdout
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert lines[-1]["eval/psnr"] == pytest.approx(record["results"]["psnr"])
  assert (tmp_path / "recon.png").exists() and (tmp_path / "tensorboard").is_dir()


def test_two_processes_gather_their_rows(tmp_path):
  """gather_rows / local_rows / suite.features across 2 real processes (CPU, gloo)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "tests.gather_rows"], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True,
      env=dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2", VFMTOK_DISTRIBUTED="1",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(i), VFMTOK_CPU_COLLECTIVES="gloo",
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"))) for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0 and f"process {i}: gathered ok" in out, out[-3000:]


def _small_inception(images):
  """A stand-in Inception with small widths, so the Frechet distances are computed for real."""
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  proj = np.random.default_rng(8).normal(size=(x.shape[1], 16 + 8 + 10)).astype(np.float32)
  out = np.tanh(x @ proj / np.sqrt(x.shape[1]))
  return {"pool": out[:, :16], "spatial": out[:, 16:24], "logits": 3.0 * out[:, 24:]}


def test_generator_eval_is_sampling_then_the_adm_suite(golden_gpt, golden_tokenizer, tmp_path):
  _, model, params = golden_gpt
  _, tok = golden_tokenizer
  ref_images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
  ref_path = str(tmp_path / "ref.npz")
  batches.save(ref_path, images=ref_images)
  cfg = gen_configs.get_config("demo")
  with cfg.unlocked():
    cfg.update(num_samples=13, per_class=False, batch_size=8, ref_batch=ref_path, seed=5)
    cfg.sampling.update(cfg_scale=2.0, top_k=20)
  results = generator_eval.run(model, params, tok, cfg, str(tmp_path / "eval"),
                               extract=_small_inception, log=lambda _: None)
  # The same numbers, step by step: labels, sampling, decoding, the ADM suite.
  labels = sampler.choose_labels(labels="", num=13, per_class=False, num_classes=10, seed=5)
  tokens, _, _, _ = sampler.generate_all(model, params, labels, sampler.SamplingSettings(
      cfg_scale=2.0, top_k=20), seed=5, batch_size=13)
  images = sampler.decode_to_uint8(tok, tokens, 32, batch_size=13)
  with np.load(tmp_path / "eval" / "samples.npz") as f:
    np.testing.assert_array_equal(f["arr_1"], labels)
    scored = f["arr_0"]
  # Decoded in batches of 8 vs 13: the f32 decoder's rounding differs, and truncation to uint8
  # makes that a one-level flip where a value sits within ~1e-6 of a level.
  assert np.abs(scored.astype(int) - images).max() <= 1
  # The ADM suite of the very images the job wrote (compared like with like): the same numpy
  # features, so only the job's streaming and float64 statistics against one pass differ.
  want, why = suite.adm_metrics(
      suite.Side("ref", {}, _small_inception(ref_images)),
      suite.Side("samples", {}, _small_inception(scored)))
  assert not why
  for k, v in want.items():
    np.testing.assert_allclose(results[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
  # On one device (13 samples in batches of 8, padded to 8 rows there, to 8 x 1 rows here):
  # the same samples (each row's randomness is keyed by its index), so the same numbers.
  one = generator_eval.run(model, params, tok, cfg, str(tmp_path / "eval1"),
                           extract=_small_inception, log=lambda _: None,
                           devices=jax.devices()[:1])
  with np.load(tmp_path / "eval1" / "samples.npz") as f:
    np.testing.assert_array_equal(f["arr_0"], scored)
  assert one == results
  record = json.load(open(tmp_path / "eval" / "results.json"))
  assert record["sampling"]["cfg_scale"] == 2.0 and record["sampling"]["top_k"] == 20
  assert record["results"]["num_samples"] == 13 and (tmp_path / "eval" / "samples.png").exists()
  with pytest.raises(FileNotFoundError, match="absent.npz"):
    with cfg.unlocked():
      cfg.ref_batch = str(tmp_path / "absent.npz")
    generator_eval.run(model, params, tok, cfg, str(tmp_path / "x"), extract=_small_inception)
  assert not (tmp_path / "x").exists()


def test_demo_scoring_reports_every_number(golden_gpt, golden_tokenizer, monkeypatch):
  """The demo's scoring end to end on the golden pair (a GPT widened to the 12 photo classes)."""
  _, model, params = golden_gpt
  _, tok = golden_tokenizer
  table = np.asarray(params["cls_embedding"]["embedding"])  # 10 classes + the null class
  wider = np.concatenate([table[:10], table[:2] * -1.0, table[10:]])  # 12 classes + null
  params = dict(params, cls_embedding={"embedding": wider})
  model = model.clone(num_classes=12)
  scored, real_accuracy = [], linear_probe.accuracy

  def recorded(probe, feats, labels):
    scored.append((probe, np.array(feats), np.array(labels)))
    return real_accuracy(probe, feats, labels)
  monkeypatch.setattr(linear_probe, "accuracy", recorded)
  scores = demo_scoring.score(tok, model, params, scales=(1.0, 2.0), samples_per_class=2,
                              real_per_photo=4, recon_per_photo=1, batch_size=16,
                              log=lambda _: None)
  assert scores["tokenizer"]["num_examples"] == 12
  assert set(scores["samples"]) == {"1", "2"}
  # Class consistency: each scale's two probes scored on the samples against the classes they
  # were drawn for (2 per class, in class order), the top-1 recomputed here from the probes'
  # logits; the probes' own accuracies on held-out crops come first (4 calls).
  intended = np.repeat(np.arange(12), 2)
  sample_calls = scored[4:]
  assert len(sample_calls) == 4
  for i, row in enumerate(scores["samples"].values()):
    assert row["num_samples"] == 24
    for key, (probe, feats, labels) in zip(("class_top1", "class_top1_decoded"),
                                           sample_calls[2 * i:2 * i + 2]):
      np.testing.assert_array_equal(labels, intended)
      assert row[key] == np.mean(np.argmax(probe.logits(feats), -1) == intended), key
    assert np.isfinite(row["fd_vfm"]) and np.isfinite(row["fd_vfm_per_class"])
  assert scores["probe"]["train_examples"] == 48 and scores["probe"]["chance"] == 1 / 12
  table_text = demo_scoring.markdown(scores)
  assert "| CFG-free (1.0), 24 |" in table_text and "| CFG 2, 24 |" in table_text
  with pytest.raises(ValueError, match="one per demo photo"):
    demo_scoring.score(tok, model.clone(num_classes=10), params)


def test_gpt_trainer_scores_samples_like_the_generator_eval(golden_gpt, golden_tokenizer,
                                                            tmp_path):
  """`sample_eval` in the GPT trainer: the eval_generator numbers of the same samples."""
  _, model, params = golden_gpt
  tok_path, tok = golden_tokenizer
  ref_path = str(tmp_path / "ref.npz")
  batches.save(ref_path, images=np.random.default_rng(1).integers(0, 256, (12, 32, 32, 3),
                                                                   dtype=np.uint8))
  c = gpt_configs.get_config("gpt_b")
  settings = gpt_task.SampleEvalSettings(num_samples=9, ref_batch=ref_path, cfg_scale=2.0,
                                         batch_size=8)
  task = gpt_task.GPTTask(
      model=model, tx=None, lr_fn=None, ema_decay=0.0, batch_size=8, eval_batch_size=8, seed=3,
      data=gpt_task.DataSettings(**c.data), sample_grid=gpt_task.SampleGridSettings(),
      tokenizer_path=tok_path, sample_eval=settings, inception_features=_small_inception)
  got = task.sample_metrics(params)
  labels = sampler.choose_labels(labels="", num=9, per_class=False, num_classes=10, seed=5)
  tokens, _, _, _ = sampler.generate_all(model, params, labels, sampler.SamplingSettings(
      cfg_scale=2.0), seed=5, batch_size=9)
  images = sampler.decode_to_uint8(tok, tokens, 32, batch_size=9)
  want, _ = suite.adm_metrics(suite.Side("ref", {}, _small_inception(
      next(batches.iter_images(ref_path, 100)))), suite.Side("s", {}, _small_inception(images)))
  assert set(got) == {f"eval_gen_{k}" for k in want}
  # The task decodes in batches of 8, this in one of 9: one-level flips in a few pixels move
  # these 9-sample metrics of a 30-d stand-in by ~1e-5 (measured); a wrong label, guidance
  # or seed changes every sample and moves them by > 1e-1.
  for k, v in want.items():
    np.testing.assert_allclose(got[f"eval_gen_{k}"], v, rtol=1e-3, atol=1e-3, err_msg=k)
  with pytest.raises(ValueError, match="sample_eval needs"):
    gpt_task.GPTTask(model=model, tx=None, lr_fn=None, ema_decay=0.0, batch_size=8,
                     eval_batch_size=8, seed=3, data=gpt_task.DataSettings(**c.data),
                     sample_grid=gpt_task.SampleGridSettings(), sample_eval=settings,
                     inception_features=_small_inception)


def test_linear_probe_job_reads_the_tokens_it_says(golden_tokenizer):
  _, tok = golden_tokenizer
  cfg = probe_configs.get_config("demo,features=slots")
  with cfg.unlocked():
    cfg.train_input.demo_eval_crops, cfg.eval_input.demo_eval_crops = 4, 2
    cfg.batch_size = 16
  record = probe_job.run(tok, cfg, log=lambda _: None)
  assert record["train_examples"] == 48 and record["eval_examples"] == 24
  assert record["dim"] == tok.model.dim and record["chance"] == 1 / 12
  # The held-out top-1 against scikit-learn's LogisticRegression (the same objective with
  # C = 1 / (l2 N)) on the features the job extracts, standardised as the probe does: the two
  # solvers' weights agree to ~1e-5, so at most a point on a decision boundary may differ.
  mesh = shd.make_mesh({"data": -1})
  sets = {}
  for name in ("train", "eval"):
    input_cfg = input_pipeline.default_input_config(**cfg[f"{name}_input"].to_dict())
    input_cfg.image_size = tok.model.image_size
    sets[name] = probe_job.extract(tok, input_pipeline.make_eval_batches(
        input_cfg, global_batch_size=16, sharding=shd.batch_sharding(mesh, 4)),
        which="slots", pool="mean", mesh=mesh, log=lambda _: None)
  (x, y), (xe, ye) = sets["train"], sets["eval"]
  mean, scale = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
  ref = linear_model.LogisticRegression(C=1.0 / (cfg.l2 * len(y)), tol=1e-10,
                                        max_iter=10000).fit((x - mean) / scale, y)
  assert abs(record["top1"] - ref.score((xe - mean) / scale, ye)) <= 1 / 24 + 1e-9
  assert abs(record["train_top1"] - ref.score((x - mean) / scale, y)) <= 1 / 48 + 1e-9
  # The features are the region tokens of the centre-crop pipeline, mean-pooled, per image.
  mesh = shd.make_mesh({"data": -1})
  input_cfg = input_pipeline.default_input_config(**cfg.eval_input.to_dict())
  input_cfg.image_size = tok.model.image_size
  batches = input_pipeline.make_eval_batches(input_cfg, global_batch_size=16,
                                             sharding=shd.batch_sharding(mesh, 4))
  feats, labels = probe_job.extract(tok, batches, which="codes", pool="flatten", mesh=mesh,
                                    log=lambda _: None)
  crops, want_labels = input_pipeline.demo_eval_set(tok.model.image_size, 2, 12, 0.8, 1.0)
  quant = np.asarray(tok.encode(image_io.to_signed(crops), return_tokens=True)["quant"])
  np.testing.assert_array_equal(labels, want_labels)
  # The probe job's batches vs one direct encode: code vectors are codebook rows (exact), up to
  # the f32 normalisation of the same rows in another program (~1e-7).
  np.testing.assert_allclose(feats, quant.reshape(len(crops), -1), atol=1e-5)
