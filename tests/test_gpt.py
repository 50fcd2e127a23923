"""The GPT against the official goldens and an independent PyTorch oracle; weights; configs."""

import argparse
import functools
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from safetensors.numpy import load_file

from configs import gpt as gpt_configs
from vfmtok_jax import gpt_io
from vfmtok_jax.models import gpt as gpt_lib
from vfmtok_jax.models import rope
from vfmtok_jax.ops import sampling
from vfmtok_jax.tasks import gpt as gpt_task
from vfmtok_jax.tasks import sampler
from vfmtok_jax.weights import files
from vfmtok_jax.weights import gpt as gpt_keys
from tests import gpt_reference

ROOT = str(pathlib.Path(__file__).resolve().parents[1])
# Logits are O(10); f32 reorderings between torch and XLA leave ~1e-5.
# Logits of O(1-10) after a few f32 layers, against PyTorch or the goldens (another framework,
# another CPU): ~1e-6 of their scale differs by summation order; a wrong mask, head or RoPE
# moves them by > 1e-2.
ATOL = 1e-4


def assert_clear_argmax(logits, margin=2 * ATOL):
  """Greedy tokens may be compared exactly across frameworks and CPUs only where every step's
  best logit leads the runner-up by more than the two sides' logits may differ: with logits
  within ATOL of each other (checked beside each use), a gap over 2 ATOL cannot flip."""
  top2 = np.sort(np.asarray(logits, np.float64), axis=-1)[..., -2:]
  gap = float((top2[..., 1] - top2[..., 0]).min())
  assert gap > margin, f"a near-tie ({gap:.2e}) makes exact greedy tokens machine-dependent"


@pytest.fixture(scope="module")
def golden(fixtures_dir):
  state = load_file(str(fixtures_dir / "gpt.safetensors"))
  with np.load(fixtures_dir / "gpt_io.npz") as f:
    io = {k: f[k] for k in f.files}
  model, params = gpt_io.gpt_from_state(state, source="golden", num_heads=4, block_size=16)
  return model, params, io, state


def test_rope_table_matches_reference(golden):
  _, _, io, _ = golden
  # cos/sin of the same f32 angles in numpy and torch: within a few ulp of values <= 1.
  np.testing.assert_allclose(rope.rope_2d_table(16, 16), io["freqs_cis"], atol=1e-6)
  assert not rope.rope_2d_table(16, 16)[0].any()  # the class row is zero


def test_teacher_forced_logits_and_loss_match_golden(golden):
  model, params, io, _ = golden
  tokens = jnp.asarray(io["tokens"])
  logits, cache = model.apply({"params": params}, tokens[:, :-1], jnp.asarray(io["cls_ids"]))
  assert cache is None and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, io["tf_logits"], atol=ATOL, rtol=0)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens).mean()
  # A mean of log-softmaxes (~7) over 2 x 16 rows, f32: a few ulp of 7 each.
  np.testing.assert_allclose(float(loss), float(io["tf_loss"]), atol=1e-5)


def _decoding_layout(model, per_layer: bool):
  """The model as CPU configs build it (layer loop unrolled: decoding on per-layer weights and
  caches) or as TPU/GPU configs do (one scanned layer loop over stacked weights and cache)."""
  model = model.clone(scan_unroll=model.num_layers if per_layer else 1)
  assert sampler.decodes_per_layer(model) == per_layer or model.num_layers == 1
  return model


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("cfg", [1.0, 2.0])
def test_greedy_kv_cache_generation_matches_golden(golden, cfg, per_layer):
  model, params, io, _ = golden
  model = _decoding_layout(model, per_layer)
  tokens, logits = sampler.generate(model, params, io["cls_ids"], jax.random.PRNGKey(0),
                                    sampler.SamplingSettings(cfg_scale=cfg, top_k=1),
                                    return_logits=True)
  name = f"gen_cfg{int(cfg)}"
  assert_clear_argmax(io[f"{name}_step_logits"])
  np.testing.assert_array_equal(tokens, io[f"{name}_tokens"])
  np.testing.assert_allclose(logits, io[f"{name}_step_logits"], atol=ATOL, rtol=0)


# A second fixture set made here by the oracle: grouped KV heads, the FFN multiplier, a 8 x 8
# grid and another seed (the golden README's variant B shapes, with GQA added).
ORACLE = dict(dim=96, n_layer=2, n_head=6, n_kv_head=2, vocab_size=256, block_size=64,
              num_classes=10, multiple_of=32, ffn_dim_multiplier=1.3)


@pytest.fixture(scope="module")
def oracle():
  torch.manual_seed(3)
  ref = gpt_reference.GPT(**ORACLE)
  with torch.no_grad():
    for p in ref.parameters():  # no degenerate norms; a non-zero head
      p.add_(torch.randn_like(p) * 0.3)
  ref.eval()
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  model, params = gpt_io.gpt_from_state(state, source="oracle", num_heads=6, block_size=64)
  return ref, model, params


def test_oracle_config_is_inferred(oracle):
  _, model, params = oracle
  assert (model.num_kv_heads, model.ffn_hidden, model.num_layers) == (2, 352, 2)
  assert gpt_lib.num_params(params) == sum(p.numel() for p in oracle[0].parameters())


def test_teacher_forcing_matches_oracle(oracle):
  ref, model, params = oracle
  gen = torch.Generator().manual_seed(5)
  labels = torch.randint(0, 11, (3,), generator=gen)  # includes the null class sometimes
  tokens = torch.randint(0, 256, (3, 64), generator=gen)
  with torch.no_grad():
    want = ref(tokens[:, :-1], labels).numpy()
  got, _ = model.apply({"params": params}, jnp.asarray(tokens[:, :-1].numpy()),
                       jnp.asarray(labels.numpy()))
  np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_oracle_dropouts_apply_in_train_mode_only_and_generate_leaves_no_cache():
  """The benchmark's PyTorch side trains the oracle with the reference's dropouts: train mode
  changes the logits, eval mode is the dropout-free model; `generate()` drops its caches, so a
  later teacher-forcing forward (a training step) does not write into them."""
  torch.manual_seed(0)
  sizes = dict(dim=32, n_layer=1, n_head=2, n_kv_head=2, vocab_size=16, block_size=16,
               num_classes=3, multiple_of=32)
  plain = gpt_reference.GPT(**sizes)
  dropped = gpt_reference.GPT(**sizes, token_dropout=0.5, resid_dropout=0.5, ffn_dropout=0.5,
                              class_dropout=0.5)
  dropped.load_state_dict(plain.state_dict())
  tokens, labels = torch.randint(0, 16, (4, 15)), torch.tensor([0, 1, 2, 1])
  with torch.no_grad():
    want = plain.eval()(tokens, labels)
    np.testing.assert_array_equal(dropped.eval()(tokens, labels), want)
    assert not torch.allclose(dropped.train()(tokens, labels), want)
  gpt_reference.generate(dropped, labels, 2.0, keep_logits=False)
  assert all(layer.attention.k_cache is None for layer in dropped.layers)
  assert dropped(tokens, labels).shape == (4, 16, 16)


def test_top1_hits_is_argmax_ties_included():
  logits = jax.random.normal(jax.random.PRNGKey(0), (3, 50, 64))
  targets = jax.random.randint(jax.random.PRNGKey(1), (3, 50), 0, 64)
  targets = targets.at[0, :10].set(jnp.argmax(logits[0, :10], -1))  # some hits
  np.testing.assert_array_equal(gpt_task.top1_hits(logits, targets),
                                jnp.argmax(logits, -1) == targets)
  tie = jnp.array([[1.0, 3.0, 3.0], [1.0, 3.0, 3.0]])  # argmax picks index 1
  np.testing.assert_array_equal(gpt_task.top1_hits(tie, jnp.array([2, 1])), [False, True])
  # The zero-initialised head: every logit ties, so only targets equal to 0 are hits.
  zeros = jnp.zeros((2, 5, 16))
  targets = jnp.array([[0, 3, 0, 15, 7], [1, 0, 2, 0, 0]])
  np.testing.assert_array_equal(gpt_task.top1_hits(zeros, targets), targets == 0)


def test_layer_loop_is_unrolled_on_cpu_only_by_default():
  assert gpt_io.layer_loop_unroll(0, 12, "cpu") == 12
  assert gpt_io.layer_loop_unroll(0, 12, "tpu") == 1
  assert gpt_io.layer_loop_unroll(0, 12, "gpu") == 1
  assert gpt_io.layer_loop_unroll(3, 12, "cpu") == 3  # a chosen value stays
  with pytest.raises(ValueError, match="scan_unroll -1"):
    gpt_io.layer_loop_unroll(-1, 12, "cpu")
  cfg = gpt_configs.get_config("gpt_b").model
  assert gpt_io.model_from_config(cfg, platform="tpu").scan_unroll == 1
  assert gpt_io.model_from_config(cfg, platform="cpu").scan_unroll == 12
  assert not sampler.decodes_per_layer(gpt_io.model_from_config(cfg, platform="tpu"))
  assert sampler.decodes_per_layer(gpt_io.model_from_config(cfg, platform="cpu"))


@pytest.mark.parametrize("cfg,interval", [(1.0, -1), (3.0, -1), (3.0, 5)])
def test_greedy_generation_matches_oracle(oracle, cfg, interval):
  ref, model, params = oracle
  labels = np.array([1, 7, 7, 2])
  want_tokens, want_logits = gpt_reference.generate_greedy(ref, torch.tensor(labels), cfg,
                                                           interval)
  tokens, logits = sampler.generate(
      model, params, labels, jax.random.PRNGKey(0),
      sampler.SamplingSettings(cfg_scale=cfg, cfg_interval=interval, top_k=1),
      return_logits=True)
  assert_clear_argmax(want_logits.numpy())
  np.testing.assert_array_equal(tokens, want_tokens.numpy())
  np.testing.assert_allclose(logits, want_logits.numpy(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("per_layer", [False, True])
def test_kv_cache_decoding_equals_full_forward(oracle, per_layer):
  """Greedy tokens are the argmax of a no-cache forward over the generated sequence."""
  _, model, params = oracle
  model = _decoding_layout(model, per_layer)
  labels = jnp.array([0, 3, 9])
  tokens, logits = sampler.generate(model, params, labels, jax.random.PRNGKey(0),
                                    sampler.SamplingSettings(top_k=1), return_logits=True)
  full, _ = model.apply({"params": params}, tokens[:, :-1], labels)
  np.testing.assert_allclose(logits, full, atol=ATOL, rtol=0)
  assert_clear_argmax(full)
  np.testing.assert_array_equal(tokens, jnp.argmax(full, -1))


def test_filters_match_reference_sampler():
  gen = torch.Generator().manual_seed(0)
  logits = torch.randn(16, 300, generator=gen) * 3
  for top_k, top_p, temp in [(0, 0.9, 1.0), (20, 1.0, 0.7), (50, 0.5, 1.3), (1, 1.0, 1.0)]:
    _, want = gpt_reference.sample(logits.clone(), temp, top_k, top_p)
    got = sampling.filter_logits(jnp.asarray(logits.numpy()), temperature=temp, top_k=top_k,
                                 top_p=top_p)
    np.testing.assert_array_equal(np.isfinite(got), torch.isfinite(want).numpy())
    kept = np.isfinite(got)
    # Kept logits are the inputs divided by the temperature: one f32 rounding on each side.
    np.testing.assert_allclose(np.asarray(got)[kept], want.numpy()[kept], rtol=1e-6)


def test_sampling_is_reproducible_and_independent_of_the_batch_split(oracle):
  _, model, params = oracle
  settings = sampler.SamplingSettings(cfg_scale=2.0, temperature=1.0, top_k=50, top_p=0.95)
  labels = np.array([1, 2, 3, 4, 5, 6, 7, 8])
  key = jax.random.PRNGKey(7)
  whole, _ = sampler.generate(model, params, labels, key, settings)
  again, _ = sampler.generate(model, params, labels, key, settings)
  np.testing.assert_array_equal(whole, again)
  # Rows 4..7 alone, told their global rows, draw what they drew in the whole batch.
  # Exact across batch splits and meshes: each row's draw takes one uniform number and the
  # row's logits, which other splits round differently by ~1e-6; a token changes only if that
  # number falls within ~1e-6 of a CDF step, about 1e-6 x 8 rows x 64 tokens per comparison.
  half, _ = sampler.generate(model, params, labels[4:], key, settings,
                             row_ids=jnp.arange(4, 8))
  np.testing.assert_array_equal(half, whole[4:])
  # Sharded over 8 devices: the same samples.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
  sharded = jax.device_put(jnp.asarray(labels), jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("batch")))
  on_mesh, _ = sampler.generate(model, params, sharded, key, settings)
  np.testing.assert_array_equal(on_mesh, whole)
  other, _ = sampler.generate(model, params, labels, jax.random.PRNGKey(8), settings)
  assert (np.asarray(other) != np.asarray(whole)).mean() > 0.5


def test_cfg_free_skips_the_unconditional_half(oracle):
  _, model, params = oracle
  labels = jnp.zeros((8,), jnp.int32)

  def flops(cfg):
    s = sampler.SamplingSettings(cfg_scale=cfg)
    scales, guided = sampler.guidance(s, model.block_size)
    fn = sampler._compiled(model, s.guided, 0, 1.0, False)  # pylint: disable=protected-access
    lowered = fn.lower(params, labels, jnp.arange(8), jax.random.PRNGKey(0), scales, guided,
                       jnp.float32(1.0))
    return lowered.compile().cost_analysis()["flops"]
  assert flops(1.0) < 0.6 * flops(2.0)


def test_decoder_program_does_not_grow_with_depth(oracle):
  """With the layer loop kept (TPU and GPU configs), layers run under a scan in the decoder
  too: 2 and 4 layers lower to the same program apart from shapes (the same number of dots and
  ops), so compile time does not grow. (CPU configs unroll it: `decodes_per_layer`.)"""
  _, model, params = oracle
  labels = jnp.zeros((2,), jnp.int32)

  def program(num_layers):
    m = model.clone(num_layers=num_layers)
    p = dict(params, layers=jax.tree.map(
        lambda x: jnp.concatenate([x] * (-(-num_layers // x.shape[0])))[:num_layers],
        params["layers"]))
    s = sampler.SamplingSettings(cfg_scale=2.0)
    scales, guided = sampler.guidance(s, m.block_size)
    fn = sampler._compiled(m, True, 0, 1.0, False)  # pylint: disable=protected-access
    text = fn.lower(p, labels, jnp.arange(2), jax.random.PRNGKey(0), scales, guided,
                    jnp.float32(1.0)).as_text()
    return text.count("dot_general"), len(text.splitlines())
  two, four = program(2), program(4)
  assert two[0] > 0 and two == four


def test_guidance_schedule_and_interval():
  scale, guided = sampler.guidance(sampler.SamplingSettings(cfg_scale=3.0, cfg_interval=2), 8)
  np.testing.assert_array_equal(guided, [1, 1, 1, 1, 0, 0, 0, 0])
  scale, guided = sampler.guidance(sampler.SamplingSettings(cfg_scale=3.0,
                                                            cfg_schedule="linear"), 5)
  np.testing.assert_allclose(scale, [1.0, 1.5, 2.0, 2.5, 3.0])
  assert guided.all()
  _, guided = sampler.guidance(sampler.SamplingSettings(cfg_scale=1.0), 5)
  assert not guided.any()
  with pytest.raises(ValueError, match="cfg_schedule"):
    sampler.SamplingSettings(cfg_schedule="cosine")
  with pytest.raises(ValueError, match="top_p"):
    sampler.SamplingSettings(top_p=0.0)


# Parameter counts of spec 7.1 (vocab 16384, 1000 classes; GPT-B verified on the reference).
SPEC_PARAMS_M = {"gpt_b": 110.9, "gpt_l": 342.9, "gpt_xl": 774.7, "gpt_xxl": 1411.0,
                 "gpt_2b": 2188.4, "gpt_3b": 3096.7}


@pytest.mark.parametrize("name", sorted(SPEC_PARAMS_M))
def test_preset_parameter_counts(name):
  cfg = gpt_configs.get_config(name).model
  model = gpt_io.model_from_config(cfg)
  n = gpt_lib.num_params(gpt_io.expected_params(model))
  if name == "gpt_b":
    assert n == 110_888_448
  assert round(n / 1e6, 1) == SPEC_PARAMS_M[name]


def test_loader_names_every_bad_tensor(golden):
  *_, state = golden
  bad = dict(state)
  del bad["layers.1.feed_forward.w3.weight"]
  bad["layers.0.ffn_norm.weight"] = np.zeros(65, np.float32)
  bad["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(files.WeightLoadError) as e:
    gpt_io.gpt_from_state(bad, source="bad.pt", num_heads=4, block_size=16)
  text = str(e.value)
  for needle in ("layers.1.feed_forward.w3.weight", "layers.0.ffn_norm.weight", "extra.weight",
                 "bad.pt"):
    assert needle in text
  with pytest.raises(files.WeightLoadError, match="num_heads"):
    gpt_io.gpt_from_state(state, source="x", num_heads=5, block_size=16)
  with pytest.raises(files.WeightLoadError, match="square"):
    gpt_io.gpt_from_state(state, source="x", num_heads=4, block_size=15)
  # Wrapper prefixes and cache buffers are handled by name.
  wrapped = {f"_orig_mod.{k}": v for k, v in state.items()}
  wrapped["_orig_mod.layers.0.attention.kv_cache.k_cache"] = np.zeros((1, 4, 24, 16))
  _, params = gpt_io.gpt_from_state(wrapped, source="x", num_heads=4, block_size=16)
  round_trip = gpt_keys.to_reference(params)
  assert sorted(round_trip) == sorted(state)
  for k, v in state.items():
    np.testing.assert_array_equal(round_trip[k], v)


def test_convert_cli_reads_a_released_checkpoint(golden, tmp_path):
  """`convert gpt` on a train_c2i-style .pt ({model, ema, args: Namespace}): EMA converted,
  heads and grid from --config overrides, and the folder reproduces the golden logits."""
  model, params, io, state = golden
  ema = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
  raw = {k: torch.zeros_like(v) for k, v in ema.items()}  # 'model' differs: ema must be taken
  src = tmp_path / "c2i.pt"
  torch.save({"model": raw, "ema": ema, "steps": 10, "optimizer": {},
              "args": argparse.Namespace(gpt_model="GPT-B")}, src)
  dst = tmp_path / "gpt"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-m", "vfmtok_jax.convert", "gpt", str(src), str(dst),
                        "--config.model.num_heads=4", "--config.model.block_size=16",
                        "--config.model.dtype=float32"],
                       capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "10 classes" in out.stdout and "16 tokens" in out.stdout
  assert "CheckpointManager" not in out.stderr and "MetadataStore" not in out.stderr  # Orbax INFO
  loaded, loaded_params, meta = gpt_io.load_gpt(str(dst))
  assert (loaded.num_heads, loaded.block_size, loaded.num_classes) == (4, 16, 10)
  tokens = jnp.asarray(io["tokens"])
  logits, _ = loaded.apply({"params": loaded_params}, tokens[:, :-1], jnp.asarray(io["cls_ids"]))
  np.testing.assert_allclose(logits, io["tf_logits"], atol=ATOL, rtol=0)
  assert meta["source"] == str(src)
  # Without the head count the default (GPT-B: 12 heads) cannot split dim 64.
  bad = subprocess.run([sys.executable, "-m", "vfmtok_jax.convert", "gpt", str(src),
                        str(tmp_path / "bad")], capture_output=True, text=True, env=env,
                       cwd=ROOT, check=False)
  assert bad.returncode == 1 and "num_heads" in bad.stderr and "Traceback" not in bad.stderr
  assert not (tmp_path / "bad").exists()


def test_draws_follow_the_filtered_distribution():
  """Frequencies of 20,000 draws match softmax(filtered logits); filtered tokens never appear."""
  logits = jnp.asarray([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0]])
  keys = jax.random.split(jax.random.PRNGKey(0), 20000)
  draws = np.asarray(sampling.sample_rows(keys, jnp.repeat(logits, 20000, 0), top_k=4))
  probs = np.asarray(jax.nn.softmax(sampling.filter_logits(logits, top_k=4)))[0]
  freq = np.bincount(draws, minlength=6) / 20000
  np.testing.assert_allclose(freq, probs, atol=0.012)  # ~3.5 sigma at p = 0.5
  assert freq[3] == 0 and freq[5] == 0


@pytest.mark.parametrize("vocab", [1, 6, 1000])
def test_inverse_cdf_matches_a_float64_search(vocab):
  """The two-level inverse CDF returns the index numpy's search over the float64 running sum
  returns (filtered entries have weight 0 and are never returned)."""
  rng = np.random.default_rng(vocab)
  weights = rng.exponential(size=(64, vocab)) * (rng.random((64, vocab)) < 0.7)
  weights[:, rng.integers(vocab)] = 1.0  # every row has a positive entry
  u = rng.uniform(1e-6, 1.0, 64)
  got = np.asarray(sampling.inverse_cdf(jnp.asarray(weights, jnp.float32), jnp.asarray(u)))
  cdf = np.cumsum(weights, -1)
  want = np.array([np.searchsorted(c, x * c[-1]) for c, x in zip(cdf, u)])
  assert (weights[np.arange(64), got] > 0).all()
  np.testing.assert_array_equal(got, want)


_DROPOUT_COUNTS = {}  # module path -> [zeroed, nonzero inputs]; module-level: a layer scan's
                     # traced body may be reused by a later apply, callbacks and all


def _record_dropout(name, x, y):
  x, y = np.asarray(x), np.asarray(y)
  counts = _DROPOUT_COUNTS.setdefault(name, [0, 0])
  counts[0] += int(((y == 0) & (x != 0)).sum())
  counts[1] += int((x != 0).sum())


def _dropout_interceptor(next_fun, args, kwargs, context):
  y = next_fun(*args, **kwargs)
  if isinstance(context.module, nn.Dropout) and context.method_name == "__call__":
    jax.debug.callback(functools.partial(_record_dropout, "/".join(context.module.path)),
                       args[0], y)
  return y


def _dropout_fractions(model, params, tokens, labels, rng):
  """{Dropout module path: fraction of its nonzero inputs it zeroed} of one training-mode
  forward (read inside the layer scan with a debug callback)."""
  _DROPOUT_COUNTS.clear()
  with nn.intercept_methods(_dropout_interceptor):
    jax.block_until_ready(model.apply({"params": params}, tokens, labels, deterministic=False,
                                      rngs={"dropout": rng}))
  return {k: z / n for k, (z, n) in _DROPOUT_COUNTS.items()}


def test_dropouts_apply_their_rates_in_training_and_never_in_eval(golden):
  """Each dropout zeroes its rate of its inputs in training (direct count, one module at a
  time), the class dropout swaps its rate of the labels for the null class, and the eval
  forward (deterministic, the default) applies none of them."""
  model, params, _, _ = golden
  none = dict(token_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0,
              class_dropout=0.0)
  rng = np.random.default_rng(0)
  b = 256
  tokens = jnp.asarray(rng.integers(0, model.vocab_size, (b, model.block_size - 1)))
  labels = jnp.asarray(rng.integers(0, model.num_classes, b))
  plain, _ = model.clone(**none).apply({"params": params}, tokens, labels)
  for key, rate in [("token_dropout", 0.3), ("attn_dropout", 0.2), ("resid_dropout", 0.4),
                    ("ffn_dropout", 0.25)]:
    m = model.clone(**dict(none, **{key: rate}))
    fractions = _dropout_fractions(m, params, tokens, labels, jax.random.PRNGKey(1))
    active = {k: v for k, v in fractions.items() if v > 0}
    assert active, (key, fractions)
    # Tens of thousands of Bernoulli draws per module: 5 sigma is under 0.01.
    for name, frac in active.items():
      assert abs(frac - rate) < 0.01, (key, name, frac)
    eval_logits, _ = m.apply({"params": params}, tokens, labels)
    np.testing.assert_array_equal(eval_logits, plain)  # eval: no dropout at all
  # The class dropout: a row's training logits are either its label's or the null class's.
  m = model.clone(**dict(none, class_dropout=0.5))
  train, _ = m.apply({"params": params}, tokens, labels, deterministic=False,
                     rngs={"dropout": jax.random.PRNGKey(2)})
  null, _ = m.apply({"params": params}, tokens, jnp.full_like(labels, model.null_class))
  as_label = np.all(np.asarray(train) == np.asarray(plain), axis=(1, 2))
  as_null = np.all(np.asarray(train) == np.asarray(null), axis=(1, 2))
  assert np.all(as_label ^ as_null)
  assert abs(as_null.mean() - 0.5) < 5 * np.sqrt(0.25 / b)  # 5 sigma of 256 draws
  np.testing.assert_array_equal(m.apply({"params": params}, tokens, labels)[0], plain)
