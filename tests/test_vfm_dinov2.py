"""DINOv2 tower: parity with transformers and the VFMTok golden backbone; loaders; dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vfmtok_jax import vfm_zoo
from vfmtok_jax.models.vfm import dinov2
from vfmtok_jax.models.vfm import preprocess
from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights import files
from vfmtok_jax.weights.trees import expected_params


def _perturb_all(model, seed):
  """Adds 0.3 * N(0, 1) to EVERY parameter (weights, biases, norms, layer scales, tokens, table).

  HF's init (Linear std 0.02, zero biases) leaves attention near-uniform (zeroing q/k moves the
  outputs by ~3e-4 of their size) and every bias at 0, so mapping bugs there would pass; after
  this, uniform attention moves every block's output by ~60% of its size.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.3 * torch.randn(p.shape, generator=gen))


def _hf_model(tmp_path, registers, swiglu, seed):
  from transformers import Dinov2Config, Dinov2Model  # pylint: disable=g-import-not-at-top
  from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  kw = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=32,
            patch_size=4, use_swiglu_ffn=swiglu, layerscale_value=0.5)
  if registers:
    model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=4, **kw))
  else:
    model = Dinov2Model(Dinov2Config(**kw))
  _perturb_all(model, seed)
  model.eval()
  path = tmp_path / f"hf_{registers}_{swiglu}"
  model.save_pretrained(path)
  return model, str(path)


@pytest.mark.parametrize("registers,swiglu", [(False, False), (True, False), (True, True)])
def test_matches_transformers(tmp_path, registers, swiglu):
  hf, path = _hf_model(tmp_path, registers, swiglu, seed=1 + registers + 2 * swiglu)
  model, params = vfm_zoo.load_dinov2_hf_folder(path)
  levels = dinov2.default_levels(model.depth)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, levels=levels))
  start = 1 + model.num_register_tokens
  rng = np.random.default_rng(0)
  for hw in [(40, 40), (24, 36)]:  # table is 8x8: upscaled square and a non-square grid
    x = rng.standard_normal((2, 3) + hw).astype(np.float32)
    with torch.no_grad():
      ref = hf(torch.from_numpy(x), output_hidden_states=True)
    out = apply(params, jnp.asarray(x.transpose(0, 2, 3, 1)))
    # f32 rounding (ours vs torch f32, and torch f32 vs f64) measures <= 2e-6 of each output's
    # max magnitude (up to ~40 here), so compare at 2e-5 of it.
    # transformers' PyTorch DINOv2 vs ours, f32, a few layers: rounding ~1e-6 of the scale.
    tol = lambda want: 2e-5 * np.abs(want).max()
    last = ref.last_hidden_state.numpy()
    np.testing.assert_allclose(out["last_hidden_state"], last, rtol=0, atol=tol(last))
    assert levels == (0, 1, 2, 3)  # every block's output is compared
    for level, feat in zip(levels, out["levels"]):
      want = (ref.last_hidden_state if level == model.depth - 1
              else ref.hidden_states[level + 1])[:, start:].numpy()
      assert feat.shape == (2, hw[0] // 4 * hw[1] // 4, 32)
      np.testing.assert_allclose(feat, want, rtol=0, atol=tol(want),
                                 err_msg=f"level {level} at {hw}")


def test_golden_vfm(tokenizer_io, tokenizer_state):
  model, params = vfm_zoo.dinov2_from_official_state(tokenizer_state, source="golden", num_heads=3)
  assert model.num_register_tokens == 4 and model.depth == 4 and model.pos_grid == 37
  images = jnp.asarray(tokenizer_io["images"].transpose(0, 2, 3, 1))
  x = preprocess.vfm_input(images, size=(336, 336), resize="kornia_bicubic",
                           mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD)
  # The official preprocessing (PyTorch bicubic, another machine) vs ours: f32 taps, O(1).
  np.testing.assert_allclose(x[0, :112, :112],
                             tokenizer_io["vfm_input_b0_top_left_112"].transpose(1, 2, 0),
                             atol=1e-4)
  np.testing.assert_allclose(x[0, -56:, -56:],
                             tokenizer_io["vfm_input_b0_bottom_right_56"].transpose(1, 2, 0),
                             atol=1e-4)
  out = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
  for i in range(3):
    # The official code's DINOv2 features (PyTorch f32) through several blocks: ~1e-6 of O(1-10).
    np.testing.assert_allclose(out["levels"][i][0], tokenizer_io[f"vfm_level{i}_b0"], atol=1e-4)
  np.testing.assert_allclose(out["levels"][3], tokenizer_io["vfm_level3"], atol=1e-4)


def _golden_backbone(tokenizer_state):
  return files.strip_prefix(tokenizer_state, dinov2_keys.VFMTOK_PREFIX)


def test_official_pth_roundtrip(tmp_path, tokenizer_state):
  """A bare official .pth, a chunked one and the VFMTok-nested one load to the same params."""
  backbone = _golden_backbone(tokenizer_state)
  bare = tmp_path / "dinov2.pth"
  torch.save({k: torch.from_numpy(v) for k, v in backbone.items()}, bare)
  chunked = tmp_path / "chunked.pth"
  torch.save({k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k:
              torch.from_numpy(v) for k, v in backbone.items()}, chunked)
  nested = tmp_path / "vq.pt"
  torch.save({"model": {k: torch.from_numpy(v) for k, v in tokenizer_state.items()}}, nested)
  trees = [vfm_zoo.load_dinov2_official(str(p), num_heads=3)[1] for p in (bare, chunked, nested)]
  for tree in trees[1:]:
    jax.tree.map(np.testing.assert_array_equal, trees[0], tree)
  np.testing.assert_array_equal(trees[0]["blocks_2"]["attn"]["qkv"]["kernel"],
                                backbone["blocks.2.attn.qkv.weight"].T)


def _save(tmp_path, state, name="w.safetensors"):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  path = tmp_path / name
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
  return str(path)


def test_error_missing_key(tmp_path, tokenizer_state):
  state = _golden_backbone(tokenizer_state)
  del state["blocks.1.attn.proj.weight"]
  with pytest.raises(files.WeightLoadError, match=r"missing keys:\n.*blocks\.1\.attn\.proj\.weight"):
    vfm_zoo.load_dinov2_official(_save(tmp_path, state), num_heads=3)


def test_error_unexpected_key(tmp_path, tokenizer_state):
  state = _golden_backbone(tokenizer_state)
  state["blocks.1.attn.extra"] = np.zeros(3, np.float32)
  with pytest.raises(files.WeightLoadError, match=r"unexpected keys:\n.*blocks\.1\.attn\.extra"):
    vfm_zoo.load_dinov2_official(_save(tmp_path, state), num_heads=3)


def test_error_wrong_shape(tmp_path, tokenizer_state):
  state = _golden_backbone(tokenizer_state)
  state["blocks.3.mlp.fc1.weight"] = np.zeros((100, 48), np.float32)
  with pytest.raises(files.WeightLoadError, match=r"mis-shaped.*\n.*blocks\.3\.mlp\.fc1\.weight"):
    vfm_zoo.load_dinov2_official(_save(tmp_path, state), num_heads=3)


def test_error_wrong_format(tmp_path):
  bad = tmp_path / "weights.h5"
  bad.write_bytes(b"\x89HDF")
  with pytest.raises(files.WeightLoadError, match="unknown weight format"):
    vfm_zoo.load_dinov2_official(str(bad))
  corrupt = tmp_path / "weights.safetensors"
  corrupt.write_bytes(b"not a safetensors file")
  with pytest.raises(files.WeightLoadError, match="safetensors"):
    vfm_zoo.load_dinov2_official(str(corrupt))
  with pytest.raises(files.WeightLoadError, match="no such file"):
    vfm_zoo.load_dinov2_official(str(tmp_path / "absent.pth"))


class _Payload:
  """Any non-tensor object: weights_only loading must refuse to unpickle it."""


def test_pickled_objects_are_refused(tmp_path):
  path = tmp_path / "evil.pt"
  torch.save({"model": {"w": torch.zeros(2)}, "obj": _Payload()}, path)
  with pytest.raises(files.WeightLoadError, match="weights_only"):
    files.read_state_dict(str(path))


def test_bfloat16_close_to_float32(tokenizer_io, tokenizer_state):
  model, params = vfm_zoo.dinov2_from_official_state(tokenizer_state, source="golden", num_heads=3)
  model_bf16 = model.clone(dtype=jnp.bfloat16)
  images = jnp.asarray(tokenizer_io["images"].transpose(0, 2, 3, 1))
  x = preprocess.vfm_input(images, size=(112, 112), resize="kornia_bicubic",
                           mean=preprocess.IMAGENET_MEAN, std=preprocess.IMAGENET_STD)
  f32 = model.apply({"params": params}, x)["levels"]
  bf16 = model_bf16.apply({"params": params}, x)["levels"]
  for a, b in zip(f32, bf16):
    assert b.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    assert cos.min() >= 0.999, cos.min()


def test_default_levels():
  assert dinov2.default_levels(24) == (5, 11, 17, 23)
  assert dinov2.default_levels(12) == (2, 5, 8, 11)
  assert dinov2.default_levels(6) == (0, 2, 3, 5)
  with pytest.raises(ValueError, match=r"needs at least 4 blocks, got 3"):
    dinov2.default_levels(3)


def test_variants_param_count():
  model = dinov2.dinov2("L", registers=True)
  shapes = expected_params(model, np.zeros((1, 14, 14, 3), np.float32))
  n = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert n == 304_372_736  # spec 0: DINOv2-L backbone parameter count (mask_token included)
