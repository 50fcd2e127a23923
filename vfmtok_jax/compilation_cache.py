"""JAX's persistent compilation cache for the command lines, in a per-user cache directory.

  directory = compilation_cache.enable(flag_value)   # before the first compilation

Executables are kept apart per backend, process count and device count: the same program
compiled for one process with 8 devices and for two processes with 4 each hashes alike, and
running the other's executable deadlocks the collectives. An explicit JAX_COMPILATION_CACHE_DIR
in the environment wins (JAX reads it itself); "off" (or "") turns the cache off.
"""

from __future__ import annotations

import os

import jax

OFF = ("", "off", "none", "0")


def default_directory() -> str:
  """$XDG_CACHE_HOME/vfmtok_jax/jax (default ~/.cache/vfmtok_jax/jax)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "vfmtok_jax", "jax")


def enable(directory: str | None = None, *, min_compile_secs: float = 1.0) -> str | None:
  """Turns the cache on under `directory` (None: `default_directory()`); returns the directory
  in use, or None when it is off. Call after `jax.distributed.initialize`."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return os.environ["JAX_COMPILATION_CACHE_DIR"]
  if directory is not None and directory.strip().lower() in OFF:
    return None
  directory = directory or default_directory()
  layout = f"{jax.default_backend()}_{jax.process_count()}p_{jax.device_count()}d"
  path = os.path.join(directory, layout)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_secs)
  return path
