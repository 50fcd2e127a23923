"""ops.compiler_options: per-program XLA options by platform."""

import jax
import jax.numpy as jnp
import numpy as np

from vfmtok_jax.ops import compiler_options


def test_only_cpu_gets_options():
  assert compiler_options.dense_forward_options("tpu") == {}
  assert compiler_options.dense_forward_options("gpu") == {}
  assert compiler_options.dense_forward_options("cpu") == {
      "xla_cpu_experimental_ynn_fusion_type": ""}


def test_an_option_the_compiler_does_not_know_is_left_out():
  assert not compiler_options._accepted((("xla_cpu_no_such_option_anywhere", ""),))  # pylint: disable=protected-access


def test_the_options_take_effect_and_keep_the_result():
  """The option changes the compiled program (YNNPACK's fused dots are gone) but not what it
  computes beyond f32 rounding (the dot's summation order differs: tolerance 1e-5 relative on
  sums of 384 products of O(1) terms)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 384)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((384, 256)) / 20, jnp.float32)

  def fn(x, w):
    return jax.nn.gelu(x @ w)
  default = jax.jit(fn).lower(x, w).compile()
  tuned = jax.jit(fn, compiler_options=compiler_options.dense_forward_options("cpu")).lower(
      x, w).compile()
  assert "ynn" in default.as_text().lower() and "ynn" not in tuned.as_text().lower()
  np.testing.assert_allclose(tuned(x, w), default(x, w), rtol=1e-5, atol=1e-5)
