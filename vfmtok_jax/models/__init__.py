"""Flax (Linen) models: VFM towers, the tokenizer and its parts, the DINO discriminator.

Pure modules: nothing here reads weight files (that is `vfmtok_jax.weights` and the loaders
above it: `vfm_zoo`, `tokenizer_io`, `losses`).
"""
