"""Experiment configs: `get_config(arg)` files loaded with `--config path.py:arg`."""
