"""The XLA:CPU flag petct-jax's CPU runs want, put in the environment by entry points.

XLA reads XLA_FLAGS once, when the first JAX backend starts, so it must be in place before
anything calls `jax.devices()`, `jax.default_backend()` or runs a computation. The `petct`
command line, the benchmarks and the test suite set it first thing, and only for a CPU run
(`cpu_process.prepare_cpu_process`); importing the library changes no environment. A user's
own script can call `prefer_eigen_convolutions()` before it starts JAX.

XLA:CPU hands 2D convolutions (and some fusions around them) to YNNPACK by default, which ran
them at ~85 GFLOP/s on our 2-core test machines against ~155 GFLOP/s for XLA's Eigen 2D
convolution on the same shapes, and the CPU convolution path (`models/conv_cpu.py`) is made
of 2D convolutions. Removing only individual convolutions from YNNPACK still left conv fusions
there (MAE step 4.4-5.9 s, unsteady); an empty fusion set keeps everything on Eigen and XLA's
own emitters (4.2 s, steady). When the flag was set too late (after `jax.default_backend()`),
the same step took 20.2 s instead of 4.9 s on a 2-core Zen 3 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import importlib.metadata
import os
import sys

YNN_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# XLA aborts on a flag it does not know: set it only for jaxlib versions where it was checked.
CHECKED_JAXLIB = ("0.10.",)
OPT_OUT = "PETCT_KEEP_XLA_FLAGS"


def _backend_started() -> bool:
    if "jax" not in sys.modules:
        return False  # nothing can have started a backend yet
    try:
        from jax._src import xla_bridge

        return xla_bridge.backends_are_initialized()
    except Exception:  # private API moved: cannot tell, so assume it started
        return True


def prefer_eigen_convolutions() -> bool:
    """Add `YNN_CONV_FLAG` to XLA_FLAGS if it can still take effect; True if it is in place.

    Skipped when XLA_FLAGS already says anything about YNN fusions, when a JAX backend has
    already started, when PETCT_KEEP_XLA_FLAGS is set, or on an unchecked jaxlib version.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" in flags:
        return YNN_CONV_FLAG in flags.split()
    if os.environ.get(OPT_OUT):
        return False
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return False
    if not version.startswith(CHECKED_JAXLIB) or _backend_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {YNN_CONV_FLAG}".strip()
    return True
