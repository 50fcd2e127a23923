"""FID Inception against a PyTorch oracle in pytorch-fid's layout; the TF1 resize against
TensorFlow; the ADM metrics against independent numpy/scipy computations; batch files; the
`evaluate` command line."""

import copy
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy import special
from scipy import stats as scipy_stats

from vfmtok_jax import evaluate as evaluate_cli
from vfmtok_jax.evaluators import adm
from vfmtok_jax.evaluators import batches
from vfmtok_jax.evaluators import inception
from vfmtok_jax.weights import files
from tests import inception_reference

ROOT = str(pathlib.Path(__file__).resolve().parents[1])


@pytest.fixture(scope="module")
def oracle():
  net = inception_reference.random_inception(0)
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  model, params = inception.from_state(state, source="oracle")
  return net, state, inception.InceptionFeatures(model, params, batch_size=4)


def _close(got, want):
  """f32 through ~100 layers: ~1e-6 relative to the output's scale; allow 1e-5 of it."""
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)


def test_inception_matches_pytorch_fids_own_network(oracle):
  """Our Inception (f32) against pytorch-fid's `InceptionV3` itself run in float64 (random
  weights, batch-norm statistics measured on images): pool features, sFID's map and the no-bias
  logits."""
  net, _, extract = oracle
  images = np.random.default_rng(0).integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
  got = extract(images)
  x = (images.astype(np.float64) - 128) / 128
  with torch.no_grad():
    pool, mixed_6_conv, logits = copy.deepcopy(net).double()(
        torch.from_numpy(x.transpose(0, 3, 1, 2)))
  # pytorch-fid's own f32 forward sits 8.9e-5 (pool) and 4.0e-5 (logits) of their scale from
  # this float64 one (measured: batch norm with measured statistics subtracts means, so f32
  # rounding is amplified); ours 7.0e-5 and 3.8e-5. A wrong padding, pool or branch moves
  # them by more than 1e-2 of their scale.
  close = lambda a, b: np.testing.assert_allclose(  # noqa: E731
      a, b, rtol=0, atol=2e-4 * float(np.abs(b).max()))
  close(got["pool"], pool.numpy())
  spatial = mixed_6_conv.numpy()[:, :7].transpose(0, 2, 3, 1).reshape(3, -1)  # HWC order
  assert got["spatial"].shape == (3, 2023)
  close(got["spatial"], spatial)
  close(got["logits"], logits.numpy())  # no fc bias (ADM's IS)
  assert np.abs(got["logits"] - (logits.numpy() + net.fc.bias.detach().double().numpy())).max() > 0.1


def test_padding_rows_do_not_leak_into_features(oracle):
  """5 images with batch 4: two programs calls, the second padded; each image's features are
  those it gets alone."""
  _, _, extract = oracle
  images = np.random.default_rng(1).integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
  together = extract(images)
  alone = extract(images[4:])
  assert together["pool"].shape == (5, 2048)
  np.testing.assert_array_equal(together["pool"][4], alone["pool"][0])


@pytest.mark.parametrize("hw", [(32, 48), (400, 350), (299, 299)])
def test_resize_is_tensorflows_legacy_bilinear(hw):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (a dependency: never skipped)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(hw[0]).integers(0, 256, (2, *hw, 3), dtype=np.uint8)
  want = tf.compat.v1.image.resize_bilinear(images.astype(np.float32), (299, 299),
                                            align_corners=False).numpy()
  got = np.asarray(inception.preprocess(jnp.asarray(images))) * 128 + 128
  # TensorFlow's f32 kernel vs ours: weights and products rounded in another order, ~1e-6 of
  # the 0..255 scale.
  np.testing.assert_allclose(got, want, atol=2e-4)  # 0..255 scale, f32 rounding


def test_weight_file_errors(oracle, tmp_path):
  _, state, _ = oracle
  with pytest.raises(FileNotFoundError) as e:
    inception.load_inception(str(tmp_path / "absent.pth"))
  assert str(tmp_path / "absent.pth") in str(e.value) and "pt_inception" in str(e.value)
  bad = dict(state)
  del bad["Mixed_6d.branch1x1.conv.weight"]
  bad["fc.weight"] = bad["fc.weight"][:1000]
  with pytest.raises(files.WeightLoadError) as e:
    inception.from_state(bad, source="bad")
  assert "Mixed_6d.branch1x1.conv.weight" in str(e.value) and "fc.weight" in str(e.value)
  path = tmp_path / "pt_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  _, params = inception.load_inception(str(path))  # through torch.load(weights_only=True)
  np.testing.assert_array_equal(params["logits_kernel"], state["fc.weight"].T)


def _gaussians(seed, n, d, shift=0.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + shift


def test_frechet_distance_matches_the_eigenvalue_formula():
  a, b = _gaussians(0, 400, 12), _gaussians(1, 300, 12, shift=0.5)
  mu1, mu2 = a.mean(0), b.mean(0)
  s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # tr sqrt(S1 S2) = sum of the square roots of S1 S2's (real, non-negative) eigenvalues.
  eig = np.linalg.eigvals(s1 @ s2).real.clip(0)
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig).sum()
  got = adm.frechet_distance(adm.statistics(a), adm.statistics(b))
  # float64 on both sides, scipy sqrtm vs an eigenvalue formula: ~1e-12 relative.
  np.testing.assert_allclose(got, want, rtol=1e-9)
  # A rank-deficient covariance (fewer samples than dimensions): still ~0 against itself.
  few = _gaussians(2, 10, 32)
  s = adm.statistics(few)
  assert abs(adm.frechet_distance(s, s)) < 1e-6 * np.trace(s.sigma)


def test_singular_covariance_product_takes_the_eps_offset(monkeypatch):
  """3 and 2 samples in 5 dimensions: a singular S1 S2. Where sqrtm(S1 S2) is not finite (older
  scipy on such products, pytorch-fid's reason for the branch; scipy 1.17 fails on them only
  by rounding accident, machine-dependent), ADM adds eps to both diagonals for the
  square-root term only. sqrtm is made to fail on the plain product, as older scipy did, so
  the branch runs on every machine; the result must be the offset formula's."""
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 5)), rng.normal(size=(2, 5))
  sa, sb = adm.statistics(a), adm.statistics(b)
  assert np.linalg.matrix_rank(sa.sigma.dot(sb.sigma)) < 5
  real_sqrtm, calls = linalg.sqrtm, []

  def failing_on_the_plain_product(m):
    calls.append(m)
    return np.full_like(m, np.inf) if len(calls) == 1 else real_sqrtm(m)

  monkeypatch.setattr(adm.linalg, "sqrtm", failing_on_the_plain_product)
  with pytest.warns(UserWarning, match="singular; adding 1e-06"):
    got = adm.frechet_distance(sa, sb)
  offset = np.eye(5) * adm.FID_EPS
  np.testing.assert_array_equal(calls[1], (sa.sigma + offset).dot(sb.sigma + offset))
  eig = np.linalg.eigvals((sa.sigma + offset) @ (sb.sigma + offset)).real.clip(0)
  want = (np.sum((sa.mu - sb.mu) ** 2) + np.trace(sa.sigma) + np.trace(sb.sigma)
          - 2 * np.sqrt(eig).sum())
  # float64 both sides, sqrtm vs eigenvalues of a product with eigenvalues down to 1e-12:
  # ~1e-9 absolute.
  np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-8)


def test_inception_score_matches_scipy():
  logits = np.random.default_rng(0).normal(size=(12000, 10)).astype(np.float32) * 3
  probs = special.softmax(logits.astype(np.float64), axis=1)
  scores = []
  for part in (probs[:5000], probs[5000:10000], probs[10000:]):  # ADM's splits of 5,000
    kl = scipy_stats.entropy(part.T, part.mean(0)[:, None])     # KL(p(y|x) || p(y)) per row
    scores.append(np.exp(kl.mean()))
  # f32 softmax (ours, as ADM) vs scipy's float64 entropy: relative ~1e-6.
  np.testing.assert_allclose(adm.inception_score(logits), np.mean(scores), rtol=1e-5)


def _brute_pr(ref, samples, k=3):
  d = lambda u, v: ((u[:, None] - v[None]) ** 2).sum(-1)  # noqa: E731
  r_ref = np.sort(d(ref, ref), 1)[:, k]
  r_s = np.sort(d(samples, samples), 1)[:, k]
  cross = d(ref, samples)
  precision = (cross <= r_ref[:, None]).any(0).mean()
  recall = (cross <= r_s[None, :]).any(1).mean()
  return precision, recall


def test_precision_recall_match_a_brute_force_computation():
  ref, samples = _gaussians(0, 300, 8), _gaussians(1, 250, 8, shift=0.8)
  want = _brute_pr(ref, samples)
  got = adm.precision_recall(ref, samples, float16=False)
  # float32 vs float64 distances may move a point across a ball's boundary: one point at most.
  assert abs(got[0] - want[0]) <= 1 / 250 and abs(got[1] - want[1]) <= 1 / 300
  assert 0.05 < got[0] < 0.95 and 0.05 < got[1] < 0.95
  # Blocks smaller than the sets give exactly the unblocked result.
  assert adm.precision_recall(ref, samples, float16=False, block=64) == got
  # float16 distances (ADM's default) agree up to rounding; an overflowing block falls back
  # to float32 and gives the float32 result exactly.
  half = adm.precision_recall(ref, samples)
  assert abs(half[0] - got[0]) < 0.03 and abs(half[1] - got[1]) < 0.03
  big = (ref * 300, samples * 300)  # squared norms > 65504
  assert adm.precision_recall(*big) == adm.precision_recall(*big, float16=False)


def test_batch_files_stream_and_round_trip(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
  mu, sigma = np.arange(3.0), np.eye(3)
  path = str(tmp_path / "batch.npz")
  batches.save(path, images=images, labels=np.arange(10), stats={"mu": mu, "sigma": sigma})
  info = batches.inspect(path)
  assert info.image_shape == (10, 8, 8, 3) and sorted(info.stats) == ["mu", "sigma"]
  chunks = list(batches.iter_images(path, 4))
  assert [len(c) for c in chunks] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(chunks), images)
  compressed = str(tmp_path / "compressed.npz")
  np.savez_compressed(compressed, arr_0=images)
  np.testing.assert_array_equal(np.concatenate(list(batches.iter_images(compressed, 3))), images)
  floats = str(tmp_path / "floats.npz")
  np.savez(floats, arr_0=images.astype(np.float32))
  with pytest.raises(ValueError, match="uint8"):
    list(batches.iter_images(floats, 4))
  objects = str(tmp_path / "objects.npz")
  np.savez(objects, arr_0=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ValueError, match="objects"):
    list(batches.iter_images(objects, 4))
  with pytest.raises(ValueError, match="not a readable"):
    batches.inspect(_garbage(tmp_path))


def _garbage(tmp_path):
  p = tmp_path / "garbage.npz"
  p.write_bytes(b"not a zip")
  return str(p)


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "vfmtok_jax.evaluate", *args], cwd=ROOT,
                        capture_output=True, text=True, env=env, check=False)


def _write_batches(tmp_path, extract):
  rng = np.random.default_rng(0)
  ref_images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
  sample_images = rng.integers(0, 200, (6, 32, 32, 3), dtype=np.uint8)
  ref_feats, sample_feats = extract(ref_images), extract(sample_images)
  stored = adm.statistics(ref_feats["pool"] * 1.1)  # differs from the images' own statistics
  paths = {n: str(tmp_path / f"{n}.npz") for n in ("ref", "sample", "stats_only")}
  batches.save(paths["ref"], images=ref_images, stats={"mu": stored.mu, "sigma": stored.sigma})
  batches.save(paths["sample"], images=sample_images, labels=np.zeros(6, np.int32))
  batches.save(paths["stats_only"], stats={"mu": stored.mu, "sigma": stored.sigma})
  return paths, ref_feats, sample_feats, stored


def test_evaluate_uses_stored_statistics_and_names_what_is_unavailable(oracle, tmp_path,
                                                                        monkeypatch):
  """Which statistics each metric uses, and the unavailable ones (the Frechet distance itself
  is replaced by a recorder: its 2048-d matrix square roots take ~20 s each here)."""
  _, _, extract = oracle
  paths, ref_feats, sample_feats, stored = _write_batches(tmp_path, extract)
  calls = []
  monkeypatch.setattr(adm, "frechet_distance", lambda a, b: calls.append((a, b)) or 1.0)
  results, why = evaluate_cli.evaluate(paths["ref"], paths["sample"], extract)
  (fid_s, fid_r), (sfid_s, sfid_r) = calls
  np.testing.assert_array_equal(fid_r.mu, stored.mu)                # stored mu/sigma (ADM)
  np.testing.assert_array_equal(fid_s.mu, sample_feats["pool"].astype(np.float64).mean(0))
  np.testing.assert_array_equal(sfid_r.mu, ref_feats["spatial"].astype(np.float64).mean(0))
  assert results["inception_score"] == adm.inception_score(sample_feats["logits"])
  assert (results["precision"], results["recall"]) == adm.precision_recall(
      ref_feats["pool"], sample_feats["pool"])
  assert not why
  calls.clear()
  results, why = evaluate_cli.evaluate(paths["stats_only"], paths["sample"], extract)
  assert len(calls) == 1 and set(results) == {"inception_score", "fid"}
  assert "mu_s/sigma_s" in why["sfid"] and "no images" in why["precision"]
  few = str(tmp_path / "few.npz")  # 3 images: no k = 3 neighbourhoods
  batches.save(few, images=next(batches.iter_images(paths["sample"], 3)))
  results, why = evaluate_cli.evaluate(paths["ref"], few, extract)
  assert "precision" not in results and "more than 3" in why["recall"]

  out = _run(paths["ref"], paths["sample"], "--inception", str(tmp_path / "absent.pth"))
  assert out.returncode != 0 and "absent.pth" in out.stderr and "pt_inception" in out.stderr


@pytest.mark.slow
def test_evaluate_command_line(oracle, tmp_path):
  """ADM's printed lines and --json, end to end (about a minute: two 2k-d square roots)."""
  _, state, extract = oracle
  weights = tmp_path / "pt_inception.pth"
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, weights)
  paths, ref_feats, sample_feats, stored = _write_batches(tmp_path, extract)
  out = _run(paths["ref"], paths["sample"], "--inception", str(weights), "--json",
             str(tmp_path / "m.json"))
  assert out.returncode == 0, out.stderr[-3000:]
  lines = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
  metrics = json.loads((tmp_path / "m.json").read_text())
  want_fid = adm.frechet_distance(adm.statistics(sample_feats["pool"]), stored)
  # The CLI's streamed f32 features vs in-process ones, through a 2048-d sqrtm: relative
  # ~1e-6, amplified by sqrtm up to ~1e-5.
  np.testing.assert_allclose(metrics["fid"], want_fid, rtol=1e-4)
  np.testing.assert_allclose(float(lines["FID"]), want_fid, rtol=1e-4)
  np.testing.assert_allclose(metrics["inception_score"],
                             adm.inception_score(sample_feats["logits"]), rtol=1e-4)
  np.testing.assert_allclose(float(lines["Inception Score"]), metrics["inception_score"])
  want_pr = adm.precision_recall(ref_feats["pool"], sample_feats["pool"])
  assert (metrics["precision"], metrics["recall"]) == pytest.approx(want_pr)
  assert {"Inception Score", "FID", "sFID", "Precision", "Recall"} <= set(lines)
