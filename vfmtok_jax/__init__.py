"""vfmtok_jax: VFMTok (vision-foundation-model tokenizers) in JAX/Flax."""

__version__ = "0.1.0"
