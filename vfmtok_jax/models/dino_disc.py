"""DinoDisc: frozen DINO ViT-S/16 features + 5 trainable spectral-norm conv1d heads (spec 6.4).

Reference: VFMTok `vfmtok/tokenizer/discriminator_dino.py` (VAR / StyleGAN-T style).

  x in [-1, 1] (B, H, W, 3) -> x * (0.5 / s) + (0.5 - m) / s (ImageNet m, s)
    -> to img_size (224): if H > 224 and W > 224, with probability 0.5 a random crop (one location
       for the batch), otherwise `F.interpolate(size=224, mode='area' if H > 224 else 'bicubic')`
    -> patch embed + cls + pos-embed -> readout (patch tokens + cls token) before block 0 and
       after blocks 2, 5, 8, 11 -> 5 maps (B, N=196, 384)
    -> per map a head: [SNConv1d(k=1) -> BatchNormLocal -> LeakyReLU(0.2)]
       -> Residual((f(h) + h) / sqrt 2), f = [SNConv1d(k=9, circular pad 4) -> BNLocal -> LReLU]
       -> SNConv1d(C -> 1, k=1)
    -> logits (B, 5 * N), maps in the order [pos-embed, block 2, 5, 8, 11].

Params are two trees, `params['backbone']` (frozen, from `load_dino_backbone`) and
`params['heads']` (trainable, from `init_heads`). The spectral-norm power-iteration vectors live in
the mutable collection 'spectral' (`u` (out,), `v` (in * k,), PyTorch's `weight_u` / `weight_v`):
with `train=True` each forward does one power iteration (as PyTorch's `spectral_norm` in train
mode) and must be applied with `mutable=['spectral']`; with `train=False` the stored vectors are
used as they are. The reference calls the discriminator separately for real and fake images (fake
first in the D step, and once more in the G step), each call iterating once; `disc_logits` does one
call and returns the updated state.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.convert import common
from vfmtok_jax.models import layers
from vfmtok_jax.models.vfm import vit_blocks
from vfmtok_jax.models.vfm.preprocess import IMAGENET_MEAN, IMAGENET_STD
from vfmtok_jax.ops import resize as resize_ops

Dtype = Any

DINO_URL = ("https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
            "dino_deitsmall16_pretrain.pth")
DINO_FILENAME = "dino_deitsmall16_pretrain.pth"
WEIGHTS_ENV = common.WEIGHTS_ENV
RESIZE_MODES = ("random", "resize", "crop")


# ----------------------------------------------------------------------------------------------
# Input: normalisation and the crop / resize to img_size.
# ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of `F.interpolate(mode='area')` = `adaptive_avg_pool` along one axis.

  Output i averages inputs [floor(i * in / out), ceil((i + 1) * in / out)).
  """
  mat = np.zeros((out_size, in_size))
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -(-((i + 1) * in_size) // out_size)
    mat[i, start:end] = 1.0 / (end - start)
  return mat


def resize_to(x: jax.Array, size: int) -> jax.Array:
  """The reference's non-crop path: area when H > size, else bicubic (a=-0.75, no antialias)."""
  h, w = x.shape[1:3]
  if (h, w) == (size, size):
    return x
  if h > size:
    rows, cols = area_matrix(h, size), area_matrix(w, size)
  else:
    rows, cols = resize_ops.bicubic_matrix(h, size), resize_ops.bicubic_matrix(w, size)
  return resize_ops.apply_hw(x, rows, cols)


def dino_input(x: jax.Array, size: int = 224, *, mode: str = "random",
               rng: jax.Array | None = None,
               crop_offset: tuple[int, int] | None = None) -> jax.Array:
  """(B, H, W, 3) in [-1, 1] -> (B, size, size, 3) ImageNet-normalised float32.

  Args:
    mode: "random" (reference: with probability 0.5 a crop at a uniform offset, the same for the
      whole batch, else `resize_to`; needs `rng`), "resize" (always `resize_to`), "crop" (crop at
      `crop_offset` = (top, left), or at a random offset drawn from `rng`).
      A crop is only possible when H > size and W > size; otherwise every mode resizes.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown DinoDisc resize mode {mode!r}; expected one of {RESIZE_MODES}")
  mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
  x = (x.astype(jnp.float32) * jnp.asarray(0.5 / std, jnp.float32)
       + jnp.asarray((0.5 - mean) / std, jnp.float32))
  h, w = x.shape[1:3]
  if mode == "resize" or not (h > size and w > size):
    return resize_to(x, size)
  if mode == "crop" and crop_offset is not None:
    top, left = crop_offset
    if not (0 <= top <= h - size and 0 <= left <= w - size):
      raise ValueError(f"crop offset {crop_offset} out of range for {h}x{w} -> {size}")
    return x[:, top:top + size, left:left + size]
  if rng is None:
    raise ValueError(f"DinoDisc resize mode {mode!r} needs an rng (or use mode='resize')")
  k_coin, k_top, k_left = jax.random.split(rng, 3)
  top = jax.random.randint(k_top, (), 0, h - size + 1)
  left = jax.random.randint(k_left, (), 0, w - size + 1)

  def crop(v):
    return jax.lax.dynamic_slice(v, (0, top, left, 0), (v.shape[0], size, size, v.shape[3]))

  if mode == "crop":
    return crop(x)
  return jax.lax.cond(jax.random.uniform(k_coin) < 0.5, crop, lambda v: resize_to(v, size), x)


# ----------------------------------------------------------------------------------------------
# Frozen DINO ViT.
# ----------------------------------------------------------------------------------------------

class DinoViT(nn.Module):
  """DINO ViT (timm layout, no final norm used). (B, S, S, 3) normalised -> readout maps."""
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  key_depths: tuple[int, ...] = (2, 5, 8, 11)
  ln_eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    """Returns 1 + len(key_depths) maps (B, N, D): patch tokens + cls token, taken after the
    position embedding and after each block in `key_depths`."""
    if x.shape[1:3] != (self.img_size, self.img_size):
      raise ValueError(f"DinoViT expects {self.img_size}x{self.img_size} input, got {x.shape}")
    d, g = self.embed_dim, self.img_size // self.patch_size
    x = vit_blocks.PatchEmbed(d, self.patch_size, dtype=self.dtype, name="patch_embed")(x)
    b = x.shape[0]
    x = x.reshape(b, g * g, d)
    cls = self.param("cls_token", layers.logical(nn.initializers.normal(0.02),
                                                 (None, None, "embed")), (1, 1, d), jnp.float32)
    pos = self.param("pos_embed", layers.logical(nn.initializers.normal(0.02),
                                                 (None, None, "embed")),
                     (1, 1 + g * g, d), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, d)).astype(x.dtype), x], axis=1)
    x = (x + pos.astype(x.dtype)).astype(jnp.float32)

    def readout(t):
      return t[:, 1:].astype(jnp.float32) + t[:, :1].astype(jnp.float32)

    feats = [readout(x)]
    for i in range(self.depth):
      x = vit_blocks.PreNormBlock(self.num_heads, round(d * self.mlp_ratio), ffn="mlp",
                                  act="gelu_pytorch_tanh", layerscale=False, ln_eps=self.ln_eps,
                                  dtype=self.dtype, name=f"blocks_{i}")(x)
      if i in self.key_depths:
        feats.append(readout(x))
    return tuple(feats)


# ----------------------------------------------------------------------------------------------
# Trainable heads.
# ----------------------------------------------------------------------------------------------

def _l2_normalize(v: jax.Array, eps: float) -> jax.Array:
  """`F.normalize(v, dim=0, eps)`: v / max(||v||, eps)."""
  return v / jnp.maximum(jnp.linalg.norm(v), eps)


class SNConv1d(nn.Module):
  """Conv1d (with bias) whose weight is divided by its spectral norm (PyTorch `spectral_norm`).

  kernel (k, in, out); the norm is taken of the PyTorch matrix W = weight(out, in, k).reshape(out,
  -1). `update=True` runs one power iteration first: v = normalize(W^T u), u = normalize(W v)
  (no gradient), then sigma = u . W v with gradient through W only.
  """
  features: int
  kernel_size: int = 1
  circular_pad: int = 0
  eps: float = 1e-12

  @nn.compact
  def __call__(self, x: jax.Array, *, update: bool) -> jax.Array:
    """x: (B, L, C_in) -> (B, L + 2 * pad - k + 1, features)."""
    k, cin, cout = self.kernel_size, x.shape[-1], self.features
    kernel = self.param("kernel", layers.logical(layers.torch_default_kernel_init,
                                                 (None, "conv_in", "conv_out")),
                        (k, cin, cout), jnp.float32)
    bias = self.param("bias", layers.logical(layers.torch_default_bias_init(cin * k),
                                             ("conv_out",)), (cout,), jnp.float32)
    mat = kernel.transpose(2, 1, 0).reshape(cout, cin * k)

    def init_vec(n):
      return _l2_normalize(jax.random.normal(self.make_rng("params"), (n,), jnp.float32), self.eps)

    u = self.variable("spectral", "u", init_vec, cout)
    v = self.variable("spectral", "v", init_vec, cin * k)
    if update and not self.is_initializing():
      w = jax.lax.stop_gradient(mat)
      v_new = _l2_normalize(jnp.dot(w.T, u.value, precision="highest"), self.eps)
      u.value = _l2_normalize(jnp.dot(w, v_new, precision="highest"), self.eps)
      v.value = v_new
    uu, vv = jax.lax.stop_gradient(u.value), jax.lax.stop_gradient(v.value)
    sigma = jnp.dot(uu, jnp.dot(mat, vv, precision="highest"), precision="highest")
    p = self.circular_pad
    if p:
      x = jnp.concatenate([x[:, -p:], x, x[:, :p]], axis=1)
    y = jax.lax.conv_general_dilated(x.astype(jnp.float32), kernel / sigma, (1,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias


class BatchNormLocal(nn.Module):
  """Ghost batch norm: ceil(B / virtual_bs) groups of B / G samples, stats over (group, tokens).

  No running statistics (train = eval). Like the reference `view`, B must divide into G groups.
  """
  virtual_bs: int = 8
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, L, C) -> (B, L, C) float32."""
    b, l, c = x.shape
    g = -(-b // self.virtual_bs)
    if b % g:
      raise ValueError(f"BatchNormLocal: batch {b} does not split into {g} equal groups "
                       f"(virtual_bs={self.virtual_bs})")
    xg = x.astype(jnp.float32).reshape(g, b // g, l, c)
    mean = xg.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 2), keepdims=True)
    y = ((xg - mean) / jnp.sqrt(var + self.epsilon)).reshape(b, l, c)
    scale = self.param("scale", layers.logical(nn.initializers.ones, ("conv_out",)), (c,),
                       jnp.float32)
    bias = self.param("bias", layers.logical(nn.initializers.zeros, ("conv_out",)), (c,),
                      jnp.float32)
    return y * scale + bias


class DiscHead(nn.Module):
  """One head: (B, N, C) -> (B, N) logits."""
  kernel_size: int = 9
  virtual_bs: int = 8
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array, *, update: bool) -> jax.Array:
    c = x.shape[-1]

    def block(h, k, name):
      h = SNConv1d(c, k, k // 2, name=f"{name}_conv")(h, update=update)
      h = BatchNormLocal(self.virtual_bs, self.norm_eps, name=f"{name}_norm")(h)
      return nn.leaky_relu(h, 0.2)

    h = block(x, 1, "block")
    h = (block(h, self.kernel_size, "res") + h) * (1.0 / np.sqrt(2))
    return SNConv1d(1, 1, name="cls")(h, update=update)[..., 0]


class DiscHeads(nn.Module):
  """One `DiscHead` per feature map (`head_i`); concatenated logits (B, sum N_i)."""
  num_maps: int = 5
  kernel_size: int = 9
  virtual_bs: int = 8
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
    if len(feats) != self.num_maps:
      raise ValueError(f"expected {self.num_maps} feature maps, got {len(feats)}")
    return jnp.concatenate([
        DiscHead(self.kernel_size, self.virtual_bs, self.norm_eps, name=f"head_{i}")(
            f, update=train) for i, f in enumerate(feats)], axis=1)


# ----------------------------------------------------------------------------------------------
# The discriminator.
# ----------------------------------------------------------------------------------------------

class DinoDisc(nn.Module):
  """DinoDisc: `params = {'backbone': frozen DINO, 'heads': trainable}`, state 'spectral'."""
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  key_depths: tuple[int, ...] = (2, 5, 8, 11)
  ln_eps: float = 1e-6
  kernel_size: int = 9
  virtual_bs: int = 8
  norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32   # backbone matmul dtype; heads and losses are float32

  @property
  def num_tokens(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  def setup(self):
    self.backbone = DinoViT(self.img_size, self.patch_size, self.embed_dim, self.depth,
                            self.num_heads, self.mlp_ratio, tuple(self.key_depths), self.ln_eps,
                            self.dtype)
    self.heads = DiscHeads(1 + len(self.key_depths), self.kernel_size, self.virtual_bs,
                           self.norm_eps)

  def features(self, x: jax.Array, *, rng: jax.Array | None = None, mode: str = "random",
               crop_offset: tuple[int, int] | None = None) -> tuple[jax.Array, ...]:
    """(B, H, W, 3) in [-1, 1] -> 5 readout maps (B, N, D) (see `dino_input` for the modes)."""
    return self.backbone(dino_input(x, self.img_size, mode=mode, rng=rng,
                                    crop_offset=crop_offset))

  def head_logits(self, feats: Sequence[jax.Array], *, train: bool) -> jax.Array:
    return self.heads(feats, train=train)

  def __call__(self, x: jax.Array, *, train: bool, rng: jax.Array | None = None,
               mode: str = "random", crop_offset: tuple[int, int] | None = None) -> jax.Array:
    """x (B, H, W, 3) in [-1, 1] -> logits (B, 5 * N) float32.

    `train=True` runs the spectral-norm power iteration (apply with mutable=['spectral']).
    """
    return self.heads(self.features(x, rng=rng, mode=mode, crop_offset=crop_offset), train=train)


def init_heads(model: DinoDisc, rng: jax.Array) -> tuple[Any, Any]:
  """(head params, spectral state) for `model` (PyTorch-default conv init, random u/v)."""
  n, d = model.num_tokens, model.embed_dim
  feats = [jnp.zeros((1, n, d), jnp.float32)] * (1 + len(model.key_depths))
  variables = nn.unbox(model.init(rng, feats, train=False, method=DinoDisc.head_logits))
  return variables["params"]["heads"], variables["spectral"]


def disc_logits(model: DinoDisc, backbone: Any, heads: Any, spectral: Any, x: jax.Array, *,
                train: bool, rng: jax.Array | None = None, mode: str = "random",
                crop_offset: tuple[int, int] | None = None) -> tuple[jax.Array, Any]:
  """One discriminator call: (logits (B, 5N), new spectral state).

  The backbone params are wrapped in `stop_gradient`, so differentiating w.r.t. `heads` (and the
  images) never builds backbone-parameter gradients; gradients still flow through it to `x`.
  """
  variables = {"params": {"backbone": jax.lax.stop_gradient(backbone), "heads": heads},
               "spectral": spectral}
  kwargs = dict(train=train, rng=rng, mode=mode, crop_offset=crop_offset)
  if not train:
    return model.apply(variables, x, **kwargs), spectral
  logits, state = model.apply(variables, x, mutable=["spectral"], **kwargs)
  return logits, state["spectral"]


# ----------------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------------

weights_dir = common.weights_dir


def default_dino_path() -> str:
  return os.path.join(weights_dir(), DINO_FILENAME)


def _zero_k_bias(b: np.ndarray) -> np.ndarray:
  """qkv bias (3C,) with the k third zeroed (softmax-invariant; the reference does this)."""
  b = np.array(b, np.float32, copy=True)
  c = b.shape[0] // 3
  b[c:2 * c] = 0.0
  return b


def backbone_mapping(model: DinoDisc) -> dict:
  """Flax path (under `backbone`) -> (official DINO key, transform)."""
  m = {
      "patch_embed/kernel": ("patch_embed.proj.weight", common.conv),
      "patch_embed/bias": ("patch_embed.proj.bias", common.identity),
      "cls_token": ("cls_token", common.identity),
      "pos_embed": ("pos_embed", common.identity),
  }
  for i in range(model.depth):
    src, dst = f"blocks.{i}", f"blocks_{i}"
    m.update(common.nest(f"{dst}/norm1", common.ln_entries(f"{src}.norm1")))
    m.update(common.nest(f"{dst}/norm2", common.ln_entries(f"{src}.norm2")))
    m[f"{dst}/attn/qkv/kernel"] = (f"{src}.attn.qkv.weight", common.linear)
    m[f"{dst}/attn/qkv/bias"] = (f"{src}.attn.qkv.bias", _zero_k_bias)
    m.update(common.nest(f"{dst}/attn/proj", common.dense_entries(f"{src}.attn.proj")))
    m.update(common.nest(f"{dst}/mlp/fc1", common.dense_entries(f"{src}.mlp.fc1")))
    m.update(common.nest(f"{dst}/mlp/fc2", common.dense_entries(f"{src}.mlp.fc2")))
  return m


def _expected(model: DinoDisc, method, *args, **kwargs):
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, method=method,
                                             **kwargs))
  return nn.unbox(shapes)


def backbone_from_state(state: Mapping[str, np.ndarray], model: DinoDisc, *,
                        source: str) -> Any:
  """Frozen backbone params (the `params['backbone']` tree) from an official DINO state dict.

  `norm.*` (final norm, unused by the discriminator) and `head.*` keys are ignored.
  """
  x = np.zeros((1, model.img_size, model.img_size, 3), np.float32)
  expected = _expected(model, DinoDisc.features, x, mode="resize")["params"]["backbone"]
  ignore = [k for k in state if re.match(r"(norm|head)\.", k)]
  return common.assemble(expected, backbone_mapping(model), state, source=source, ignore=ignore)


def load_dino_backbone(path: str | None = None, *, model: DinoDisc | None = None
                       ) -> tuple[DinoDisc, Any]:
  """(model, frozen backbone params) from the official DINO ViT-S/16 checkpoint.

  Args:
    path: `dino_deitsmall16_pretrain.pth` (or a .safetensors/.npz with the same keys); default
      `$VFMTOK_JAX_WEIGHTS/dino_deitsmall16_pretrain.pth` (else under ~/.cache/vfmtok_jax).
    model: the DinoDisc configuration (default: the reference's ViT-S/16 at 224).

  Raises:
    FileNotFoundError: the file is absent (the message names the download URL and location).
    WeightLoadError: missing, unexpected or mis-shaped tensors.
  """
  model = model or DinoDisc()
  path = path or default_dino_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"DINO ViT-S/16 weights for the DinoDisc discriminator not found at {path}. Nothing is "
        f"downloaded here: on a machine with internet fetch\n  {DINO_URL}\n(the official DINO "
        f"`{DINO_FILENAME}`, a plain state dict with cls_token, pos_embed (1, 197, 384), "
        f"patch_embed.proj.*, blocks.N.*, norm.*) and put it at {path} (the default folder is "
        f"${WEIGHTS_ENV}, else ~/.cache/vfmtok_jax), or pass its path.")
  return model, backbone_from_state(common.read_state_dict(path), model, source=path)


def heads_mapping(model: DinoDisc, prefix: str = "heads.") -> dict:
  """Path in {'params': heads, 'spectral': heads state} -> PyTorch DinoDisc key.

  PyTorch head i: `heads.i.0.0` SNConv1d(k=1), `heads.i.0.1` BNLocal, `heads.i.1.fn.0` SNConv1d(k),
  `heads.i.1.fn.1` BNLocal, `heads.i.2` SNConv1d(C -> 1); spectral-norm tensors `weight_orig`,
  `weight_u`, `weight_v`, plus `bias`.
  """
  def torch_conv(w):  # (out, in, k) -> (k, in, out)
    return np.ascontiguousarray(np.asarray(w).transpose(2, 1, 0))

  m = {}
  for i in range(1 + len(model.key_depths)):
    for name, src in (("block", f"{prefix}{i}.0"), ("res", f"{prefix}{i}.1.fn"), ("cls", None)):
      conv = f"{src}.0" if src else f"{prefix}{i}.2"
      conv_name = f"head_{i}/{name}_conv" if src else f"head_{i}/cls"
      m[f"params/{conv_name}/kernel"] = (f"{conv}.weight_orig", torch_conv)
      m[f"params/{conv_name}/bias"] = (f"{conv}.bias", common.identity)
      m[f"spectral/{conv_name}/u"] = (f"{conv}.weight_u", common.identity)
      m[f"spectral/{conv_name}/v"] = (f"{conv}.weight_v", common.identity)
      if src:
        m[f"params/head_{i}/{name}_norm/scale"] = (f"{src}.1.weight", common.identity)
        m[f"params/head_{i}/{name}_norm/bias"] = (f"{src}.1.bias", common.identity)
  return m


def heads_from_torch_state(state: Mapping[str, np.ndarray], model: DinoDisc, *, source: str,
                           prefix: str = "heads.") -> tuple[Any, Any]:
  """(head params, spectral state) from a PyTorch DinoDisc state dict (e.g. a VFMTok
  checkpoint's `discriminator` entry); keys outside `prefix` are ignored."""
  sub = {k: v for k, v in state.items() if k.startswith(prefix)}
  if not sub:
    raise common.WeightLoadError(source, other=[f"no keys under prefix {prefix!r}"])
  n, d = model.num_tokens, model.embed_dim
  feats = [np.zeros((1, n, d), np.float32)] * (1 + len(model.key_depths))
  variables = _expected(model, DinoDisc.head_logits, feats, train=False)
  expected = {"params": variables["params"]["heads"], "spectral": variables["spectral"]["heads"]}
  tree = common.assemble(expected, heads_mapping(model, prefix), sub, source=source)
  return tree["params"], {"heads": tree["spectral"]}
