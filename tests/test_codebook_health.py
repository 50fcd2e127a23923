"""Codebook health: spherical k-means init, dead-code restart, their config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from vfmtok_jax import sharding as shd
from vfmtok_jax.models import quantizer as quantizer_lib
from vfmtok_jax.ops import codebook as codebook_ops
from vfmtok_jax.tasks import tokenizer as tokenizer_task

K, E = 64, 8


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _clustered(n, clusters, spread, seed):
  """`n` unit vectors in E dims around `clusters` random centres, and the centres."""
  rng = np.random.default_rng(seed)
  centres = _unit(rng.normal(size=(clusters, E)))
  points = centres[rng.integers(0, clusters, n)] + spread * rng.normal(size=(n, E))
  return _unit(points).astype(np.float32), centres


def _numpy_lloyd(points, start, iters):
  c = points[start].astype(np.float64)
  p = points.astype(np.float64)
  for _ in range(iters):
    assign = np.argmax(p @ c.T, axis=1)
    for j in range(len(c)):
      members = p[assign == j]
      if len(members):
        c[j] = _unit(members.sum(0))
  return c


def test_kmeans_matches_a_numpy_lloyd_and_lowers_the_error():
  points, _ = _clustered(1024, 6, 0.3, seed=0)
  key = jax.random.PRNGKey(3)
  got = np.asarray(jax.jit(codebook_ops.spherical_kmeans, static_argnums=(1, 2))(
      points, K, 8, key))
  start = np.asarray(jax.random.choice(key, len(points), (K,), replace=False))
  assert len(set(start.tolist())) == K
  want = _numpy_lloyd(points, start, 8)
  # Unit vectors through 8 f32 Lloyd steps against numpy's: sums of ~170 members per centre in
  # another order (~1e-6); a wrong assignment or renormalisation moves a centre by > 1e-2.
  np.testing.assert_allclose(got, want, atol=2e-5)
  err = lambda c: float(np.mean(1 - np.max(points @ c.T, axis=1)))
  assert err(got) < 0.8 * err(points[start])
  with pytest.raises(ValueError, match="at least k=64 points"):
    codebook_ops.spherical_kmeans(points[:10], K, 2, key)


def test_restart_reseeds_exactly_the_dead_codes_from_latents():
  age = jnp.array([0, 5, 4, 9] + [0] * (K - 4), jnp.int32)
  embedding = jnp.asarray(_unit(np.random.default_rng(1).normal(size=(K, E))), jnp.float32)
  latents, _ = _clustered(32, 3, 0.1, seed=2)
  new, new_age, dead = codebook_ops.restart_dead_codes(embedding, age, latents, 5, 1e-3,
                                                       jax.random.PRNGKey(0))
  assert np.asarray(dead).nonzero()[0].tolist() == [1, 3]
  assert np.asarray(new_age)[[1, 2, 3]].tolist() == [0, 4, 0]
  changed = np.any(np.asarray(new) != np.asarray(embedding), axis=1)
  assert changed.nonzero()[0].tolist() == [1, 3]
  # Each re-seeded code sits (up to the small noise) on one of the batch's latents.
  assert np.all(np.max(np.asarray(new)[[1, 3]] @ latents.T, axis=1) > 0.999)
  again = codebook_ops.restart_dead_codes(embedding, age, latents, 5, 1e-3,
                                          jax.random.PRNGKey(0))[0]
  np.testing.assert_array_equal(np.asarray(again), np.asarray(new))
  ages = codebook_ops.code_age(new_age, jnp.array([[2, 2], [7, 1]]), K)
  assert np.asarray(ages)[[0, 1, 2, 3, 7]].tolist() == [1, 0, 0, 1, 0]


def test_restart_is_the_same_on_a_sharded_batch():
  mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  latents, _ = _clustered(8 * 16, 4, 0.2, seed=4)
  latents = latents.reshape(8, 16, E)
  indices = jnp.asarray(np.random.default_rng(5).integers(0, 8, (8, 16)), jnp.int32)
  embedding = jnp.asarray(_unit(np.random.default_rng(6).normal(size=(K, E))), jnp.float32)

  def step(embedding, age, latents, indices):
    age = codebook_ops.code_age(age, indices, K)
    return codebook_ops.restart_dead_codes(embedding, age, latents, 1, 0.01,
                                           jax.random.PRNGKey(7))
  age = jnp.zeros((K,), jnp.int32)
  one = jax.jit(step)(embedding, age, latents, indices)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  sharded = jax.jit(step)(embedding, age, jax.device_put(latents, batch),
                          jax.device_put(indices, batch))
  assert int(one[2].sum()) == K - len(np.unique(np.asarray(indices)))
  for a, b in zip(one, sharded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _train_codebook(data, *, kmeans: bool, window: int, steps: int = 150):
  """Adam on the codebook alone under the VQ loss, from a codebook far from the data (all codes
  in a small cap around -mean(data)); returns the fraction of codes the data uses at the end."""
  quant = quantizer_lib.L2Quantizer(codebook_size=K, code_dim=E)
  rng = np.random.default_rng(0)
  away = _unit(-data.mean(0))
  emb = jnp.asarray(_unit(away + 0.05 * rng.normal(size=(K, E))), jnp.float32)
  key = jax.random.PRNGKey(0)
  if kmeans:
    emb = codebook_ops.spherical_kmeans(data, K, 10, key)
  tx = optax.adam(1e-2)
  batch = 256

  def loss(emb, x):
    out = quant.apply({"params": {"embedding": emb}}, x)
    return out["vq_loss"], out["indices"]

  def step(carry, i):
    emb, opt, age = carry
    x = jax.lax.dynamic_slice_in_dim(data, (i * batch) % (len(data) - batch), batch)
    (_, idx), g = jax.value_and_grad(loss, has_aux=True)(emb, x)
    upd, opt = tx.update(g, opt)
    emb = optax.apply_updates(emb, upd)
    if window:
      age = codebook_ops.code_age(age, idx, K)
      emb, age, _ = codebook_ops.restart_dead_codes(emb, age, x, window, 0.01,
                                                    jax.random.fold_in(key, i))
    return (emb, opt, age), None
  (emb, _, _), _ = jax.lax.scan(step, (emb, tx.init(emb), jnp.zeros((K,), jnp.int32)),
                                jnp.arange(steps))
  idx = quant.apply({"params": {"embedding": emb}}, data)["indices"]
  return len(np.unique(np.asarray(idx))) / K


def test_switches_lift_a_collapsed_codebook():
  # 4 clusters, a codebook of 64 in a cap on the far side: plain VQ drags a few codes over.
  data, _ = _clustered(4096, 4, 0.15, seed=8)
  plain = _train_codebook(data, kmeans=False, window=0)
  kmeans = _train_codebook(data, kmeans=True, window=0)
  restart = _train_codebook(data, kmeans=False, window=5)
  assert plain < 0.2, plain
  assert kmeans > 0.9, kmeans   # measured 1.0 (plain: 0.11)
  assert restart > 0.9, restart


@pytest.mark.parametrize("key,value,message", [
    ("kmeans_batches", 0, "codebook.kmeans_batches=0 must be >= 1"),
    ("kmeans_iters", -1, "codebook.kmeans_iters=-1 must be >= 1"),
    ("kmeans_batches", 1, "codebook.kmeans_batches=1 gives 512 encoder outputs"),
    ("restart_window", -3, "codebook.restart_window=-3 must be >= 0"),
    ("restart_noise", -0.1, "codebook.restart_noise=-0.1 must be >= 0"),
])
def test_settings_that_make_no_sense_are_rejected(key, value, message):
  settings = tokenizer_task.CodebookSettings(kmeans_init=True, **{key: value})
  with pytest.raises(ValueError, match=message.replace(".", r"\.")):
    settings.check(tokens_per_batch=512, codebook_size=1024)
