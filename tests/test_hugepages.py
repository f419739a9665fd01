"""`petct` restarts its network-running commands once with glibc's malloc on huge pages
(petct_jax/hugepages.py); the data tools and in-process calls are never restarted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import os, sys
    print("start", os.environ.get("GLIBC_TUNABLES", "-"), flush=True)
    from petct_jax import cli
    try:
        cli.main()
    except SystemExit:
        pass
""")


def _run(tmp_path, *args: str, **env: str) -> list[str]:
    script = tmp_path / "petct_entry.py"
    script.write_text(SCRIPT)
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PETCT_NO_REEXEC")}
    out = subprocess.run([sys.executable, str(script), *args], env={**clean, **env},
                         capture_output=True, text=True, timeout=120)
    return [line for line in out.stdout.splitlines() if line.startswith("start")]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_heavy_commands_restart_once_with_huge_pages(tmp_path):
    starts = _run(tmp_path, "predict", "--help")
    assert starts == ["start -", "start glibc.malloc.hugetlb=1"]
    # `python -m petct_jax.cli` restarts as a module, not as the file cli.py
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "PETCT_NO_REEXEC")}
    out = subprocess.run([sys.executable, "-X", "utf8", "-m", "petct_jax.cli", "predict", "--help"],
                         env=clean, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: petct predict" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_data_tools_and_the_opt_out_do_not_restart(tmp_path):
    assert _run(tmp_path, "store-info", "--help") == ["start -"]
    assert _run(tmp_path, "predict", "--help", PETCT_NO_REEXEC="1") == ["start -"]
    # other tunables are kept
    assert _run(tmp_path, "predict", "--help", GLIBC_TUNABLES="glibc.malloc.arena_max=2") == [
        "start glibc.malloc.arena_max=2", "start glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"]
