"""Weights layer: reading foreign weight files and mapping their keys onto Flax param trees.

The bottom layer of the package: it imports no other `vfmtok_jax` module (models, losses and
the loaders that build modules sit above it). `files` reads state dicts, `trees` assembles and
checks param trees, and one module per source layout holds its key map and config inference.
"""
