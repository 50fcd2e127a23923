"""CLIP / SigLIP vision towers and their HF loader against transformers' PyTorch models.

Tiny random models (width 32, 4 layers, 4 heads, patch 4, native 16x16) are saved with
`save_pretrained` and loaded back through `vfmtok_jax.vfm_zoo` (key maps: `weights.hf_vision`).
"""

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
import torch  # in the test extra: a missing one must fail, not skip
import transformers

from vfmtok_jax import vfm_zoo
from vfmtok_jax.models.vfm import clip
from vfmtok_jax.models.vfm import siglip
from vfmtok_jax.weights import files
from vfmtok_jax.weights import hf_vision as hf_keys
from vfmtok_jax.weights import trees

TOL = 1e-4
DEPTH = 4
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=DEPTH, num_attention_heads=4,
              patch_size=4, image_size=16)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
            vocab_size=64, max_position_embeddings=16)
# Native, non-square (up in H, down in W), and sizes that are not patch multiples.
SIZES = [(16, 16), (24, 12), (18, 30)]


def _perturb(model, seed: int):
  """Random LayerNorm weights/biases and non-zero biases everywhere; eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith("bias") or name.endswith("in_proj_bias"):
        p.add_(0.1 * noise)
  return model.eval()


def _save(model, path) -> str:
  model.save_pretrained(str(path))
  return str(path)


@pytest.fixture(scope="module")
def clip_hf(tmp_path_factory):
  torch.manual_seed(0)
  model = _perturb(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)), 1)
  return model, _save(model, tmp_path_factory.mktemp("clip_vision"))


@pytest.fixture(scope="module")
def siglip_hf(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.SiglipVisionConfig(vision_use_head=True, **VISION)
  model = _perturb(transformers.SiglipVisionModel(cfg), 2)
  return model, _save(model, tmp_path_factory.mktemp("siglip_vision"))


def _hf_outputs(model, images: np.ndarray):
  h, w = images.shape[1:3]
  native = (h, w) == (VISION["image_size"],) * 2
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)), output_hidden_states=True,
                interpolate_pos_encoding=not native)
  to_np = lambda t: t.detach().numpy()
  return {"hidden": [to_np(t) for t in out.hidden_states], "last": to_np(out.last_hidden_state),
          "pooled": None if out.pooler_output is None else to_np(out.pooler_output)}


def _run(module, params, images, levels):
  fn = jax.jit(lambda p, x: module.apply({"params": p}, x, levels=levels))
  return jax.tree.map(np.asarray, fn(params, images))


def _close(a, b, what):
  assert a.shape == b.shape, (what, a.shape, b.shape)
  err = float(np.max(np.abs(a - b)))
  assert err < TOL, f"{what}: max abs error {err}"


@pytest.mark.parametrize("hw", SIZES)
def test_clip_parity(clip_hf, hw):
  hf_model, folder = clip_hf
  module, params = vfm_zoo.load_clip_folder(folder)
  assert isinstance(module, clip.CLIPVision)
  images = np.random.default_rng(hw[0]).standard_normal((2,) + hw + (3,)).astype(np.float32)
  ref = _hf_outputs(hf_model, images)
  assert len(ref["hidden"]) == DEPTH + 1
  levels = tuple(range(DEPTH))
  out = _run(module, params, images, None)  # default levels = (0, 1, 2, 3) at depth 4
  assert len(out["levels"]) == DEPTH
  grid = (hw[0] // 4, hw[1] // 4)
  assert out["grid"] == grid
  for level, feat in zip(levels, out["levels"]):
    assert feat.shape == (2, grid[0] * grid[1], 32)
    _close(feat, ref["hidden"][level + 1][:, 1:], f"CLIP level {level}")
  _close(out["last_hidden_state"], ref["last"], "CLIP last_hidden_state")
  _close(out["levels"][-1], ref["last"][:, 1:], "CLIP last level")
  _close(out["pooled"], ref["pooled"], "CLIP pooled")


@pytest.mark.parametrize("hw", SIZES)
def test_siglip_parity(siglip_hf, hw):
  hf_model, folder = siglip_hf
  module, params = vfm_zoo.load_siglip_folder(folder)
  assert isinstance(module, siglip.SiglipVision) and module.use_head
  images = np.random.default_rng(hw[1]).standard_normal((2,) + hw + (3,)).astype(np.float32)
  ref = _hf_outputs(hf_model, images)
  levels = tuple(range(DEPTH))
  out = _run(module, params, images, levels)
  assert len(out["levels"]) == DEPTH
  assert out["grid"] == (hw[0] // 4, hw[1] // 4)
  for level, feat in zip(levels[:-1], out["levels"][:-1]):
    _close(feat, ref["hidden"][level + 1], f"SigLIP level {level}")
  # The last level is the post_layernorm output (= HF last_hidden_state), not the raw block.
  _close(out["levels"][-1], ref["last"], "SigLIP last level")
  _close(out["last_hidden_state"], ref["last"], "SigLIP last_hidden_state")
  _close(out["pooled"], ref["pooled"], "SigLIP pooled")


def test_levels_arg(clip_hf, siglip_hf):
  """levels=None is the last block of each quarter ((0, 1, 2, 3) here, which the parity tests
  use); out-of-range levels are refused."""
  images = np.zeros((1, 16, 16, 3), np.float32)
  for (_, folder), load in ((clip_hf, vfm_zoo.load_clip_folder),
                            (siglip_hf, vfm_zoo.load_siglip_folder)):
    module, params = load(folder)
    assert clip.check_levels(None, module.depth, "x") == tuple(range(DEPTH))
    with pytest.raises(ValueError, match="out of range"):
      module.apply({"params": params}, images, levels=(DEPTH,))


def test_siglip_without_head(tmp_path):
  torch.manual_seed(3)
  cfg = transformers.SiglipVisionConfig(vision_use_head=False, **VISION)
  hf_model = _perturb(transformers.SiglipVisionModel(cfg), 4)
  module, params = vfm_zoo.load_hf_vision_folder(_save(hf_model, tmp_path / "m"))
  assert not module.use_head and "head" not in params
  images = np.random.default_rng(1).standard_normal((1, 16, 16, 3)).astype(np.float32)
  out = _run(module, params, images, None)
  assert "pooled" not in out
  _close(out["last_hidden_state"], _hf_outputs(hf_model, images)["last"],
         "SigLIP (no head) last_hidden_state")


def _assert_same_params(a, b):
  fa, fb = trees.flatten(a), trees.flatten(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_full_models_and_prefixes(tmp_path, clip_hf, siglip_hf):
  """A full CLIPModel / SiglipModel folder loads its vision tower; so does a v4-style
  `vision_model.`-prefixed vision-only folder."""
  torch.manual_seed(5)
  full = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION,
                                                        projection_dim=16))
  folder = _save(full.eval(), tmp_path / "clip_full")
  module, params = vfm_zoo.load_hf_vision_folder(folder)
  assert isinstance(module, clip.CLIPVision) and module.depth == DEPTH
  vision_state = {k[len("vision_model."):]: v.numpy() for k, v in full.state_dict().items()
                  if k.startswith("vision_model.")}
  _assert_same_params(params, vfm_zoo.clip_from_hf_state(
      vision_state, files.read_hf_config(folder), source="vision part")[1])
  images = np.random.default_rng(2).standard_normal((1, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    want = full.vision_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
  _close(_run(module, params, images, None)["pooled"], want.numpy(), "full CLIP pooled")

  full = transformers.SiglipModel(transformers.SiglipConfig(text_config=TEXT,
                                                            vision_config=VISION))
  module, params = vfm_zoo.load_hf_vision_folder(_save(full.eval(), tmp_path / "siglip_full"))
  assert isinstance(module, siglip.SiglipVision) and module.use_head
  with torch.no_grad():
    want = full.vision_model(torch.from_numpy(images.transpose(0, 3, 1, 2))).pooler_output
  _close(_run(module, params, images, None)["pooled"], want.numpy(), "full SigLIP pooled")

  # v4 layout: vision-only models saved under `vision_model.` (plus an old position_ids buffer).
  for (_, src), name in ((clip_hf, "clip_v4"), (siglip_hf, "siglip_v4")):
    dst = tmp_path / name
    dst.mkdir()
    state = {f"vision_model.{k}": v for k, v in
             load_file(os.path.join(src, "model.safetensors")).items()}
    state["vision_model.embeddings.position_ids"] = np.arange(17 if "clip" in name else 16)[None]
    save_file(state, str(dst / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(dst / "config.json", "w") as g:
      g.write(f.read())
    _assert_same_params(vfm_zoo.load_hf_vision_folder(str(dst))[1],
                        vfm_zoo.load_hf_vision_folder(src)[1])


def _edited_copy(src: str, dst, edit) -> str:
  os.makedirs(dst)
  state = load_file(os.path.join(src, "model.safetensors"))
  edit(state)
  save_file(state, os.path.join(dst, "model.safetensors"))
  with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
    g.write(f.read())
  return str(dst)


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_loader_errors(tmp_path, clip_hf, siglip_hf, family):
  src = (clip_hf if family == "clip" else siglip_hf)[1]
  load = vfm_zoo.load_hf_vision_folder
  gone = "encoder.layers.2.mlp.fc1.bias"
  folder = _edited_copy(src, tmp_path / "missing", lambda s: s.pop(gone))
  with pytest.raises(files.WeightLoadError, match="missing") as e:
    load(folder)
  assert any(gone in m for m in e.value.missing) and gone in str(e.value)

  extra = "encoder.layers.0.self_attn.extra_proj.weight"
  folder = _edited_copy(src, tmp_path / "extra",
                        lambda s: s.__setitem__(extra, np.zeros((2, 2), np.float32)))
  with pytest.raises(files.WeightLoadError, match="unexpected") as e:
    load(folder)
  assert e.value.unexpected == [extra] and extra in str(e.value)

  bad = ["post_layernorm.weight", "encoder.layers.1.self_attn.k_proj.weight"]
  def reshape(s):
    s[bad[0]] = np.ones((31,), np.float32)
    s[bad[1]] = np.ones((32, 30), np.float32)
  folder = _edited_copy(src, tmp_path / "shape", reshape)
  with pytest.raises(files.WeightLoadError, match="mis-shaped") as e:
    load(folder)
  assert len(e.value.mismatched) == 2
  for key in bad:
    assert any(key in m for m in e.value.mismatched), (key, e.value.mismatched)


def test_dispatch_refuses_other_types(tmp_path):
  for model_type, err in (("dinov2", hf_keys.NotHandledHere),
                          ("dinov2_with_registers", hf_keys.NotHandledHere),
                          ("vit", ValueError)):
    folder = tmp_path / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(err, match="not handled here" if err is hf_keys.NotHandledHere
                       else "unsupported model_type"):
      vfm_zoo.load_hf_vision_folder(str(folder))
  with pytest.raises(files.WeightLoadError, match="config.json"):
    vfm_zoo.load_hf_vision_folder(str(tmp_path))
