"""Starting training from a reference `vq_train.py` checkpoint (`init_from`)."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
import torch

from tests import tiny_training
from vfmtok_jax.tasks import tokenizer as tokenizer_task
from vfmtok_jax.weights import dino_disc as dino_keys
from vfmtok_jax.weights import files
from vfmtok_jax.weights import tokenizer as tokenizer_keys
from vfmtok_jax.weights import trees

# vq_model.py registers the pixel decoder first, then the encoder (whose frozen backbone sits
# after carrier_tokens / slots_pos), the decoder ViT, the quantizer and its two projections.
_MODULE_ORDER = ("decoder.", "encode_transformer.", "decode_transformer.", "slot_quantize.",
                 "pre_slots_quant.", "post_slots_quant.")
_FROZEN_AFTER = "encode_transformer.slots_pos"  # backbone params: in the list, no Adam state
_FROZEN = 5


def _to_torch_layout(key, x):
  x = np.asarray(x, np.float32)
  if key.endswith("weight_orig"):
    return x.transpose(2, 1, 0)  # Flax conv1d (k, in, out) -> torch (out, in, k)
  if key.endswith(".weight") and x.ndim == 2 and not key.startswith("slot_quantize"):
    return x.T
  if key.endswith(".weight") and x.ndim == 4:
    return x.transpose(3, 2, 0, 1)
  return x


def _official(tree, mapping):
  flat = trees.flatten(tree)
  return {mapping[p][0]: _to_torch_layout(mapping[p][0], v) for p, v in flat.items()}


def _rand_like(tree, rng, positive=False):
  return jax.tree.map(lambda a: (np.abs if positive else np.asarray)(
      rng.normal(size=a.shape)).astype(np.float32), tree)


def _adam(names_in_order, moments_m, moments_v, step, frozen_after=None):
  state, index = {}, 0
  for name in names_in_order:
    state[index] = {"step": torch.tensor(float(step)), "exp_avg": torch.tensor(moments_m[name]),
                    "exp_avg_sq": torch.tensor(moments_v[name])}
    index += 1 + (_FROZEN if name == frozen_after else 0)
  return {"state": state, "param_groups": [{"lr": 1e-4, "params": list(range(index))}]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("ref")
  cfg = tiny_training.tiny_config(tmp, **{"disc.enabled": True, "codebook.kmeans_init": False,
                                          "codebook.restart_window": 0})
  task = tokenizer_task.from_config(cfg)
  state = nn.unbox(jax.eval_shape(task.init_state, jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  want = {"params": _rand_like(state.params, rng), "ema": _rand_like(state.params, rng),
          "mu": _rand_like(state.params, rng), "nu": _rand_like(state.params, rng, True),
          "heads": _rand_like(state.extra["disc_params"], rng),
          "spectral": _rand_like(state.extra["disc_spectral"], rng),
          "dmu": _rand_like(state.extra["disc_params"], rng),
          "dnu": _rand_like(state.extra["disc_params"], rng, True)}
  tok_map = tokenizer_keys.mapping_for(state.params)
  model = _official(want["params"], tok_map)
  rank = lambda k: next(i for i, p in enumerate(_MODULE_ORDER) if k.startswith(p))
  order = sorted(model, key=rank)  # stable: the reference's module order, then ours
  model = {k: model[k] for k in order}
  # The unused FIFO buffer sits in the state dict, not in the optimizer.
  model = dict(list(model.items())[:order.index("slot_quantize.embedding.weight")]
               + [("slot_quantize.codebook_used", np.zeros(64, np.float32))]
               + list(model.items())[order.index("slot_quantize.embedding.weight"):])
  m, v = _official(want["mu"], tok_map), _official(want["nu"], tok_map)
  heads_map = dino_keys.heads_mapping(num_maps=1 + len(task.disc.key_depths))
  disc = _official({"params": want["heads"], "spectral": want["spectral"]["heads"]}, heads_map)
  dm = _official({"params": want["dmu"]}, {p: k for p, k in heads_map.items()
                                           if p.startswith("params/")})
  dv = _official({"params": want["dnu"]}, {p: k for p, k in heads_map.items()
                                           if p.startswith("params/")})
  disc_trainable = [k for k in disc if not k.endswith(("weight_u", "weight_v"))]
  ckpt = {
      "model": {k: torch.tensor(x) for k, x in model.items()},
      "ema": {k: torch.tensor(x) for k, x in {**_official(want["ema"], tok_map),
                                               "slot_quantize.codebook_used":
                                                   np.zeros(64, np.float32)}.items()},
      "optimizer": _adam(order, m, v, 7, frozen_after=_FROZEN_AFTER),
      "discriminator": {k: torch.tensor(x) for k, x in disc.items()},
      "optimizer_disc": _adam(disc_trainable, dm, dv, 7),
      "steps": 6,
  }
  path = str(tmp / "vq_ckpt.pt")
  torch.save(ckpt, path)
  return cfg, path, ckpt, want


def _init(cfg, path):
  cfg = cfg.copy_and_resolve_references()
  cfg.init_from = path
  task, program = tokenizer_task.build(cfg, jax.devices()[:1])
  return task.init_from_data(program, program.init(jax.random.PRNGKey(1)), None)


def test_every_state_is_carried_over(setup, capsys):
  cfg, path, _, want = setup
  state = jax.device_get(_init(cfg, path))
  assert "optimizer (Adam at step 7)" in capsys.readouterr().out
  eq = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  eq(state.params, want["params"])
  eq(state.ema_params, want["ema"])
  adam = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda n: isinstance(
      n, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(adam) == 1 and int(adam[0].count) == 7
  eq(adam[0].mu, want["mu"])
  eq(adam[0].nu, want["nu"])
  eq(state.extra["disc_params"], want["heads"])
  eq(state.extra["disc_spectral"], want["spectral"])
  dadam = [s for s in jax.tree.leaves(state.extra["disc_opt_state"], is_leaf=lambda n: isinstance(
      n, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)][0]
  eq(dadam.mu, want["dmu"])
  eq(dadam.nu, want["dnu"])
  assert int(state.step) == 0  # --finetune: the step count and the lr warm-up start again
  sched = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda n: isinstance(
      n, optax.ScaleByScheduleState)) if isinstance(s, optax.ScaleByScheduleState)]
  assert int(sched[0].count) == 0


def _rewrite(tmp_path, ckpt, **changes):
  path = str(tmp_path / "changed.pt")
  torch.save({**ckpt, **changes}, path)
  return path


def test_wrong_files_are_named(setup, tmp_path):
  cfg, _, ckpt, _ = setup
  opt = ckpt["optimizer"]
  # Moments paired with the wrong parameters (the order broken): shapes disagree.
  state = opt["state"]
  keys = sorted(state)
  swapped = {**state, keys[0]: state[keys[-1]], keys[-1]: state[keys[0]]}
  with pytest.raises(files.WeightLoadError, match="but the parameter at that position"):
    _init(cfg, _rewrite(tmp_path, ckpt, optimizer={**opt, "state": swapped}))
  short = {k: state[k] for k in keys[1:]}
  with pytest.raises(files.WeightLoadError, match="does not belong to these weights"):
    _init(cfg, _rewrite(tmp_path, ckpt, optimizer={**opt, "state": short}))
  model = dict(ckpt["model"])
  model.pop("decoder.conv_in.weight")
  with pytest.raises(files.WeightLoadError, match="decoder.conv_in.weight"):
    _init(cfg, _rewrite(tmp_path, ckpt, model=model, optimizer=None, ema=None))
  with pytest.raises(files.WeightLoadError, match="not a VFMTok training checkpoint"):
    _init(cfg, _rewrite(tmp_path, {"state_dict": {}}))
  bad = cfg.copy_and_resolve_references()
  bad.codebook.kmeans_init = True
  bad.init_from = "x.pt"
  with pytest.raises(ValueError, match="init_from='x.pt' and codebook.kmeans_init"):
    tokenizer_task.from_config(bad)


def test_training_starts_from_it(setup, tmp_path, capsys):
  """Without the discriminator (no DINO weights offline): its entries are reported unused."""
  cfg, path, _, want = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.disc.enabled = False
  cfg.init_from = path
  cfg.total_steps = 1
  tokenizer_task.train(cfg, str(tmp_path / "run"))
  out = capsys.readouterr().out
  assert "discriminator not used (disc.enabled is False)" in out
  assert "step 1/1" in out
