"""`load_vfm` dispatch, Orbax save/restore of converted weights, and source errors."""

import json

import jax
import numpy as np
import pytest
import torch

from vfmtok_jax import vfm_zoo
from vfmtok_jax.convert import __main__ as convert_cli
from vfmtok_jax.models.vfm import preprocess
from vfmtok_jax.weights import dinov2 as dinov2_keys
from vfmtok_jax.weights import files


@pytest.fixture(scope="module")
def golden_pth(tmp_path_factory, tokenizer_state):
  backbone = files.strip_prefix(tokenizer_state, dinov2_keys.VFMTOK_PREFIX)
  path = tmp_path_factory.mktemp("pth") / "dinov2_golden.pth"
  torch.save({k: torch.from_numpy(v) for k, v in backbone.items()}, path)
  return str(path)


def test_convert_cli_then_restore(tmp_path, golden_pth, capsys):
  dst = tmp_path / "vfm_orbax"
  convert_cli.convert_vfm(golden_pth, str(dst), num_heads=3)
  assert "converted dinov2 (4 blocks, width 48" in capsys.readouterr().out
  original = vfm_zoo.load_vfm(golden_pth, num_heads=3)
  restored = vfm_zoo.load_vfm(str(dst))
  assert restored.kind == "dinov2" and restored.module == original.module
  assert restored.native_size == 518 and restored.mean == original.mean
  jax.tree.map(np.testing.assert_array_equal, original.params, restored.params)
  x = np.random.default_rng(0).standard_normal((1, 28, 42, 3)).astype(np.float32)
  a = original.module.apply({"params": original.params}, x)["last_hidden_state"]
  b = restored.module.apply({"params": restored.params}, x)["last_hidden_state"]
  np.testing.assert_array_equal(a, b)


def test_restore_refuses_a_different_tree(tmp_path, golden_pth):
  dst = tmp_path / "vfm_orbax"
  vfm_zoo.save_vfm(vfm_zoo.load_vfm(golden_pth, num_heads=3), str(dst))
  meta = json.loads((dst / vfm_zoo.VFM_JSON).read_text())
  meta["module"]["depth"] = 6  # the checkpoint holds 4 blocks
  (dst / vfm_zoo.VFM_JSON).write_text(json.dumps(meta))
  with pytest.raises(files.WeightLoadError,
                     match=r"does not fit: blocks_4/\S+: requested \(\d+.*not in the checkpoint"):
    vfm_zoo.load_vfm(str(dst))


def test_missing_source():
  with pytest.raises(FileNotFoundError, match="does not exist"):
    vfm_zoo.load_vfm("/nonexistent/dinov2.pth")


def test_folder_without_config(tmp_path):
  with pytest.raises(files.WeightLoadError, match="no config.json"):
    vfm_zoo.load_vfm(str(tmp_path))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_folder_dispatch(tmp_path, kind):
  import transformers  # pylint: disable=g-import-not-at-top
  cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             image_size=16, patch_size=4)
  if kind == "clip":
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg))
  else:
    model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**cfg))
  model.save_pretrained(tmp_path / kind)
  vfm = vfm_zoo.load_vfm(str(tmp_path / kind))
  assert vfm.kind == kind and vfm.width == 32 and vfm.native_size == 16
  assert vfm.mean == (preprocess.CLIP_MEAN if kind == "clip" else preprocess.SIGLIP_MEAN)
  x = np.random.default_rng(0).standard_normal((1, 16, 16, 3)).astype(np.float32)
  out = vfm.module.apply({"params": vfm.params}, x)
  assert [f.shape for f in out["levels"]] == [(1, 16, 32)] * 4
