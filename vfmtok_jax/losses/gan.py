"""GAN objectives of the VFMTok tokenizer (spec 6.1-6.2), float32, and the DINO discriminator's
weight loaders (`load_dino_backbone`, `heads_from_torch_state`).

The discriminator itself is `models.dino_disc.DinoDisc` (`init_heads`, `disc_logits`); its key
maps are `weights.dino_disc`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.models import dino_disc
from vfmtok_jax.weights import dino_disc as dino_keys
from vfmtok_jax.weights import files
from vfmtok_jax.weights import trees

DINO_URL = ("https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/"
            "dino_deitsmall16_pretrain.pth")
DINO_FILENAME = "dino_deitsmall16_pretrain.pth"


# ----------------------------------------------------------------------------------------------
# Objectives.
# ----------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_fake))); logits of any shape -> scalar."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def softplus_g_loss(logits_fake: jax.Array) -> jax.Array:
  """Non-saturating generator loss mean softplus(-D(x_fake)) -> scalar."""
  return jnp.mean(jax.nn.softplus(-logits_fake.astype(jnp.float32)))


def disc_weight(step, *, disc_start: int = 20000, weight: float = 0.5) -> jax.Array:
  """w_d(t): 0 for t < disc_start, else `weight` (taming `adopt_weight`); t may be traced.

  The reference passes t = train_steps + 1 (the 1-based step being taken).
  """
  return jnp.where(jnp.asarray(step) < disc_start, 0.0, weight).astype(jnp.float32)


# ----------------------------------------------------------------------------------------------
# DINO discriminator weights.
# ----------------------------------------------------------------------------------------------

def default_dino_path() -> str:
  """`$VFMTOK_JAX_WEIGHTS/dino_deitsmall16_pretrain.pth` (else under ~/.cache/vfmtok_jax)."""
  return os.path.join(files.weights_dir(), DINO_FILENAME)


def _expected(model: dino_disc.DinoDisc, method, *args, **kwargs) -> dict:
  """Unboxed abstract variables of `model.init(..., method=method)`."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, method=method,
                                             **kwargs))
  return nn.unbox(shapes)


def abstract_dino_backbone(model: dino_disc.DinoDisc) -> Any:
  """The `params['backbone']` tree of `model` as ShapeDtypeStructs (nothing is read)."""
  x = np.zeros((1, model.img_size, model.img_size, 3), np.float32)
  return _expected(model, dino_disc.DinoDisc.features, x, mode="resize")["params"]["backbone"]


def backbone_from_state(state: Mapping[str, np.ndarray], model: dino_disc.DinoDisc, *,
                        source: str) -> Any:
  """Frozen backbone params (the `params['backbone']` tree) from an official DINO state dict.

  `norm.*` (final norm, unused by the discriminator) and `head.*` keys are ignored.

  Raises:
    WeightLoadError: missing, unexpected or mis-shaped tensors.
  """
  return trees.assemble(abstract_dino_backbone(model),
                        dino_keys.backbone_mapping(depth=model.depth), state, source=source,
                        ignore=dino_keys.unused_backbone_keys(state))


def load_dino_backbone(path: str | None = None, *, model: dino_disc.DinoDisc | None = None
                       ) -> tuple[dino_disc.DinoDisc, Any]:
  """(model, frozen backbone params) from the official DINO ViT-S/16 checkpoint.

  Args:
    path: `dino_deitsmall16_pretrain.pth` (or a .safetensors/.npz with the same keys); default
      `default_dino_path()`.
    model: the DinoDisc configuration (default: the reference's ViT-S/16 at 224).

  Raises:
    FileNotFoundError: the file is absent (the message names the download URL and location).
    WeightLoadError: missing, unexpected or mis-shaped tensors.
  """
  model = model or dino_disc.DinoDisc()
  path = path or default_dino_path()
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"DINO ViT-S/16 weights for the DinoDisc discriminator not found at {path}. Nothing is "
        f"downloaded here: on a machine with internet fetch\n  {DINO_URL}\n(the official DINO "
        f"`{DINO_FILENAME}`, a plain state dict with cls_token, pos_embed (1, 197, 384), "
        f"patch_embed.proj.*, blocks.N.*, norm.*) and put it at {path} (the default folder is "
        f"${files.WEIGHTS_ENV}, else ~/.cache/vfmtok_jax), or pass its path.")
  return model, backbone_from_state(files.read_state_dict(path), model, source=path)


def heads_from_torch_state(state: Mapping[str, np.ndarray], model: dino_disc.DinoDisc, *,
                           source: str, prefix: str = "heads.") -> tuple[Any, Any]:
  """(head params, spectral state) from a PyTorch DinoDisc state dict.

  E.g. a VFMTok checkpoint's `discriminator` entry; keys outside `prefix` are ignored. The
  spectral state is `{'heads': ...}`, as `dino_disc.init_heads` returns it.

  Raises:
    WeightLoadError: no key under `prefix`, or missing, unexpected or mis-shaped tensors.
  """
  sub = {k: v for k, v in state.items() if k.startswith(prefix)}
  if not sub:
    raise files.WeightLoadError(source, other=[f"no keys under prefix {prefix!r}"])
  n, d = model.num_tokens, model.embed_dim
  num_maps = 1 + len(model.key_depths)
  feats = [np.zeros((1, n, d), np.float32)] * num_maps
  variables = _expected(model, dino_disc.DinoDisc.head_logits, feats, train=False)
  expected = {"params": variables["params"]["heads"], "spectral": variables["spectral"]["heads"]}
  tree = trees.assemble(expected, dino_keys.heads_mapping(num_maps=num_maps, prefix=prefix), sub,
                        source=source)
  return tree["params"], {"heads": tree["spectral"]}
