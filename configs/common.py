"""Shared helpers for `get_config(arg)` files.

The `--config path.py:ARG` grammar (as in big_vision): ARG is a comma-separated list of
`key=value` pairs and bare `flag` names (a bare name means True). Every key must be declared
with a default in `parse_arg`, and values are converted to the default's type, so a typo or a
wrong type is an error that names the key. Individual fields are then overridden with
`--config.a.b=value` (ml_collections.config_flags), and configs are locked so a misspelled
override is an error too.
"""

from __future__ import annotations

import ml_collections


class ConfigArgError(ValueError):
  """A `--config file.py:ARG` argument that does not fit the declared keys."""


def _convert(key: str, text: str, default):
  if isinstance(default, bool):
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on", ""):
      return True
    if lowered in ("0", "false", "no", "off"):
      return False
    raise ConfigArgError(f"config arg {key!r}: {text!r} is not a boolean")
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigArgError(f"config arg {key!r}: {text!r} is not an integer") from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigArgError(f"config arg {key!r}: {text!r} is not a number") from None
  if default is None or isinstance(default, str):
    return text
  raise ConfigArgError(f"config arg {key!r}: default of type {type(default).__name__} "
                       "cannot be set from the command line")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `key=value,flag,...` against `defaults` (which also give the types).

  Args:
    arg: the text after `:` in `--config file.py:ARG`, or None/"".
    **defaults: every accepted key with its default value.

  Returns:
    A locked ConfigDict with every key of `defaults`, overridden by `arg`.

  Raises:
    ConfigArgError: an unknown key, a repeated key or a value of the wrong type.
  """
  result = dict(defaults)
  seen = set()
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ConfigArgError(
          f"unknown config arg {key!r}; known: {', '.join(sorted(defaults)) or '(none)'}")
    if key in seen:
      raise ConfigArgError(f"config arg {key!r} given twice")
    seen.add(key)
    if not has_value:
      if not isinstance(defaults[key], bool):
        raise ConfigArgError(f"config arg {key!r} needs a value ({key}=...)")
      result[key] = True
    else:
      result[key] = _convert(key, text.strip(), defaults[key])
  cfg = ml_collections.ConfigDict(result)
  cfg.lock()
  return cfg


def locked(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks `cfg` (recursively) so that unknown keys raise, and returns it."""
  cfg.lock()
  return cfg
