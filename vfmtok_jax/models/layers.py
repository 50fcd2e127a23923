"""Small Linen building blocks with a compute dtype, f32 params and logical axis names.

Every parameter is created through `nn.with_logical_partitioning`, so `model.init` returns
boxed params whose names (`embed`, `mlp`, `heads`, ...) the sharding rules map onto the mesh;
`nn.unbox` gives the plain arrays that `apply` and the weight loaders (`weights.trees`) use.
Norm statistics and softmax are always computed in float32.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vfmtok_jax.ops import matmul as matmul_lib

Dtype = Any
Initializer = Callable[..., jax.Array]


def logical(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Attaches logical axis names to an initializer."""
  return nn.with_logical_partitioning(init, tuple(axes))


class Dense(nn.Module):
  """`y = x @ kernel (+ bias)`; kernel (in, out) stored f32, matmul inputs in `dtype`.

  The product accumulates in float32 (`preferred_element_type`) and is cast to `dtype` after the
  bias: on TPU that is what the MXU does anyway; on XLA:CPU a bf16-output dot runs at a fraction
  of the speed of a bf16 x bf16 -> f32 one.
  """
  features: int
  use_bias: bool = True
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", logical(self.kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), jnp.float32)
    y = matmul_lib.matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", logical(self.bias_init, self.kernel_axes[1:]),
                        (self.features,), jnp.float32)
      y = y + bias
    return y.astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm over the last axis, statistics in float32, output in `dtype`."""
  epsilon: float = 1e-5
  use_bias: bool = True
  use_scale: bool = True
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon)
    if self.use_scale:
      y = y * self.param("scale", logical(nn.initializers.ones, (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    if self.use_bias:
      y = y + self.param("bias", logical(nn.initializers.zeros, (self.axis_name,)),
                         (x.shape[-1],), jnp.float32)
    return y.astype(self.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          mask: jax.Array | None = None, dtype: Dtype = jnp.float32,
                          dropout_rate: float = 0.0, dropout_rng: jax.Array | None = None
                          ) -> jax.Array:
  """Scaled dot-product attention, logits and softmax in float32.

  Args:
    q: (B, Lq, H, D); k, v: (B, Lk, H, D).
    mask: boolean "keep" mask broadcastable to (B, H, Lq, Lk), or None.
    dtype: dtype of the probability-times-value matmul.
    dropout_rate: attention-probability dropout (needs `dropout_rng` when > 0).

  Returns:
    (B, Lq, H, D) in `dtype`.
  """
  scale = q.shape[-1] ** -0.5
  # Heads before positions, so both products are plain batched (L, D) matmuls (18 % faster on
  # XLA:CPU than contracting the (B, L, H, D) layouts in place).
  q, k, v = (t.astype(dtype).transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(dtype), v, preferred_element_type=jnp.float32)
  return out.transpose(0, 2, 1, 3).astype(dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
  """erf GELU (PyTorch `nn.GELU()`); Flax's `nn.gelu` defaults to the tanh form."""
  return nn.gelu(x, approximate=False)


def gelu_tanh(x: jax.Array) -> jax.Array:
  """tanh-approximate GELU (PyTorch `nn.GELU(approximate="tanh")`)."""
  return nn.gelu(x, approximate=True)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's `x * sigmoid(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_new": gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": nn.relu,
    "silu": nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an activation by its transformers name."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


# PyTorch's default Linear/Conv init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
xavier_uniform = nn.initializers.xavier_uniform()


def torch_default_bias_init(fan_in: int) -> Initializer:
  """U(+-1/sqrt(fan_in)), PyTorch's default bias init."""
  bound = fan_in ** -0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def causal_mask(length: int) -> jax.Array:
  """(1, 1, L, L) boolean keep-mask: query i sees keys j <= i."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class MultiHeadAttention(nn.Module):
  """Self-attention with separate `q_proj`/`k_proj`/`v_proj`/`out_proj` (all with bias).

  The VFMTok reference (`Attention3`) is always causal; `causal` is kept explicit here.
  """
  num_heads: int
  causal: bool = True
  dropout_rate: float = 0.0
  kernel_init: Initializer = xavier_uniform
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    b, n, d = x.shape
    h = self.num_heads

    def proj(name, axes):
      return Dense(d, kernel_axes=axes, kernel_init=self.kernel_init, dtype=self.dtype, name=name)
    q = proj("q_proj", ("embed", "heads_merged"))(x).reshape(b, n, h, d // h)
    k = proj("k_proj", ("embed", "heads_merged"))(x).reshape(b, n, h, d // h)
    v = proj("v_proj", ("embed", "heads_merged"))(x).reshape(b, n, h, d // h)
    rate = 0.0 if deterministic else self.dropout_rate
    out = dot_product_attention(q, k, v, mask=causal_mask(n) if self.causal else None,
                                dtype=self.dtype, dropout_rate=rate,
                                dropout_rng=self.make_rng("dropout") if rate > 0 else None)
    return proj("out_proj", ("heads_merged", "embed"))(out.reshape(b, n, d))
