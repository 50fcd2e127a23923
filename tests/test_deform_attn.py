"""Multi-scale deformable attention: golden fixture, transformers' PyTorch reference, module
init and state-dict parity, batch sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from transformers.models.oneformer.modeling_oneformer import (
    multi_scale_deformable_attention as torch_msda)

from vfmtok_jax.models import deform_attn

IMPLS = ("packed", "unrolled")  # "auto" is "unrolled" on CPU; it runs in the tests below


@pytest.fixture(scope="module")
def msda_io(fixtures_dir):
  with np.load(fixtures_dir / "msda_io.npz") as f:
    return {k: f[k] for k in f.files}


def _vjp(impl, shapes, value, loc, attn, grad_out, dtype=None):
  fn = jax.jit(lambda v, l, a: deform_attn.ms_deform_attn(v, shapes, l, a, impl=impl,
                                                          dtype=dtype))
  out, vjp = jax.vjp(fn, value, loc, attn)
  return (out, *vjp(jnp.asarray(grad_out, out.dtype)))


def _torch_ref(shapes, value, loc, attn, grad_out):
  """transformers' grid_sample implementation: output and autograd VJPs (float64 numpy)."""
  tensors = [torch.tensor(x, requires_grad=True) for x in (value, loc, attn)]
  out = torch_msda(tensors[0], list(shapes), tensors[1], tensors[2])
  out.backward(torch.tensor(grad_out))
  return [out.detach().numpy()] + [t.grad.numpy() for t in tensors]


def _random_inputs(rng, shapes, n, lq, m, d, p, lo=-0.3, hi=1.3):
  s = sum(h * w for h, w in shapes)
  value = rng.standard_normal((n, s, m, d)).astype(np.float32)
  loc = rng.uniform(lo, hi, (n, lq, m, len(shapes), p, 2)).astype(np.float32)
  attn = rng.uniform(0, 1, (n, lq, m, len(shapes), p)).astype(np.float32)
  grad_out = rng.standard_normal((n, lq, m * d)).astype(np.float32)
  return value, loc, attn, grad_out


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_fixture_float32(msda_io, impl):
  io = msda_io
  shapes = tuple(map(tuple, io["spatial_shapes"].tolist()))
  out, gv, gl, ga = _vjp(impl, shapes, io["value"], io["sampling_locations"],
                         io["attention_weights"], io["grad_output"])
  assert out.shape == io["output"].shape and out.dtype == jnp.float32
  # The official CUDA-free PyTorch path against ours, f32: outputs are sums of L x P ~ 16
  # bilinear samples of O(1) values (few ulp); gradients also sum over queries (~1e-5).
  np.testing.assert_allclose(out, io["output"], atol=1e-5, rtol=0)
  np.testing.assert_allclose(gv, io["grad_value"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(gl, io["grad_sampling_locations"], atol=1e-4, rtol=0)
  np.testing.assert_allclose(ga, io["grad_attention_weights"], atol=1e-4, rtol=0)
  # The fixture really exercises out-of-range samples and non-trivial gradients.
  loc = io["sampling_locations"]
  assert ((loc < 0) | (loc > 1)).any(-1).mean() > 0.3
  assert np.abs(io["grad_sampling_locations"]).max() > 0.1


@pytest.mark.parametrize("impl", IMPLS)
def test_golden_fixture_float64(msda_io, impl):
  io = msda_io
  shapes = tuple(map(tuple, io["spatial_shapes"].tolist()))
  with jax.enable_x64(True):
    args = [io[k].astype(np.float64) for k in
            ("value", "sampling_locations", "attention_weights", "grad_output")]
    out, gv, gl, ga = _vjp(impl, shapes, *args)
    assert out.dtype == jnp.float64 and gl.dtype == jnp.float64
    # float64 on both sides: the same sums to ~1e-15; 1e-10 leaves room for the order only.
    np.testing.assert_allclose(out, io["output_f64"], atol=1e-10, rtol=0)
    np.testing.assert_allclose(gv, io["grad_value_f64"], atol=1e-10, rtol=0)
    np.testing.assert_allclose(gl, io["grad_sampling_locations_f64"], atol=1e-10, rtol=0)
    np.testing.assert_allclose(ga, io["grad_attention_weights_f64"], atol=1e-10, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_transformers_random_shapes(impl):
  rng = np.random.default_rng(0)
  shapes = ((7, 5), (4, 9), (3, 3), (1, 2))  # non-square, a 1-row level
  value, loc, attn, grad_out = _random_inputs(rng, shapes, n=2, lq=11, m=3, d=5, p=3)
  assert ((loc < 0) | (loc > 1)).any(-1).mean() > 0.2
  ours = _vjp(impl, shapes, value, loc, attn, grad_out)
  ref = _torch_ref(shapes, value, loc, attn, grad_out)
  # transformers' PyTorch function, f32, as for the golden fixture above.
  np.testing.assert_allclose(ours[0], ref[0], atol=1e-5, rtol=0)
  for got, want in zip(ours[1:], ref[1:]):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_location_gradients_at_borders():
  """Hand-placed samples: far outside, in the half-pixel border band, on pixel centres."""
  shapes = ((4, 6), (3, 2))
  rng = np.random.default_rng(1)
  value, _, attn, grad_out = _random_inputs(rng, shapes, n=1, lq=8, m=2, d=4, p=2)
  xs = np.array([-0.5, -0.05, -1 / 12 + 1e-3, 0.5 / 6, 0.37, 1 - 0.3 / 6, 1.04, 1.7], np.float32)
  ys = np.array([0.5, 0.2, -0.1, 1.1, 0.9, 0.0, 0.6, 0.3], np.float32)
  loc = np.zeros((1, 8, 2, 2, 2, 2), np.float32)
  loc[..., 0] = xs[None, :, None, None, None] + 0.01 * np.arange(2)[:, None, None]
  loc[..., 1] = ys[None, :, None, None, None] + 0.01 * np.arange(2)[:, None]
  ref = _torch_ref(shapes, value, loc, attn, grad_out)
  ours = _vjp("auto", shapes, value, loc, attn, grad_out)
  # f32 against PyTorch, few samples per query: a few ulp of O(1) values.
  for got, want in zip(ours, ref):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # Samples entirely outside (x = -0.5 or 1.7) contribute nothing and get zero gradient.
  assert np.all(ref[2][:, [0, 7]] == 0) and np.all(ours[2][:, [0, 7]] == 0)
  assert np.abs(ref[2]).max() > 0.1


def test_bfloat16_gather_dtype():
  rng = np.random.default_rng(2)
  shapes = ((6, 4), (3, 5))
  value, loc, attn, grad_out = _random_inputs(rng, shapes, n=2, lq=5, m=2, d=8, p=2)
  ref = _torch_ref(shapes, value, loc, attn, grad_out)
  b16 = _vjp("auto", shapes, value, loc, attn, grad_out, dtype=jnp.bfloat16)
  assert b16[0].dtype == jnp.float32 and b16[1].dtype == jnp.float32
  for got, want in zip(b16, ref):
    scale = np.abs(want).max()
    assert 0 < np.abs(np.asarray(got) - want).max() < 2e-2 * scale


HEAD_DIRS = np.array([(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)],
                     np.float32)


def test_module_init_matches_reference_init():
  n, lq, d, shapes, npt = 2, 6, 32, ((5, 4), (3, 3), (2, 1)), 4
  nl = len(shapes)
  s = sum(h * w for h, w in shapes)
  model = deform_attn.MSDeformAttn(d_model=d, n_levels=nl, n_heads=8, n_points=npt)
  rng = np.random.default_rng(3)
  query = jnp.asarray(rng.standard_normal((n, lq, d)), jnp.float32)
  ref = jnp.asarray(rng.uniform(0.1, 0.9, (n, lq, nl, 2)), jnp.float32)
  value_in = jnp.asarray(rng.standard_normal((n, s, d)), jnp.float32)
  init = jax.jit(lambda key: model.init_with_output(key, query, ref, value_in, shapes,
                                                    return_aux=True))
  (_, aux), variables = init(jax.random.PRNGKey(0))
  params = nn.unbox(variables["params"])
  assert set(params) == {"sampling_offsets", "attention_weights", "value_proj", "output_proj"}

  off = params["sampling_offsets"]
  assert off["kernel"].shape == (d, 8 * nl * npt * 2) and not np.any(off["kernel"])
  bias = np.asarray(off["bias"]).reshape(8, nl, npt, 2)
  want = HEAD_DIRS[:, None, None, :] * np.arange(1, npt + 1, dtype=np.float32)[None, None, :, None]
  np.testing.assert_allclose(bias, np.broadcast_to(want, bias.shape), atol=1e-6)
  for k in ("kernel", "bias"):
    assert not np.any(params["attention_weights"][k])
  for name in ("value_proj", "output_proj"):
    kernel = np.asarray(params[name]["kernel"])
    bound = np.sqrt(6.0 / (2 * d))  # xavier-uniform
    assert np.abs(kernel).max() <= bound and kernel.std() > 0.4 * bound
    assert not np.any(params[name]["bias"])
  # Logical axes for sharding rules.
  assert variables["params"]["value_proj"]["kernel"].names == ("embed", "heads_merged")
  assert variables["params"]["output_proj"]["kernel"].names == ("heads_merged", "embed")

  np.testing.assert_allclose(aux["attention_weights"], 1.0 / (nl * npt), rtol=1e-6)
  norm = np.array([[w, h] for h, w in shapes], np.float32)
  want_loc = (np.asarray(ref)[:, :, None, :, None, :]
              + bias[None, None] / norm[None, None, None, :, None, :])
  np.testing.assert_allclose(aux["sampling_locations"], want_loc, atol=1e-6)


def test_module_matches_state_dict_computation():
  """Module == manual torch-layout projections + the pure function (and transformers' core)."""
  n, lq, d, m, npt, shapes = 2, 7, 24, 4, 3, ((6, 5), (3, 4))
  nl = len(shapes)
  s = sum(h * w for h, w in shapes)
  model = deform_attn.MSDeformAttn(d_model=d, n_levels=nl, n_heads=m, n_points=npt)
  rng = np.random.default_rng(4)
  query = rng.standard_normal((n, lq, d)).astype(np.float32)
  ref = rng.uniform(0, 1, (n, lq, nl, 2)).astype(np.float32)
  value_in = rng.standard_normal((n, s, d)).astype(np.float32)
  mask = rng.uniform(size=(n, s)) > 0.2
  # A random torch-style state dict (weight (out, in)) for the module's parameter tree.
  abstract = jax.eval_shape(lambda key: model.init(key, query, ref, value_in, shapes),
                            jax.random.PRNGKey(1))
  state = {}
  for name, sub in nn.unbox(abstract["params"]).items():
    state[f"{name}.weight"] = 0.3 * rng.standard_normal(sub["kernel"].shape[::-1])
    state[f"{name}.bias"] = 0.3 * rng.standard_normal(sub["bias"].shape)
  state = {k: v.astype(np.float32) for k, v in state.items()}
  params = {name: {"kernel": jnp.asarray(state[f"{name}.weight"].T),
                   "bias": jnp.asarray(state[f"{name}.bias"])}
            for name in nn.unbox(abstract["params"])}
  apply = jax.jit(lambda p: model.apply({"params": p}, query, ref, value_in, shapes,
                                        value_mask=mask, return_aux=True))
  out, aux = apply(params)

  lin = lambda x, name: x @ state[f"{name}.weight"].T + state[f"{name}.bias"]
  value = np.where(mask[..., None], lin(value_in, "value_proj"), 0).reshape(n, s, m, d // m)
  offsets = lin(query, "sampling_offsets").reshape(n, lq, m, nl, npt, 2)
  logits = lin(query, "attention_weights").reshape(n, lq, m, nl * npt)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn = (attn / attn.sum(-1, keepdims=True)).reshape(n, lq, m, nl, npt)
  norm = np.array([[w, h] for h, w in shapes], np.float32)
  loc = ref[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
  core = jax.jit(deform_attn.ms_deform_attn, static_argnums=1)(
      jnp.asarray(value), shapes, jnp.asarray(loc), jnp.asarray(attn))
  want = lin(np.asarray(core), "output_proj")

  np.testing.assert_allclose(aux["sampling_locations"], loc, atol=1e-5)
  np.testing.assert_allclose(aux["attention_weights"], attn, atol=1e-6)
  np.testing.assert_allclose(aux["output"], core, atol=1e-5)
  np.testing.assert_allclose(out, want, atol=1e-4)
  torch_core = torch_msda(torch.tensor(value), list(shapes), torch.tensor(loc),
                          torch.tensor(attn)).numpy()
  np.testing.assert_allclose(aux["output"], torch_core, atol=1e-5)
  assert ((loc < 0) | (loc > 1)).any() and np.abs(np.asarray(core)).max() > 0.1


@pytest.mark.parametrize("impl", IMPLS)
def test_batch_sharded_jit_matches_unsharded(impl):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch = NamedSharding(mesh, P("data"))
  rng = np.random.default_rng(5)
  shapes = ((5, 6), (3, 3))
  value, loc, attn, grad_out = _random_inputs(rng, shapes, n=8, lq=6, m=2, d=4, p=2)

  def fwd_bwd(v, l, a, g):
    out, vjp = jax.vjp(lambda *x: deform_attn.ms_deform_attn(x[0], shapes, *x[1:], impl=impl),
                       v, l, a)
    return (out, *vjp(g))

  want = jax.jit(fwd_bwd)(value, loc, attn, grad_out)
  args = [jax.device_put(x, batch) for x in (value, loc, attn, grad_out)]
  sharded = jax.jit(fwd_bwd, in_shardings=batch).lower(*args).compile()
  got = sharded(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-6, rtol=0)
    assert g.sharding.is_equivalent_to(batch, g.ndim)
  # Batched gathers/scatters: each shard works alone, no cross-device traffic.
  hlo = sharded.as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
    assert collective not in hlo
