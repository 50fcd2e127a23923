"""Weight-conversion command lines (`python -m vfmtok_jax.convert vfm|tokenizer`, and
`python -m vfmtok_jax.convert.lpips_weights`); the readers and key maps are `vfmtok_jax.weights`."""
