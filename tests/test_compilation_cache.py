"""The command lines' persistent compilation cache: where it writes, and its off switch."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = """
import sys
import jax, jax.numpy as jnp
from vfmtok_jax import compilation_cache
path = compilation_cache.enable(None if sys.argv[1] == "default" else sys.argv[1],
                                min_compile_secs=0)
print("PATH", path)
jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()
"""


def _run(tmp_path, arg, **env):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  out = subprocess.run([sys.executable, "-c", _SCRIPT, arg], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout.split("PATH ")[1].split()[0]


def _files(path):
  return [f for _, _, fs in os.walk(path) for f in fs]


def test_default_directory_is_per_user_and_per_layout(tmp_path):
  path = _run(tmp_path, "default")
  assert path == str(tmp_path / "xdg" / "vfmtok_jax" / "jax" / "cpu_1p_2d")
  assert _files(path)  # the executable was written


def test_off_writes_nothing(tmp_path):
  assert _run(tmp_path, "off") == "None"
  assert not os.path.exists(tmp_path / "xdg")
  explicit = tmp_path / "mine"
  assert _run(tmp_path, str(explicit)) == str(explicit / "cpu_1p_2d")
  assert _files(explicit)
