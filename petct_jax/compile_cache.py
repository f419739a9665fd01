"""XLA's persistent compilation cache, on for every command that runs networks.

A start or resume of `petct pretrain/finetune/probe/predict` would otherwise compile its step
from nothing (minutes for the paper's networks on a GPU). JAX's cache also holds XLA:GPU's
per-fusion autotune results (`jax_persistent_cache_enable_xla_caches`, on by default), so a
resumed GPU run skips autotuning too.

Where: `JAX_COMPILATION_CACHE_DIR` if the user set it (JAX reads it itself); else
`PETCT_COMPILE_CACHE` (a directory, or `off`); else the command's own default: the user's
cache directory (`$XDG_CACHE_HOME/petct_jax/xla`, `~/.cache/...`), or `W/jax_cache` for a
study, whose cells may run as separate jobs on several nodes sharing W.
"""

from __future__ import annotations

import os

OFF = ("0", "off", "no", "false", "none")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "petct_jax", "xla")


def enable_compile_cache(default: str | None = None) -> str | None:
    """Turn the cache on (before the first compilation); returns its directory, or None."""
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    setting = os.environ.get("PETCT_COMPILE_CACHE", "").strip()
    if setting.lower() in OFF and setting:
        return None
    directory = setting or default or default_cache_dir()
    if "://" not in directory:
        directory = os.path.abspath(directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    return directory
