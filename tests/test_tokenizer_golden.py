"""The tokenizer reproduces the official PyTorch VFMTok (golden fixture set A)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfmtok_jax import tokenizer_io as tok_io
from vfmtok_jax import vfm_zoo
from vfmtok_jax import vfmtok
from vfmtok_jax.data import images as image_io
from vfmtok_jax.losses import tokenizer_losses
from vfmtok_jax.models import tokenizer as tokenizer_lib
from vfmtok_jax.models.vfm import preprocess
from vfmtok_jax.ops import resize as resize_ops
from vfmtok_jax.weights import files
from vfmtok_jax.weights import tokenizer as tokenizer_keys
from vfmtok_jax.weights import trees

# What the golden config sets and the tensors cannot tell (fixture README, variant A).
GOLDEN_OVERRIDES = dict(decoder_heads=4, decoder_grid=16)
GOLDEN_LEVELS = (0, 1, 2, 3)


@pytest.fixture(scope="module")
def golden_tok(tokenizer_state):
  vfm_module, vfm_params = vfm_zoo.dinov2_from_official_state(tokenizer_state, source="golden",
                                                              num_heads=3)
  vfm = vfm_zoo.VFM("dinov2", vfm_module, vfm_params, preprocess.IMAGENET_MEAN,
                    preprocess.IMAGENET_STD, 518)
  model, params = tok_io.tokenizer_from_state(tokenizer_state, source="golden",
                                              **GOLDEN_OVERRIDES)
  return vfmtok.VFMTok(vfm, model, params, GOLDEN_LEVELS, (336, 336), "kornia_bicubic")


@pytest.fixture(scope="module")
def images(tokenizer_io):
  return jnp.asarray(tokenizer_io["images"].transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def eval_outputs(golden_tok, images):
  tok = golden_tok

  def run(params, vfm_params, images):
    feats = tok.features(vfm_params, images)
    enc, inter = tok.model.apply({"params": params}, feats["levels"], feats["grids"],
                                 method=tokenizer_lib.VFMTokenizer.encode,
                                 mutable=["intermediates"])
    codes = tok.model.apply({"params": params}, enc["indices"],
                            method=lambda m, i: m.slot_quantize.lookup(i))
    dec = tok.model.apply({"params": params}, codes, method=tokenizer_lib.VFMTokenizer.decode)
    return enc, inter["intermediates"]["encode_transformer"], dec
  return jax.jit(run)(tok.params, tok.vfm.params, images)


def test_inferred_config(golden_tok):
  m = golden_tok.model
  assert (m.vfm_width, m.dim, m.num_queries, m.num_levels, m.encoder_depth) == (48, 64, 16, 4, 2)
  assert (m.encoder_points, m.encoder_ffn_dim, m.codebook_size, m.code_dim) == (4, 256, 512, 12)
  assert (m.decoder_depth, m.decoder_pos_table, m.semantic_dim) == (2, 24, 1024)
  assert (m.pixel_ch, tuple(m.pixel_ch_mult), m.pixel_num_res_blocks) == (32, (1, 2), 1)
  assert m.image_size == 32


def test_encoder_intermediates(eval_outputs, tokenizer_io):
  enc, inter, _ = eval_outputs
  io = tokenizer_io
  # Against the official code's f32 outputs (PyTorch, another machine): each atol is ~100x the
  # rounding after that many layers on O(1) activations (1e-5 after a norm or one sampling step,
  # 1e-4 after attention/MLP stacks); a wrong layout, offset or norm moves them by > 1e-2.
  np.testing.assert_allclose(inter["carrier_normed"][0], io["carrier_normed"], atol=1e-5)
  np.testing.assert_allclose(inter["kv_features"][0][0], io["kv_feature0_b0"], atol=1e-4)
  np.testing.assert_allclose(inter["kv_features"][3][0], io["kv_feature3_b0"], atol=1e-4)
  msda = inter["layers_0"]["msda"][0]
  np.testing.assert_allclose(msda["sampling_locations"], io["msda_l0_sampling_locations"],
                             atol=1e-5)
  np.testing.assert_allclose(msda["attention_weights"], io["msda_l0_attention_weights"],
                             atol=1e-5)
  np.testing.assert_allclose(msda["output"], io["msda_l0_output"], atol=1e-4)
  for i in range(2):
    np.testing.assert_allclose(inter["layer_out"][i], io[f"deform_layer{i}_out"], atol=1e-4)
  np.testing.assert_allclose(enc["slots"], io["slots"], atol=1e-4)
  np.testing.assert_allclose(enc["z"], io["queries_prequant"], atol=1e-4)


def test_indices_and_codes(eval_outputs, tokenizer_io):
  enc, _, dec = eval_outputs
  # Exact codes: each runner-up trails by far more than f32 rounding (test_codes_have_clear_margins).
  np.testing.assert_array_equal(enc["indices"], tokenizer_io["indices"])
  np.testing.assert_allclose(enc["quant"], tokenizer_io["quant"], atol=1e-5)
  np.testing.assert_allclose(dec["post_quant"], tokenizer_io["post_quant"], atol=1e-5)


def test_decoder(eval_outputs, tokenizer_io, golden_tok):
  _, _, dec = eval_outputs
  io = tokenizer_io
  # Through the pixel decoder's ~20 f32 layers: rounding ~1e-6 of O(1) pixels.
  np.testing.assert_allclose(dec["pixel_features"], io["dec_z"].transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(dec["recon"], io["recon"].transpose(0, 2, 3, 1), atol=1e-4)
  # The public API: decode_indices and the reference's uint8 conversion (+-1 at rounding).
  recon = golden_tok.decode_indices(io["indices"])
  np.testing.assert_allclose(recon, io["recon"].transpose(0, 2, 3, 1), atol=1e-4)
  u8 = np.asarray(image_io.to_uint8(recon), np.int32)
  assert np.abs(u8 - io["codes_to_img_uint8"]).max() <= 1
  big = resize_ops.resize(recon, (48, 48), "torch_bicubic")
  u8 = np.asarray(image_io.to_uint8(big), np.int32)
  assert np.abs(u8 - io["codes_to_img_uint8_48"]).max() <= 1


def test_public_encode(golden_tok, images, tokenizer_io):
  np.testing.assert_array_equal(golden_tok.encode(images), tokenizer_io["indices"])
  out = golden_tok.encode(images, return_tokens=True)
  np.testing.assert_allclose(out["quant"], tokenizer_io["quant"], atol=1e-5)


def _train_losses(tok, params, vfm_params, images):
  out = tok.forward(params, vfm_params, images, train=True)
  rec = tokenizer_losses.reconstruction(images, out["recon"], "l2x2")  # the trainer's rec term
  total = rec + out["vq_loss"] + out["commit_loss"] + out["entropy_loss"]
  return total, dict(out, rec=rec)


def test_training_forward_losses_and_semantic(golden_tok, images, tokenizer_io):
  io = tokenizer_io
  total, out = jax.jit(functools.partial(_train_losses, golden_tok))(
      golden_tok.params, golden_tok.vfm.params, images)
  # The training forward (dropout off) against the official code's, as the eval path above.
  np.testing.assert_allclose(out["recon"], io["train_recon"].transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(out["semantic_pre_proj"][0], io["semantic_pre_proj_b0"], atol=1e-4)
  np.testing.assert_allclose(out["semantic"][:, :16], io["semantic_first16"], atol=1e-4)
  # rec and total match the reference to ~1.3e-7 relative (f32 rounding of 2 x 3 x 32 x 32 means).
  np.testing.assert_allclose(out["rec"], io["train_loss_rec"], rtol=1e-5, err_msg="rec")
  np.testing.assert_allclose(total, io["train_loss_total"], rtol=1e-5, err_msg="total")
  # The VQ and commitment losses are means of |q - z|^2 with q and z nearly equal (cancellation
  # in f32 costs ~2 digits against the rec loss's 1e-7): rtol 1e-4.
  for name, key in [("vq_loss", "train_loss_vq"), ("commit_loss", "train_loss_commit")]:
    np.testing.assert_allclose(out[name], io[key], rtol=1e-4, err_msg=name)
  # The reference counts code 0 as used (zero-initialised register); ours is batch statistics.
  used = set(np.asarray(out["indices"]).ravel().tolist())
  assert len(used | {0}) / 512 == pytest.approx(float(io["train_codebook_usage"]))
  assert float(out["codebook_usage"]) == pytest.approx(len(used) / 512)


def test_training_gradients(golden_tok, images, tokenizer_io, fixtures_dir):
  loss = lambda *args: _train_losses(golden_tok, *args)[0]
  grads = jax.jit(jax.grad(loss))(golden_tok.params, golden_tok.vfm.params, images)
  flat = trees.flatten(grads)
  mapping = tokenizer_keys.mapping_for(grads)
  by_key = {key: (path, fn) for path, (key, fn) in mapping.items()}
  names = [k[len("grad."):] for k in tokenizer_io if k.startswith("grad.")]
  assert len(names) == 15
  for name in names:
    path, fn = by_key[name]
    want = fn(tokenizer_io[f"grad.{name}"])
    scale = np.abs(want).max()
    # Gradients through the whole backward in f32, both frameworks: ~1e-6 of each tensor's scale.
    np.testing.assert_allclose(flat[path], want, atol=1e-4 * scale, rtol=1e-4, err_msg=name)

  # The L2 norm of EVERY trainable tensor's gradient (config.json, ~200 of them; the key map only
  # transposes, which keeps the norm). Real gradients have norms >= 1.4e-4 and agree to <= 2e-4
  # relative; 11 are analytically zero (attention k biases, conv biases followed by a norm) and
  # are f32 noise (<= 6.4e-8) in the reference, so ours must be below 1e-6 there too.
  ref = json.loads((fixtures_dir / "config.json").read_text())["tokenizer"]
  norms = ref["grad_norms"]
  no_grad = set(by_key) - set(norms)
  assert no_grad == set(ref["params_without_grad_in_train_loss"]), no_grad
  for name in no_grad:  # not in the loss's graph (the semantic branch, an unused token)
    np.testing.assert_array_equal(flat[by_key[name][0]], 0, err_msg=name)
  assert len(norms) == 200
  for name, want in norms.items():
    got = float(np.linalg.norm(np.asarray(flat[by_key[name][0]], np.float64)))
    if want > 1e-6:
      # Norms of gradients that pass through the VQ straight-through and the GAN-free loss sums:
      # relative f32 noise ~1e-5 on the smallest (> 1e-6) ones.
      np.testing.assert_allclose(got, want, rtol=1e-3, err_msg=name)
    else:
      assert got < 1e-6, (name, got, want)


def test_converter_rejects_bad_state(tokenizer_state):
  state = dict(tokenizer_state)
  del state["decoder.mid.1.q.weight"]
  state["decoder.extra.weight"] = np.zeros(2, np.float32)
  state["post_slots_quant.weight"] = np.zeros((64, 13), np.float32)
  with pytest.raises(files.WeightLoadError) as e:
    tok_io.tokenizer_from_state(state, source="bad", **GOLDEN_OVERRIDES)
  text = str(e.value)
  assert "decoder.mid.1.q.weight" in text and "decoder.extra.weight" in text
  assert "post_slots_quant.weight" in text


def test_codes_have_clear_margins(golden_tok, eval_outputs):
  """The suite compares codes exactly (with the goldens, across batch splits, devices and
  processes). That is sound only while no query sits near a tie: f32 rounding moves the
  distances 2 - 2 cos by ~1e-7, so the runner-up must trail the chosen code by far more."""
  enc, _, _ = eval_outputs
  codebook = np.asarray(golden_tok.model.apply(
      {"params": golden_tok.params}, method=lambda m: m.slot_quantize.codebook()), np.float64)
  z = np.asarray(enc["z"], np.float64).reshape(-1, codebook.shape[1])
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  d = np.sort(2.0 - 2.0 * z @ codebook.T, axis=-1)
  assert (d[:, 1] - d[:, 0]).min() > 1e-5
