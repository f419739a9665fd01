"""Importing petct_jax puts XLA:CPU's flags in the environment before any JAX backend starts
(petct_jax/xla_flags.py): scripts that call `jax.default_backend()` before building a model
(the benchmarks did) must still get the flag."""

from __future__ import annotations

import os
import subprocess
import sys

from petct_jax.xla_flags import OPT_OUT, YNN_CONV_FLAG


def _flags_after(code: str, **env: str) -> str:
    """XLA_FLAGS as seen by `code`'s process after it ran (it prints them last)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", OPT_OUT)}
    code += "\nimport os; print(os.environ.get('XLA_FLAGS', '-'))"
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[-1]


def test_importing_the_package_sets_the_flag_without_importing_jax():
    code = "import sys, petct_jax; assert 'jax' not in sys.modules"
    assert _flags_after(code) == YNN_CONV_FLAG
    # a benchmark's order: petct_jax first, then the backend, then the models
    code = ("import petct_jax.hugepages, jax; jax.default_backend()\n"
            "from petct_jax.models import conv_cpu")
    assert _flags_after(code) == YNN_CONV_FLAG
    assert _flags_after("import petct_jax", XLA_FLAGS="--xla_cpu_use_thunk_runtime=true") == \
        f"--xla_cpu_use_thunk_runtime=true {YNN_CONV_FLAG}"


def test_flags_are_left_alone_when_too_late_or_told_so():
    # after a backend started the flag could not take effect: do not pretend it did
    assert _flags_after("import jax; jax.default_backend(); import petct_jax") == "-"
    assert _flags_after("import petct_jax", **{OPT_OUT: "1"}) == "-"
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _flags_after("import petct_jax", XLA_FLAGS=own) == own
