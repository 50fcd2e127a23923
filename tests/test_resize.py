"""Resize matrices reproduce torch.nn.functional.interpolate and kornia exactly."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vfmtok_jax.ops import resize


def _ours(x_nchw, out_hw, method, scale_factor=None):
  y = resize.resize(jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), out_hw, method, scale_factor)
  return np.asarray(y).transpose(0, 3, 1, 2)


@pytest.mark.parametrize("in_hw,out_hw", [((37, 37), (24, 24)), ((37, 37), (16, 40)),
                                          ((8, 8), (5, 11)), ((24, 24), (24, 30))])
def test_bicubic_sizes(in_hw, out_hw):
  x = np.random.default_rng(0).standard_normal((1, 3) + in_hw).astype(np.float64)
  t = torch.from_numpy(x)
  for method, kw in [("torch_bicubic", dict(align_corners=False)),
                     ("torch_bicubic_align_corners", dict(align_corners=True)),
                     ("torch_bicubic_antialias", dict(align_corners=False, antialias=True))]:
    want = F.interpolate(t, size=out_hw, mode="bicubic", **kw).numpy()
    # torch's f32 kernels vs our weight matrices: <= 16 taps of O(1) values, a few ulp each.
    np.testing.assert_allclose(_ours(x, out_hw, method), want, atol=1e-5, err_msg=method)


def test_bicubic_scale_factor_is_not_size():
  """The VFMTok decoder's `scale_factor=(g+0.1)/24` resize maps coordinates with 24/(g+0.1)."""
  x = np.random.default_rng(1).standard_normal((1, 4, 24, 24))
  sf = (16.1 / 24, 16.1 / 24)
  want = F.interpolate(torch.from_numpy(x), scale_factor=sf, mode="bicubic",
                       align_corners=False).numpy()
  assert want.shape[-2:] == (16, 16)
  got = _ours(x, (16, 16), "torch_bicubic", scale_factor=sf)
  # As above: f32 taps summed in another order.
  np.testing.assert_allclose(got, want, atol=1e-5)
  naive = _ours(x, (16, 16), "torch_bicubic")
  assert np.abs(naive - want).max() > 0.1


@pytest.mark.parametrize("in_hw,out_hw", [((32, 32), (336, 336)), ((60, 45), (28, 28)),
                                          ((50, 50), (50, 50))])
def test_kornia_resize(in_hw, out_hw):
  # kornia is in the test extra: a missing one must fail here, not skip (imported lazily: ~1 s).
  import kornia  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(2).uniform(-1, 1, (2, 3) + in_hw).astype(np.float32)
  want = kornia.geometry.transform.resize(torch.from_numpy(x), out_hw, interpolation="bicubic",
                                          align_corners=True, antialias=True).numpy()
  # kornia blurs (antialias) then resizes: two f32 passes of ~16 taps each.
  np.testing.assert_allclose(_ours(x, out_hw, "kornia_bicubic"), want, atol=2e-5)


@pytest.mark.parametrize("n_in,n_out", [(48, 32), (50, 32), (7, 3), (3, 7), (336, 224)])
def test_area_matrix_matches_torch(n_in, n_out):
  a = torch.randn(1, 1, n_in, 5)
  want = F.interpolate(a, size=(n_out, 5), mode="area")[0, 0].numpy()
  # Box means of a few f32 values: a few ulp of O(1).
  np.testing.assert_allclose(resize.area_matrix(n_in, n_out) @ a[0, 0].numpy(), want,
                             atol=1e-6)


@pytest.mark.parametrize("in_hw", [(48, 40), (24, 30), (32, 32)])
def test_area_or_bicubic(in_hw):
  """The DINO discriminator's resize: area when H > size, else bicubic; identity at size."""
  x = np.random.default_rng(3).standard_normal((2, 3) + in_hw).astype(np.float32)
  mode = "area" if in_hw[0] > 32 else "bicubic"
  want = F.interpolate(torch.from_numpy(x), size=(32, 32), mode=mode).numpy()
  got = resize.area_or_bicubic(jnp.asarray(x.transpose(0, 2, 3, 1)), 32)
  # torch area/bicubic vs ours, f32 taps of O(1) values.
  np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want, atol=1e-5)


def test_unknown_method():
  with pytest.raises(ValueError, match="unknown resize method"):
    resize.resize(jnp.zeros((1, 4, 4, 1)), (2, 2), "lanczos")
