"""XLA:CPU's flag and huge pages are set by entry points, only for CPU runs, never by importing
the library (petct_jax/cpu_process.py, xla_flags.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from petct_jax.hugepages import OPT_OUT as NO_REEXEC
from petct_jax.xla_flags import OPT_OUT, YNN_CONV_FLAG

SHOW = "\nimport os; print(os.environ.get('XLA_FLAGS', '-'), os.environ.get('GLIBC_TUNABLES', '-'))"


def _env_after(code: str, **env: str) -> str:
    """XLA_FLAGS and GLIBC_TUNABLES as seen by `code`'s process after it ran."""
    clean = {k: v for k, v in os.environ.items()
             if k not in ("XLA_FLAGS", OPT_OUT, NO_REEXEC, "GLIBC_TUNABLES", "JAX_PLATFORMS")}
    out = subprocess.run([sys.executable, "-c", code + SHOW], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()[-1]


def test_importing_the_library_changes_no_environment():
    code = "import petct_jax, petct_jax.models.conv_cpu, petct_jax.train.step, jax; jax.devices()"
    assert _env_after(code) == "- -"


def test_a_cpu_entry_point_gets_the_flag_and_huge_pages():
    prepare = "from petct_jax.cpu_process import prepare_cpu_process as p; print(p({}))"
    # re-exec'd once with huge pages: the printed lines are the restarted process's
    assert _env_after(prepare.format("True"), JAX_PLATFORMS="cpu") == \
        f"{YNN_CONV_FLAG} glibc.malloc.hugetlb=1"
    assert _env_after(prepare.format("False"), JAX_PLATFORMS="cpu",
                      XLA_FLAGS="--xla_cpu_use_thunk_runtime=true") == \
        f"--xla_cpu_use_thunk_runtime=true {YNN_CONV_FLAG} -"
    # a GPU or TPU run is left as it is
    assert _env_after(prepare.format("True"), JAX_PLATFORMS="cuda") == "- -"
    assert _env_after(prepare.format("True"), JAX_PLATFORMS="tpu,cpu") == "- -"


def test_backend_expectation_follows_what_jax_would_pick(monkeypatch):
    from petct_jax import cpu_process

    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not cpu_process.cpu_backend_expected()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert cpu_process.cpu_backend_expected()
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.delenv("JAX_PLATFORM_NAME", raising=False)
    monkeypatch.setattr(cpu_process, "accelerator_plugins", lambda: ["xla_cuda12"])
    assert not cpu_process.cpu_backend_expected()
    monkeypatch.setattr(cpu_process, "accelerator_plugins", lambda: [])
    assert cpu_process.cpu_backend_expected()


def test_flags_are_left_alone_when_too_late_or_told_so():
    prepare = "from petct_jax.xla_flags import prefer_eigen_convolutions as p; p()"
    # after a backend started the flag could not take effect: do not pretend it did
    assert _env_after("import jax; jax.default_backend()\n" + prepare) == "- -"
    assert _env_after(prepare, **{OPT_OUT: "1"}) == "- -"
    own = "--xla_cpu_experimental_ynn_fusion_type=dot"
    assert _env_after(prepare, XLA_FLAGS=own) == f"{own} -"
