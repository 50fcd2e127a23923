"""The compute dtype where the user did not choose one: bfloat16 where the hardware runs it fast,
float32 elsewhere.

TPUs and GPUs multiply bf16 natively. On CPUs, XLA runs bf16 matmuls fast only with AMX tiles
(`amx_bf16`); without them (AVX-512 BF16 included) it converts to f32 around every op, and the
step is no faster or slower than in f32 (measured: the tokenizer step and forward in bf16 were
no faster on an AMD EPYC with AVX-512 BF16; README, benchmarks). Params stay float32 either way.
"""

from __future__ import annotations

import jax

CPU_FLAGS_FILE = "/proc/cpuinfo"


def cpu_flags(path: str = CPU_FLAGS_FILE) -> set[str]:
  """The CPU's feature flags (empty where the file does not say)."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith("flags"):
          return set(line.split(":", 1)[1].split())
  except OSError:
    pass
  return set()


def auto(platform: str | None = None, flags: set[str] | None = None) -> tuple[str, str]:
  """("bfloat16" or "float32", why) for `platform` (default: JAX's backend)."""
  platform = platform or jax.default_backend()
  if platform in ("tpu", "gpu", "cuda", "rocm"):
    return "bfloat16", f"{platform} runs bf16 natively"
  flags = cpu_flags() if flags is None else flags
  if "amx_bf16" in flags:
    return "bfloat16", "this CPU has AMX bf16 tiles"
  return "float32", "this CPU has no AMX bf16 tiles (bf16 would be no faster)"
