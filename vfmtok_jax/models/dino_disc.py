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

Params are two trees, `params['backbone']` (frozen, from `losses.gan.load_dino_backbone`) and
`params['heads']` (trainable, from `init_heads`; the head modules are `models.disc_heads`). The
spectral-norm power-iteration vectors live in the mutable collection 'spectral' (`u` (out,),
`v` (in * k,), PyTorch's `weight_u` / `weight_v`): with `train=True` each forward does one power
iteration (as PyTorch's `spectral_norm` in train mode) and must be applied with
`mutable=['spectral']`; with `train=False` the stored vectors are used as they are. The reference
calls the discriminator separately for real and fake images (fake first in the D step, and once
more in the G step), each call iterating once; `disc_logits` does one call and returns the
updated state.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.models import disc_heads
from vfmtok_jax.models import layers
from vfmtok_jax.models.vfm import vit_blocks
from vfmtok_jax.models.vfm.preprocess import IMAGENET_MEAN, IMAGENET_STD
from vfmtok_jax.ops import resize as resize_ops

Dtype = Any

RESIZE_MODES = ("random", "resize", "crop")


# ----------------------------------------------------------------------------------------------
# Input: normalisation and the crop / resize to img_size.
# ----------------------------------------------------------------------------------------------

def dino_input(x: jax.Array, size: int = 224, *, mode: str = "random",
               rng: jax.Array | None = None,
               crop_offset: tuple[int, int] | None = None) -> jax.Array:
  """(B, H, W, 3) in [-1, 1] -> (B, size, size, 3) ImageNet-normalised float32.

  Args:
    mode: "random" (reference: with probability 0.5 a crop at a uniform offset, the same for the
      whole batch, else `ops.resize.area_or_bicubic`; needs `rng`), "resize" (always
      `area_or_bicubic`), "crop" (crop at `crop_offset` = (top, left), or at a random offset
      drawn from `rng`).
      A crop is only possible when H > size and W > size; otherwise every mode resizes.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"unknown DinoDisc resize mode {mode!r}; expected one of {RESIZE_MODES}")
  mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
  x = (x.astype(jnp.float32) * jnp.asarray(0.5 / std, jnp.float32)
       + jnp.asarray((0.5 - mean) / std, jnp.float32))
  h, w = x.shape[1:3]
  if mode == "resize" or not (h > size and w > size):
    return resize_ops.area_or_bicubic(x, size)
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
  return jax.lax.cond(jax.random.uniform(k_coin) < 0.5, crop,
                      lambda v: resize_ops.area_or_bicubic(v, size), x)


def dino_input_per_group(x: jax.Array, size: int, groups: int, *, mode: str = "random",
                         rng: jax.Array | None = None,
                         crop_offset: tuple[int, int] | None = None) -> jax.Array:
  """`dino_input` drawn separately for each of `groups` contiguous batch slices (key i of
  `split(rng, groups)` for slice i), as the reference draws its crop on every GPU."""
  b = x.shape[0]
  if groups == 1 or rng is None or (mode == "crop" and crop_offset is not None):
    return dino_input(x, size, mode=mode, rng=rng, crop_offset=crop_offset)
  if b % groups:
    raise ValueError(f"batch {b} does not split into {groups} per-device slices")
  slices = x.reshape(groups, b // groups, *x.shape[1:])
  out = jax.vmap(lambda v, k: dino_input(v, size, mode=mode, rng=k))(
      slices, jax.random.split(rng, groups))
  return out.reshape(b, *out.shape[2:])


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
  batch_groups: int = 1        # per-device slices: own norm groups and own random crop each
  dtype: Dtype = jnp.float32   # backbone matmul dtype; heads and losses are float32

  @property
  def num_tokens(self) -> int:
    return (self.img_size // self.patch_size) ** 2

  def setup(self):
    self.backbone = DinoViT(self.img_size, self.patch_size, self.embed_dim, self.depth,
                            self.num_heads, self.mlp_ratio, tuple(self.key_depths), self.ln_eps,
                            self.dtype)
    self.heads = disc_heads.DiscHeads(1 + len(self.key_depths), self.kernel_size,
                                      self.virtual_bs, self.norm_eps, self.batch_groups)

  def features(self, x: jax.Array, *, rng: jax.Array | None = None, mode: str = "random",
               crop_offset: tuple[int, int] | None = None) -> tuple[jax.Array, ...]:
    """(B, H, W, 3) in [-1, 1] -> 5 readout maps (B, N, D) (see `dino_input` for the modes)."""
    return self.backbone(dino_input_per_group(x, self.img_size, self.batch_groups, mode=mode,
                                              rng=rng, crop_offset=crop_offset))

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
  feats = [jnp.zeros((model.batch_groups, n, d), jnp.float32)] * (1 + len(model.key_depths))
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
