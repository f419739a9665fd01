"""Process settings for runs on XLA:CPU, applied by entry points (the `petct` command line,
the benchmarks, the test suite), never by importing the library.

Both settings help only the CPU backend and cost elsewhere: the YNNPACK opt-out
(`xla_flags.py`) concerns XLA:CPU's convolutions alone, and huge pages (`hugepages.py`) slowed
the data pipeline down (benchmarks/RESULTS.md) while a GPU or TPU run's compute does not go
through glibc's malloc. Both must be in place before a JAX backend starts, so whether the run
will be a CPU run is decided from what JAX itself would look at: `JAX_PLATFORMS`, then the
accelerator plugins installed (jax_plugins entry points and namespace modules, libtpu).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import pkgutil

from petct_jax.hugepages import reexec_with_huge_pages
from petct_jax.xla_flags import prefer_eigen_convolutions


def accelerator_plugins() -> list[str]:
    """Names of the installed PJRT plugins JAX would try before falling back to its CPU."""
    names = [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
    if importlib.util.find_spec("jax_plugins") is not None:
        import jax_plugins  # a namespace package: importing it starts nothing

        names += [module.name for module in pkgutil.iter_modules(jax_plugins.__path__)]
    if importlib.util.find_spec("libtpu") is not None:
        names.append("libtpu")
    return sorted(set(names))


def cpu_backend_expected() -> bool:
    """True when the run's default JAX backend will be XLA:CPU."""
    platforms = os.environ.get("JAX_PLATFORMS") or os.environ.get("JAX_PLATFORM_NAME", "")
    if platforms.strip():
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_plugins()


def prepare_cpu_process(huge_pages: bool) -> bool:
    """For a CPU run: restart once with huge pages (when asked), then set XLA:CPU's flag.
    Does nothing for a GPU/TPU run. Returns whether the run is a CPU run."""
    if not cpu_backend_expected():
        return False
    if huge_pages:
        reexec_with_huge_pages()
    prefer_eigen_convolutions()
    return True
