"""DinoDisc: parity with a PyTorch DinoDisc written from the spec; input path; loaders; losses."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vfmtok_jax.losses import gan
from vfmtok_jax.models import disc_heads
from vfmtok_jax.models import dino_disc
from vfmtok_jax.weights import files

# Small shape: 32 px, patch 8 -> 16 tokens; 5 blocks, readout after blocks 1, 2, 3, 4 (not 0).
CFG = dict(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2,
           key_depths=(1, 2, 3, 4))
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# PyTorch reference (official key names).
# ----------------------------------------------------------------------------------------------

class _Proj(nn.Module):
  def __init__(self, d, p):
    super().__init__()
    self.proj = nn.Conv2d(3, d, p, p)


class _Attn(nn.Module):
  def __init__(self, d, h):
    super().__init__()
    self.h, self.qkv, self.proj = h, nn.Linear(d, 3 * d), nn.Linear(d, d)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
    a = (q @ k.transpose(-2, -1) / math.sqrt(d // self.h)).softmax(-1)
    return self.proj((a @ v).transpose(1, 2).reshape(b, n, d))


class _Mlp(nn.Module):
  def __init__(self, d):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Block(nn.Module):
  def __init__(self, d, h):
    super().__init__()
    self.norm1, self.attn = nn.LayerNorm(d, eps=1e-6), _Attn(d, h)
    self.norm2, self.mlp = nn.LayerNorm(d, eps=1e-6), _Mlp(d)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TorchDino(nn.Module):
  def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, key_depths):
    super().__init__()
    n = (img_size // patch_size) ** 2
    self.size, self.keys = img_size, key_depths
    self.patch_embed = _Proj(embed_dim, patch_size)
    self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(0.5 * torch.randn(1, n + 1, embed_dim))
    self.blocks = nn.Sequential(*[_Block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

  def forward(self, x):
    m, s = torch.tensor(MEAN), torch.tensor(STD)
    x = (0.5 / s).reshape(1, 3, 1, 1) * x + ((0.5 - m) / s).reshape(1, 3, 1, 1)
    mode = "area" if x.shape[-2] > self.size else "bicubic"  # the reference's non-crop path
    x = F.interpolate(x, size=(self.size, self.size), mode=mode)
    x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    acts = [(x[:, 1:] + x[:, :1]).transpose(1, 2)]
    for i, blk in enumerate(self.blocks):
      x = blk(x)
      if i in self.keys:
        acts.append((x[:, 1:] + x[:, :1]).transpose(1, 2))
    return acts


class BNLocal(nn.Module):
  def __init__(self, c, virtual_bs=8, eps=1e-6):
    super().__init__()
    self.vbs, self.eps = virtual_bs, eps
    self.weight = nn.Parameter(1 + 0.3 * torch.randn(c))
    self.bias = nn.Parameter(0.3 * torch.randn(c))

  def forward(self, x):
    shape = x.shape
    g = int(np.ceil(x.shape[0] / self.vbs))
    x = x.view(g, -1, x.shape[-2], x.shape[-1])
    mean = x.mean([1, 3], keepdim=True)
    var = x.var([1, 3], keepdim=True, unbiased=False)
    x = (x - mean) / torch.sqrt(var + self.eps)
    return (x * self.weight[None, :, None] + self.bias[None, :, None]).view(shape)


class Residual(nn.Module):
  def __init__(self, fn):
    super().__init__()
    self.fn = fn

  def forward(self, x):
    return (self.fn(x) + x) / np.sqrt(2)


def _sn_conv(cin, cout, k):
  return nn.utils.spectral_norm(nn.Conv1d(cin, cout, k, padding=k // 2, padding_mode="circular"))


def _block(c, k):
  return nn.Sequential(_sn_conv(c, c, k), BNLocal(c), nn.LeakyReLU(0.2))


class TorchDisc(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    c = cfg["embed_dim"]
    self.dino = TorchDino(**cfg)
    self.heads = nn.ModuleList(
        nn.Sequential(_block(c, 1), Residual(_block(c, 9)), _sn_conv(c, 1, 1))
        for _ in range(1 + len(cfg["key_depths"])))

  def forward(self, x):
    b = x.shape[0]
    return torch.cat([h(a).view(b, -1) for h, a in zip(self.heads, self.dino(x))], 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  torch.manual_seed(0)
  ref = TorchDisc(CFG)
  with torch.no_grad():
    for name, p in ref.dino.named_parameters():
      if "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  ref.dino.requires_grad_(False)
  state = {k: v.detach().clone() for k, v in ref.dino.state_dict().items()}
  for k in state:  # the file keeps its k bias; both sides zero it at load (reference behaviour)
    if k.endswith("attn.qkv.bias"):
      with torch.no_grad():
        c = ref.dino.state_dict()[k].numel() // 3
        dict(ref.dino.named_parameters())[k][c:2 * c].zero_()
  path = tmp_path_factory.mktemp("dino") / "dino.pth"
  torch.save(state, path)
  model, backbone = gan.load_dino_backbone(str(path), model=dino_disc.DinoDisc(**CFG))
  heads_sd = {f"heads.{k}": v.detach().clone() for k, v in ref.heads.state_dict().items()}
  heads, spectral = gan.heads_from_torch_state(
      {k: v.numpy() for k, v in heads_sd.items()}, model, source="torch heads")
  return ref, model, backbone, heads, spectral, state


def _torch_heads(ref, model):
  """(heads, spectral) from the torch heads' current state (u/v change in train mode)."""
  sd = {f"heads.{k}": v.detach().numpy().copy() for k, v in ref.heads.state_dict().items()}
  return gan.heads_from_torch_state(sd, model, source="torch heads")


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


# PyTorch oracle vs ours in f32 through a few conv/attention layers: rounding is ~1e-6 of the
# values' scale; a wrong layout or norm group moves them by > 1e-2 of it.
def _close(got, want, tol=1e-4):
  np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


def test_matches_torch_train_then_eval(setup):
  ref, model, backbone, heads, spectral, _ = setup
  x = np.random.default_rng(0).uniform(-1, 1, (10, 3, 48, 48)).astype(np.float32)  # 2 BN groups
  fn = jax.jit(dino_disc.disc_logits, static_argnums=0, static_argnames=("train", "mode"))
  ref.train()
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got, new_spec = fn(model, backbone, heads, spectral, _nhwc(x), train=True, mode="resize")
  assert got.shape == (10, 5 * 16) and got.dtype == jnp.float32
  _close(got, want)
  torch_sn = ref.heads[2][1].fn[0]
  # One power iteration on unit vectors in f32, here and in torch: a few ulp.
  np.testing.assert_allclose(new_spec["heads"]["head_2"]["res_conv"]["u"],
                             torch_sn.weight_u.numpy(), atol=1e-5)
  np.testing.assert_allclose(new_spec["heads"]["head_2"]["res_conv"]["v"],
                             torch_sn.weight_v.numpy(), atol=1e-5)
  assert not np.allclose(new_spec["heads"]["head_2"]["res_conv"]["u"],
                         spectral["heads"]["head_2"]["res_conv"]["u"])
  # Eval mode (stored vectors, no iteration) is compared in test_eval_and_gradients.


@pytest.mark.parametrize("hw", [(40, 24), (24, 24)])  # area with W upsampled; bicubic upsample
def test_matches_torch_other_sizes(setup, hw):
  ref, model, backbone, _, _, _ = setup
  ref.eval()
  heads, spectral = _torch_heads(ref, model)
  x = np.random.default_rng(1).uniform(-1, 1, (2, 3) + hw).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  got, same = dino_disc.disc_logits(model, backbone, heads, spectral, _nhwc(x), train=False,
                                    mode="random", rng=jax.random.PRNGKey(0))  # cannot crop
  _close(got, want)
  assert same is spectral  # eval mode leaves the spectral-norm state alone


def test_eval_and_gradients(setup):
  """Eval-mode logits (after the torch train step moved u/v) and gradients, in one compile."""
  ref, model, backbone, _, _, _ = setup
  ref.eval()
  heads, spectral = _torch_heads(ref, model)
  x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 48, 48)).astype(np.float32)
  xt = torch.from_numpy(x).requires_grad_(True)
  ref.zero_grad()
  want = ref(xt)
  want.square().mean().backward()

  def loss(img, hp, bb):
    logits, _ = dino_disc.disc_logits(model, bb, hp, spectral, img, train=False, mode="resize")
    return jnp.mean(jnp.square(logits)), logits

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))
  (g_x, g_heads, g_bb), got = grad(_nhwc(x), heads, backbone)
  _close(got, want.detach().numpy())
  assert np.all(np.isfinite(g_x)) and float(jnp.abs(g_x).max()) > 0
  _close(g_x, xt.grad.numpy().transpose(0, 2, 3, 1), 1e-3)
  want_k = ref.heads[1][1].fn[0].weight_orig.grad.numpy().transpose(2, 1, 0)
  _close(g_heads["head_1"]["res_conv"]["kernel"], want_k, 1e-3)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_bb))  # frozen


def test_random_mode_crops_or_resizes():
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (2, 40, 44, 3)), jnp.float32)
  resized = np.asarray(dino_disc.dino_input(x, 32, mode="resize"))
  m, s = np.asarray(MEAN), np.asarray(STD)
  norm = np.asarray(x) * (0.5 / s) + (0.5 - m) / s
  crop = dino_disc.dino_input(x, 32, mode="crop", crop_offset=(3, 7))
  np.testing.assert_allclose(crop, norm[:, 3:35, 7:39], atol=1e-6)
  kinds = set()
  fn = jax.jit(lambda r: dino_disc.dino_input(x, 32, mode="random", rng=r))
  for seed in range(12):
    out = np.asarray(fn(jax.random.PRNGKey(seed)))
    if np.allclose(out, resized, atol=1e-6):
      kinds.add("resize")
      continue
    hits = [(t, l) for t in range(9) for l in range(13)
            if np.allclose(out, norm[:, t:t + 32, l:l + 32], atol=1e-6)]
    assert len(hits) == 1, seed
    kinds.add("crop")
  assert kinds == {"resize", "crop"}
  with pytest.raises(ValueError, match="needs an rng"):
    dino_disc.dino_input(x, 32)


def test_batchnorm_local_groups():
  bn = disc_heads.BatchNormLocal()
  x = jnp.asarray(np.random.default_rng(4).standard_normal((9, 4, 3)), jnp.float32)
  with pytest.raises(ValueError, match="equal groups"):
    bn.init(jax.random.PRNGKey(0), x)
  x = x[:6]
  y = bn.apply(bn.init(jax.random.PRNGKey(0), x), x)  # one group of 6 samples
  np.testing.assert_allclose(y.mean(axis=(0, 1)), 0, atol=1e-6)


def test_batchnorm_local_per_device_slices():
  """Per-device groups = normalising each device's slice on its own (the reference per GPU)."""
  x = jnp.asarray(np.random.default_rng(5).standard_normal((8, 4, 3)) * 3 + 1, jnp.float32)
  one = disc_heads.BatchNormLocal()
  variables = one.init(jax.random.PRNGKey(0), x)
  variables = jax.tree.map(lambda v: v + jnp.arange(v.shape[0]) * 0.1, variables)
  per_device = disc_heads.BatchNormLocal(batch_groups=4).apply(variables, x)
  want = np.concatenate([one.apply(variables, x[i:i + 2]) for i in range(0, 8, 2)])
  np.testing.assert_allclose(per_device, want, atol=1e-6)
  assert not np.allclose(one.apply(variables, x), want, atol=1e-3)  # global groups differ
  with pytest.raises(ValueError, match="per-device slices"):
    disc_heads.BatchNormLocal(batch_groups=3).init(jax.random.PRNGKey(0), x)


def test_random_crop_is_drawn_per_device():
  x = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (4, 40, 44, 3)), jnp.float32)
  rng = jax.random.PRNGKey(1)
  got = np.asarray(dino_disc.dino_input_per_group(x, 32, 2, mode="random", rng=rng))
  keys = jax.random.split(rng, 2)
  want = np.concatenate([dino_disc.dino_input(x[2 * i:2 * i + 2], 32, mode="random",
                                              rng=keys[i]) for i in range(2)])
  np.testing.assert_allclose(got, want, atol=1e-5)
  # Over some keys the two slices take different branches or offsets at least once.
  differs = False
  for seed in range(8):
    twice = jnp.concatenate([x[:2], x[:2]])  # both slices hold the same images
    out = np.asarray(dino_disc.dino_input_per_group(twice, 32, 2, rng=jax.random.PRNGKey(seed)))
    differs |= not np.allclose(out[:2], out[2:], atol=1e-6)
  assert differs
  np.testing.assert_array_equal(dino_disc.dino_input_per_group(x, 32, 1, rng=rng),
                                dino_disc.dino_input(x, 32, rng=rng))


def test_init_heads_matches_loaded_structure(setup):
  _, model, _, heads, spectral, _ = setup
  h0, s0 = jax.eval_shape(lambda: dino_disc.init_heads(model, jax.random.PRNGKey(0)))
  assert jax.tree.structure(h0) == jax.tree.structure(heads)
  assert jax.tree.structure(s0) == jax.tree.structure(spectral)
  assert jax.tree.map(jnp.shape, h0) == jax.tree.map(jnp.shape, heads)
  assert jax.tree.map(jnp.shape, s0) == jax.tree.map(jnp.shape, spectral)
  assert s0["heads"]["head_4"]["res_conv"]["v"].shape == (9 * 32,)


def test_backbone_loader(setup, tmp_path, monkeypatch):
  _, model, backbone, _, _, state = setup
  b = backbone["blocks_0"]["attn"]["qkv"]["bias"]
  c = b.shape[0] // 3
  np.testing.assert_array_equal(b[c:2 * c], 0)
  np.testing.assert_array_equal(b[:c], state["blocks.0.attn.qkv.bias"].numpy()[:c])
  abstract = gan.abstract_dino_backbone(model)
  assert jax.tree.structure(abstract) == jax.tree.structure(backbone)
  assert jax.tree.map(jnp.shape, abstract) == jax.tree.map(jnp.shape, backbone)
  monkeypatch.setenv(files.WEIGHTS_ENV, str(tmp_path))
  with pytest.raises(FileNotFoundError) as e:
    gan.load_dino_backbone()
  assert gan.DINO_URL in str(e.value)
  assert str(tmp_path / gan.DINO_FILENAME) in str(e.value)
  bad = {k: v.numpy() for k, v in state.items() if k != "blocks.3.mlp.fc1.bias"}
  bad["pos_embed"] = np.zeros((1, 10, 32), np.float32)
  with pytest.raises(files.WeightLoadError) as e:
    gan.backbone_from_state(bad, model, source="bad.pth")
  assert "blocks.3.mlp.fc1.bias" in str(e.value) and "pos_embed" in str(e.value)


def test_gan_losses():
  rng = np.random.default_rng(5)
  real, fake = rng.standard_normal((4, 80)) * 2, rng.standard_normal((4, 80)) * 2
  tr, tf = torch.from_numpy(real), torch.from_numpy(fake)
  want_d = 0.5 * (torch.mean(F.relu(1. - tr)) + torch.mean(F.relu(1. + tf)))
  # Means of a few hundred f32 terms in both frameworks: relative ~1e-7.
  np.testing.assert_allclose(gan.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake)),
                             want_d.item(), rtol=1e-6)
  np.testing.assert_allclose(gan.softplus_g_loss(jnp.asarray(fake)),
                             torch.mean(F.softplus(-tf)).item(), rtol=1e-6)
  assert float(gan.disc_weight(19999)) == 0.0 and float(gan.disc_weight(20000)) == 0.5
  w = jax.jit(lambda t: gan.disc_weight(t, disc_start=3, weight=2.0))
  assert [float(w(t)) for t in (0, 2, 3, 10)] == [0.0, 0.0, 2.0, 2.0]
