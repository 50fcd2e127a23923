"""LPIPS: parity with a PyTorch LPIPS written from the spec, loaders and error messages."""

import re

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from vfmtok_jax.convert import lpips_weights
from vfmtok_jax.losses import lpips
from vfmtok_jax.weights import files

CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def _vgg16_features():
  """torchvision's `vgg16().features` layout: 31 modules, convs at 0, 2, 5, ..., 28."""
  mods, c = [], 3
  for v in CFG:
    if v == "M":
      mods.append(nn.MaxPool2d(2, 2))
    else:
      mods += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=True)]
      c = v
  return nn.Sequential(*mods)


class TorchLPIPS(nn.Module):
  """Taming LPIPS (spec 6.3) with explicit `features` slices."""

  def __init__(self):
    super().__init__()
    torch.manual_seed(0)
    self.features = _vgg16_features()
    with torch.no_grad():
      # He-normal convs + small biases: activations keep their scale through all 13 convs, so
      # every tap (and every conv's bias) contributes visibly to the distance. torch's default
      # init shrinks activations ~1.7x per conv and the deep taps weigh only ~1e-4 / 2e-7.
      for m in self.features:
        if isinstance(m, nn.Conv2d):
          m.weight.normal_(0.0, (2.0 / (m.in_channels * 9)) ** 0.5)
          m.bias.normal_(0.0, 0.1)
    self.lins = nn.ModuleList(nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))
                              for c in (64, 128, 256, 512, 512))
    with torch.no_grad():
      for lin in self.lins:  # LPIPS lin weights are non-negative
        lin[1].weight.abs_()
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])

  def taps(self, x):
    out = []
    for a, b in ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)):
      x = self.features[a:b](x)
      out.append(x)
    return out

  def terms(self, x, y):
    """The 5 per-tap lin terms, each (B,)."""
    fx, fy = self.taps((x - self.shift) / self.scale), self.taps((y - self.shift) / self.scale)
    out = []
    for lin, a, b in zip(self.lins, fx, fy):
      na = a / (torch.sqrt(torch.sum(a ** 2, dim=1, keepdim=True)) + 1e-10)
      nb = b / (torch.sqrt(torch.sum(b ** 2, dim=1, keepdim=True)) + 1e-10)
      out.append(lin((na - nb) ** 2).mean([2, 3])[:, 0])
    return out

  def forward(self, x, y):
    return sum(self.terms(x, y))

  def torchvision_state(self):
    sd = {f"features.{k}": v for k, v in self.features.state_dict().items()}
    sd.update({f"lin{i}.model.1.weight": lin[1].weight for i, lin in enumerate(self.lins)})
    return {k: v.detach().clone() for k, v in sd.items()}

  def taming_state(self):
    """lpips/taming naming: `net.sliceK.N.*`, `linK.model.1.weight`, scaling buffers."""
    sd = {}
    for k, v in self.features.state_dict().items():
      idx = int(k.split(".")[0])
      if idx < 30:
        s = 1 + sum(idx >= b for b in (4, 9, 16, 23))
        sd[f"net.slice{s}.{k}"] = v.clone()
    sd.update({f"lin{i}.model.1.weight": lin[1].weight.detach().clone()
               for i, lin in enumerate(self.lins)})
    sd["scaling_layer.shift"], sd["scaling_layer.scale"] = self.shift.clone(), self.scale.clone()
    return sd


@pytest.fixture(scope="module")
def torch_lpips():
  return TorchLPIPS().eval()


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 3, 64, 64)).astype(np.float32)
  y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  return x, y


def _nhwc(a):
  return jnp.asarray(a.transpose(0, 2, 3, 1))


def test_matches_torch(tmp_path, torch_lpips, images):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  x, y = images
  with torch.no_grad():
    want = torch_lpips(torch.from_numpy(x), torch.from_numpy(y)).numpy()
  one = tmp_path / "lpips.safetensors"
  save_file(torch_lpips.torchvision_state(), str(one))
  taming = tmp_path / "lpips_taming.pth"
  torch.save(torch_lpips.taming_state(), taming)
  with torch.no_grad():
    want_terms = [t.numpy() for t in torch_lpips.terms(torch.from_numpy(x), torch.from_numpy(y))]
  # With the He-normal init every tap carries a real share of the distance (lowest ~2e-2), so a
  # wrong slice / lin mapping shows in the total as well as in its own term.
  for t in want_terms:
    assert np.all(t / want > 1e-2), (t, want)
  fn = None
  is_lin = lambda mdl, method: method == "__call__" and (mdl.name or "").startswith("lin")
  for path in (one, taming):
    model, params = lpips.load_lpips(str(path))
    fn = fn or jax.jit(lambda p, a, b: model.apply({"params": p}, a, b,
                                                   capture_intermediates=is_lin))
    got, state = fn(params, _nhwc(x), _nhwc(y))
    assert got.shape == (2,) and got.dtype == jnp.float32
    # f32 rounding over up to 13 convs measures <= 4e-6 relative per term (torch f32 vs f64 too).
    np.testing.assert_allclose(got, want, rtol=1e-4, err_msg=str(path))
    for k, w in enumerate(want_terms):
      term = state["intermediates"][f"lin{k}"]["__call__"][0].mean(axis=(1, 2))
      np.testing.assert_allclose(term, w, rtol=1e-4, err_msg=f"{path} tap {k}")
  # x and y share one batched VGG pass, so identical inputs give 0 up to f32 rounding.
  np.testing.assert_allclose(fn(params, _nhwc(x), _nhwc(x))[0], 0.0, atol=1e-10)

  # Train mode: Dropout(0.5) on each lin input (seen through an interceptor: every element is
  # dropped to 0 or scaled by 2, about half dropped), the lin applied to the dropped input;
  # differs from eval, ~0 for identical inputs; the gradient w.r.t. the reconstruction flows.
  def train_loss(b, a, r):
    seen = []

    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, flax_nn.Dropout) and context.method_name == "__call__":
        seen.append((args[0], out))
      return out

    with flax_nn.intercept_methods(record):
      d = model.apply({"params": params}, a, b, deterministic=False, rngs={"dropout": r})
    return d.sum(), seen

  train = jax.jit(jax.value_and_grad(train_loss, has_aux=True))
  (d, seen), g = train(_nhwc(y), _nhwc(x), jax.random.PRNGKey(1))
  assert len(seen) == 5
  from_dropped = 0.0
  for k, (inp, out) in enumerate(seen):
    inp, out = np.asarray(inp), np.asarray(out)
    kept = out != 0
    np.testing.assert_array_equal(out, np.where(kept, 2 * inp, 0), err_msg=f"tap {k}")
    live = inp != 0  # >= 8000 nonzero elements per tap: the dropped fraction is 0.5 +- 0.006
    assert abs(1 - kept[live].mean() - 0.5) < 0.05, (k, kept[live].mean())
    kernel = np.asarray(params[f"lin{k}"]["kernel"])[0, 0, :, 0]
    from_dropped += (out @ kernel).mean(axis=(1, 2)).sum()
  np.testing.assert_allclose(d, from_dropped, rtol=1e-5)  # f32 summation order only
  assert np.isfinite(d) and not np.isclose(d, want.sum(), rtol=1e-5, atol=0)
  assert np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0
  (d, _), g = train(_nhwc(x), _nhwc(x), jax.random.PRNGKey(1))
  assert abs(float(d)) < 1e-10 and np.all(np.isfinite(g))


def test_two_files_and_merge(tmp_path, torch_lpips, images):
  sd = torch_lpips.torchvision_state()
  vgg = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
  vgg_path, lin_path = tmp_path / "vgg16_features.pth", tmp_path / "vgg.pth"
  torch.save(vgg, vgg_path)  # bare `vgg16().features.state_dict()` naming
  torch.save({k: v for k, v in sd.items() if k.startswith("lin")}, lin_path)
  _, p2 = lpips.load_lpips(str(vgg_path), lin_path=str(lin_path))
  out = lpips_weights.merge_files(str(vgg_path), str(lin_path), str(tmp_path / "m.safetensors"))
  _, p1 = lpips.load_lpips(out)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_missing_file_error(tmp_path, monkeypatch):
  monkeypatch.setenv(files.WEIGHTS_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    lpips.load_lpips()
  msg = str(e.value)
  assert str(tmp_path / lpips.WEIGHTS_FILENAME) in msg
  assert "vgg16(weights='IMAGENET1K_V1')" in msg and "vfmtok_jax.convert.lpips_weights" in msg
  assert "vgg.pth" in msg


def test_bad_keys_error(tmp_path, torch_lpips):
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  sd = torch_lpips.torchvision_state()
  del sd["lin3.model.1.weight"]
  sd["features.12.bias"] = torch.zeros(7)
  sd["extra.weight"] = torch.zeros(1)
  path = tmp_path / "bad.safetensors"
  save_file(sd, str(path))
  with pytest.raises(files.WeightLoadError) as e:
    lpips.load_lpips(str(path))
  msg = str(e.value)
  assert "lin3.model.1.weight" in msg and "extra.weight" in msg
  assert re.search(r"features\.12\.bias: source \[\(7,\)\]", msg)
