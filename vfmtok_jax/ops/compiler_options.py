"""XLA compile options per program kind and platform.

`dense_forward_options()`: for a frozen ViT's forward (the VFM's: matmuls of (B * tokens, width)
rows and batched attention products, nothing else of weight). On XLA:CPU, fusing dots into
YNNPACK is the default; with that fusion off, the dots run through XLA:CPU's own emitter.
DINOv2-S/14's f32 forward with the fusion off against on (2 cores of an AMD EPYC, 2026-12-07,
`benchmarks/vfm_forward.py`, both variants interleaved in one process per shape): 224 px batch
8 592 vs 671 ms, batch 32 2.78 vs 4.46 s; 336 px batch 8 1.83 vs 2.17 s, but batch 4 949 vs
884 ms (7 % slower). The GPT's train step and decoding gained nothing from it (0.99x and 0.95x
in one process) and the tokenizer's train step 1.05x at 41 % more compile time, so they keep
the default.

Options are passed per program (`jax.jit(..., compiler_options=...)`), never through XLA_FLAGS,
so other programs of the process are unaffected. An option this jaxlib does not know is left
out (probed once) rather than failing every compile.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

_CPU_DENSE_FORWARD = {"xla_cpu_experimental_ynn_fusion_type": ""}


@functools.lru_cache(maxsize=None)
def _accepted(items: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib's CPU compiler takes these options (a tiny program compiled once for a
  CPU device, whatever the default backend)."""
  x = jax.device_put(np.zeros((1,), np.float32), jax.devices("cpu")[0])
  try:
    jax.jit(lambda x: x + 1).lower(x).compile(compiler_options=dict(items))
  except jax.errors.JaxRuntimeError:
    return False
  return True


def dense_forward_options(platform: str | None = None) -> dict[str, str]:
  """Compile options for a frozen ViT forward on `platform` (default: jax's default backend):
  YNNPACK dot fusion off on CPU, nothing elsewhere."""
  platform = platform or jax.default_backend()
  if platform != "cpu" or not _accepted(tuple(sorted(_CPU_DENSE_FORWARD.items()))):
    return {}
  return dict(_CPU_DENSE_FORWARD)
