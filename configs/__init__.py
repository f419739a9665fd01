"""Experiment configs, big_vision style: each file defines `get_config(arg)`.

Installed as `petct_jax.configs`, so `--config pretrain.py:tiny` finds the packaged
file from any directory (see `petct_jax.config.load_config_file`).
"""
