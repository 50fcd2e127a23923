"""Numerical building blocks shared by the models (resizes, ...)."""
