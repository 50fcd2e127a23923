"""Flax (Linen) models: VFM towers, tokenizer parts and generator."""
