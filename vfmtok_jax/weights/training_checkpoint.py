"""The reference's tokenizer training checkpoint (`vq_train.py`), read into flat numpy dicts.

The file is `{model, ema, optimizer, discriminator, optimizer_disc, steps, args}` (`ema` only
with `--ema`; `model` and `ema` without the frozen backbone's keys). `model`, `ema` and
`discriminator` are state dicts. `optimizer` / `optimizer_disc` are `torch.optim.Adam` state
dicts whose `state` is keyed by the parameter's index in the list the optimizer was built on:
`vq_model.parameters()`, frozen backbone included, and `discriminator.parameters()`. Adam keeps
state only for parameters that received a gradient, so the indices with state are the
trainable parameters in registration order, which is the order of the state dict minus its
buffers (`slot_quantize.codebook_used`; the spectral-norm `weight_u` / `weight_v`). That order
is read from the file itself, and every moment is checked against its parameter's shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np

from vfmtok_jax.weights import files
from vfmtok_jax.weights.files import WeightLoadError

# torch.compile's wrapper (vq_train.py --compile) and DDP's, in front of the model's own keys.
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
MODEL_BUFFERS = ("slot_quantize.codebook_used",)
DISC_BUFFER_SUFFIXES = (".weight_u", ".weight_v")
ENTRIES = ("model", "ema", "optimizer", "discriminator", "optimizer_disc", "steps", "args")


@dataclasses.dataclass(frozen=True)
class AdamState:
  """torch Adam state by parameter name: moments shaped like the (torch-layout) parameter."""
  step: int
  exp_avg: dict[str, np.ndarray]
  exp_avg_sq: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TrainingCheckpoint:
  """What a reference training checkpoint holds (None: the entry is absent)."""
  path: str
  model: dict[str, np.ndarray]
  ema: dict[str, np.ndarray] | None
  optimizer: AdamState | None
  discriminator: dict[str, np.ndarray] | None
  optimizer_disc: AdamState | None
  steps: int | None


def _state_dict(obj: Any, *, source: str, entry: str) -> dict[str, np.ndarray]:
  torch = files.torch_module()
  if not isinstance(obj, Mapping):
    raise WeightLoadError(source, other=[f"entry {entry!r} is a {type(obj).__name__}, "
                                         "not a state dict"])
  bad = [f"{entry}.{k}: not a tensor ({type(v).__name__})" for k, v in obj.items()
         if not isinstance(v, torch.Tensor)]
  if bad:
    raise WeightLoadError(source, other=bad)
  out = {}
  for k, v in obj.items():
    for prefix in WRAPPER_PREFIXES:
      if k.startswith(prefix):
        k = k[len(prefix):]
    out[k] = files.torch_to_numpy(v)
  return out


def adam_state(optimizer: Any, params: Mapping[str, np.ndarray], *, source: str,
               entry: str) -> AdamState:
  """Names the moments of a torch Adam state dict after `params` (trainable, in order).

  Raises:
    WeightLoadError: not an Adam state dict, a count or shape that does not fit `params`, or
      parameters at different steps.
  """
  torch = files.torch_module()
  if not isinstance(optimizer, Mapping) or not isinstance(optimizer.get("state"), Mapping):
    raise WeightLoadError(source, other=[f"entry {entry!r} is not a torch optimizer state dict "
                                         "(no 'state' mapping)"])
  groups = optimizer.get("param_groups") or []
  listed = sum(len(g.get("params", ())) for g in groups)
  state = optimizer["state"]
  names = list(params)
  if len(state) != len(names):
    raise WeightLoadError(source, other=[
        f"entry {entry!r} has Adam state for {len(state)} parameters (of {listed} it was "
        f"built on); the weights have {len(names)} trainable tensors: the optimizer does not "
        "belong to these weights"])
  exp_avg, exp_avg_sq, steps, mismatched, other = {}, {}, set(), [], []
  for name, index in zip(names, sorted(state)):
    slot = state[index]
    if not isinstance(slot, Mapping) or not {"exp_avg", "exp_avg_sq", "step"} <= set(slot):
      other.append(f"{entry} state {index} ({name}): not Adam state (needs step, exp_avg, "
                   "exp_avg_sq)")
      continue
    want = tuple(params[name].shape)
    for key, out in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
      got = slot[key]
      if not isinstance(got, torch.Tensor) or tuple(got.shape) != want:
        mismatched.append(f"{entry} state {index} {key}: {tuple(getattr(got, 'shape', ()))} "
                          f"but the parameter at that position, {name}, is {want}")
      else:
        out[name] = files.torch_to_numpy(got)
    step = slot["step"]
    steps.add(int(step.item() if isinstance(step, torch.Tensor) else step))
  if not mismatched and not other and len(steps) != 1:
    other.append(f"{entry}: parameters at different Adam steps {sorted(steps)[:5]}")
  if mismatched or other:
    raise WeightLoadError(source, mismatched=mismatched, other=other)
  return AdamState(step=steps.pop(), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)


def _trainable(state: Mapping[str, np.ndarray], *, buffers: Iterable[str] = (),
               buffer_suffixes: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  drop = set(buffers)
  return {k: v for k, v in state.items()
          if k not in drop and not (buffer_suffixes and k.endswith(buffer_suffixes))}


def read_training_checkpoint(path: str) -> TrainingCheckpoint:
  """Reads a `vq_train.py` checkpoint (`torch.load(weights_only=True)`).

  Raises:
    WeightLoadError: unreadable file, no `model` entry, or entries that do not fit each other.
  """
  obj = files.load_torch_file(path)
  if not isinstance(obj, Mapping) or "model" not in obj:
    keys = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightLoadError(path, other=[
        f"not a VFMTok training checkpoint: expected entries {ENTRIES[:5]}, found {keys}"])
  model = _state_dict(obj["model"], source=path, entry="model")
  ema = _state_dict(obj["ema"], source=path, entry="ema") if obj.get("ema") is not None else None
  if ema is not None and set(ema) != set(model):
    raise WeightLoadError(path, other=[
        f"'ema' and 'model' hold different keys (only in ema: {sorted(set(ema) - set(model))[:5]}"
        f", only in model: {sorted(set(model) - set(ema))[:5]})"])
  optimizer = None
  if obj.get("optimizer") is not None:
    optimizer = adam_state(obj["optimizer"], _trainable(model, buffers=MODEL_BUFFERS),
                           source=path, entry="optimizer")
  disc = disc_opt = None
  if obj.get("discriminator") is not None:
    disc = _state_dict(obj["discriminator"], source=path, entry="discriminator")
    if obj.get("optimizer_disc") is not None:
      disc_opt = adam_state(obj["optimizer_disc"],
                            _trainable(disc, buffer_suffixes=DISC_BUFFER_SUFFIXES),
                            source=path, entry="optimizer_disc")
  elif obj.get("optimizer_disc") is not None:
    raise WeightLoadError(path, other=["'optimizer_disc' without 'discriminator'"])
  steps = obj.get("steps")
  return TrainingCheckpoint(path=path, model=model, ema=ema, optimizer=optimizer,
                            discriminator=disc, optimizer_disc=disc_opt,
                            steps=None if steps is None else int(steps))
