"""What every command line does: refuse stray arguments, join the cluster, turn on the
compilation cache, keep libraries' INFO logs quiet and end a user's mistake with one line.

  _CACHE = cli_setup.define_cache_flag()          # at module level, with the other flags
  def main(argv):
    cli_setup.start(argv, _CACHE)                 # before anything compiles
  if __name__ == "__main__":
    cli_setup.run(main)                           # instead of absl's app.run
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging

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


# What a user's mistake raises: a bad value or setting (ValueError, configs' errors among
# them), a missing or unwritable file (OSError), an absent key (KeyError).
USER_ERRORS = (ValueError, OSError, KeyError)


def error_line(e: BaseException) -> str:
  """The one line a command prints for a user's mistake."""
  text = e.args[0] if isinstance(e, KeyError) and e.args else e
  return f"error: {text}"


def run(main) -> None:
  """`app.run(main)`, and: absl's INFO lines (Orbax's checkpoint chatter) hidden unless
  `--verbosity` is given; a user's mistake (`USER_ERRORS`) ends the command with its one-line
  message on stderr and exit status 1 (the traceback with `--verbosity=1`)."""
  def quiet_main(argv):
    verbosity = flags.FLAGS["verbosity"]
    if not verbosity.present:
      logging.set_verbosity(logging.WARNING)
    try:
      return main(argv)
    except USER_ERRORS as e:
      if verbosity.value >= 1:
        raise
      print(error_line(e), file=sys.stderr, flush=True)
      sys.exit(1)

  app.run(quiet_main)
