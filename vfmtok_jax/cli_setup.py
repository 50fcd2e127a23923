"""What every command line does first: refuse stray arguments, join the cluster, turn on the
compilation cache.

  _CACHE = cli_setup.define_cache_flag()          # at module level, with the other flags
  def main(argv):
    cli_setup.start(argv, _CACHE)                 # before anything compiles
"""

from __future__ import annotations

from absl import app
from absl import flags

from vfmtok_jax import compilation_cache
from vfmtok_jax import distributed


def define_cache_flag():
  return flags.DEFINE_string(
      "compilation_cache", None, "JAX persistent compilation cache directory (default "
      "~/.cache/vfmtok_jax/jax, or $JAX_COMPILATION_CACHE_DIR when set); 'off' disables it")


def start(argv, cache_flag, *, multi_host: bool = True) -> str | None:
  """UsageError for positional arguments; `jax.distributed` from the environment (multi_host);
  the compilation cache on. Returns the cache directory in use (None: off)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if multi_host:
    distributed.initialize_from_env()
  return compilation_cache.enable(cache_flag.value)
