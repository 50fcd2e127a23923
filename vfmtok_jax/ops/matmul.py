"""`x @ w` whose weight gradient XLA:CPU computes without transposing the output gradient.

Autodiff of `einsum("...i,io->...o")` gives the weight gradient as `x^T g`, a product that
contracts the leading (token) axis of both operands. XLA:CPU's layout assignment then copies the
whole output gradient `g` into a transposed layout first: for the GPT's output head that is a
(1024, 16384) f32 copy per step, and the copy and the product ran together at a fraction of the
speed of the same product on row-major operands (the head and its loss, forward and backward,
took 0.31 s alone; with this op 0.19 s, and the train step went from 0.64 to 0.54 s: README,
"The GPT train step against PyTorch"). Here the backward transposes the
small operand instead (`x`, tokens x in), behind an optimization barrier so that XLA cannot fold
the transpose back into the product, and multiplies row-major `x^T (in, N)` by `g (N, out)`.

The values are those of the autodiff formulation (the same products, summed in another order:
f32 results agree to rounding). On TPU and GPU the extra transpose of `x` costs one small copy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _product(x2: jax.Array, w: jax.Array) -> jax.Array:
  return jax.lax.dot_general(x2, w, (((1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32)


@jax.custom_vjp
def _matmul_2d(x2: jax.Array, w: jax.Array) -> jax.Array:
  return _product(x2, w)


def _matmul_2d_fwd(x2, w):
  return _product(x2, w), (x2, w)


def _matmul_2d_bwd(res, g):
  x2, w = res
  # dx = g w^T (contracting the output axis: row-major operands as they are).
  dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  xt = jax.lax.optimization_barrier(x2.T)  # (in, N), materialised
  dw = jax.lax.dot_general(xt, g, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x2.dtype), dw.astype(w.dtype)


_matmul_2d.defvjp(_matmul_2d_fwd, _matmul_2d_bwd)


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """(..., in) x (in, out) -> (..., out) float32, both operands as given (cast them first).

  Gradients as autodiff's (accumulated in f32, returned in each operand's dtype); see the module
  docstring for why the weight gradient is formulated by hand."""
  lead = x.shape[:-1]
  y = _matmul_2d(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*lead, w.shape[-1])
