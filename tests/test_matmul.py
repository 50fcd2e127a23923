"""ops.matmul: autodiff's values and gradients, with the weight gradient formulated by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vfmtok_jax.ops import matmul


def _einsum(x, w):
  return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("shape", [(2, 5, 24), (7, 24)])
def test_value_and_grads_match_autodiff(shape):
  rng = np.random.default_rng(len(shape))
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(24, 40)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(*shape[:-1], 40)), jnp.float32)
  with jax.default_matmul_precision("highest"):
    ours = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(matmul.matmul(x, w) * g),
                                      argnums=(0, 1)))(x, w)
    ref = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(_einsum(x, w) * g),
                                     argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5)
  # The same f32 products summed in another order: rounding only (sums of 5-40 terms of O(1)).
  for a, b in zip(ours[1], ref[1]):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_weight_gradient_is_x_transposed_times_g():
  """Broken on purpose, this fails: dw[i, o] = sum_n x[n, i] g[n, o], and dx = g w^T."""
  x = jnp.zeros((3, 2)).at[1, 0].set(2.0)
  w = jnp.zeros((2, 4)).at[1, 3].set(5.0)
  g = jnp.zeros((3, 4)).at[1, 3].set(1.0)
  _, vjp = jax.vjp(matmul.matmul, x, w)
  dx, dw = vjp(g)
  np.testing.assert_array_equal(dw, jnp.zeros((2, 4)).at[0, 3].set(2.0))
  np.testing.assert_array_equal(dx, jnp.zeros((3, 2)).at[1, 1].set(5.0))


def test_bf16_operands_give_f32_products_and_gradients_in_their_dtypes():
  x = jnp.ones((4, 8), jnp.bfloat16)
  w = jnp.ones((8, 16), jnp.bfloat16)
  y, vjp = jax.vjp(matmul.matmul, x, w)
  dx, dw = vjp(jnp.ones_like(y))
  assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y), 8.0)
  np.testing.assert_array_equal(np.asarray(dw, np.float32), 4.0)
