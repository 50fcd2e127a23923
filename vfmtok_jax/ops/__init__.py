"""Numerical building blocks shared by the models: torch/kornia-exact resizes."""
