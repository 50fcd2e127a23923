"""ops.conv: the matmul kernel gradient equals XLA's convolution gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfmtok_jax.ops import conv


def _xla_conv(x, w):
  pad = (w.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      preferred_element_type=jnp.float32)


@pytest.mark.parametrize("k,cin,cout,hw", [(3, 32, 48, (9, 7)), (1, 40, 32, (6, 6)),
                                           (3, 8, 4, (5, 5))])  # last: the thin XLA path
def test_value_and_grads_match_xla(k, cin, cout, hw):
  rng = np.random.default_rng(k + cin)
  x = jnp.asarray(rng.normal(size=(2, *hw, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.1, jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, *hw, cout)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    ours = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv.conv2d_same(x, w) * g),
                                      argnums=(0, 1)))(x, w)
    ref = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(_xla_conv(x, w) * g),
                                     argnums=(0, 1)))(x, w)
  # One scalar: a sum of ~2e4 f32 products in another order (relative ~1e-6).
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
  for a, b in zip(ours[1], ref[1]):  # same sums in another order: f32 rounding only
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(b))))


def test_kernel_grad_tap_layout():
  """Tap (i, j) of the kernel gradient pairs x shifted by (i - 1, j - 1) with g."""
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 2, 0].set(1.0)
  g = jnp.zeros((1, 4, 4, 1)).at[0, 2, 2, 0].set(1.0)
  dw = np.asarray(conv.kernel_grad(x, g, 3))[:, :, 0, 0]
  want = np.zeros((3, 3))
  want[0, 1] = 1.0  # output (2, 2) reads input (2 + 0 - 1, 2 + 1 - 1) = (1, 2) through tap (0, 1)
  np.testing.assert_array_equal(dw, want)


def test_bf16_inputs_give_bf16_grads():
  x = jnp.ones((1, 4, 4, 32), jnp.bfloat16)
  w = jnp.ones((3, 3, 32, 32), jnp.bfloat16) * 0.01
  dx, dw = jax.grad(lambda x, w: jnp.sum(conv.conv2d_same(x, w)), argnums=(0, 1))(x, w)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16
  assert float(dw[1, 1, 0, 0]) == pytest.approx(16.0, rel=1e-2)  # all 16 positions see the centre


def test_bad_kernel_is_refused():
  with pytest.raises(ValueError, match="square odd kernel"):
    conv.conv2d_same(jnp.zeros((1, 4, 4, 32)), jnp.zeros((2, 2, 32, 32)))
