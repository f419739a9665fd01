"""Start the process with glibc's malloc on transparent huge pages (Linux), for XLA:CPU's sake.

Why: XLA:CPU allocates every output and temporary buffer afresh on each call, and glibc
serves allocations above 32 MB with a new mmap of 4 KiB pages. They fault in one by one as
they are first written, and the strided passes over them (transposing copies, the
convolutions' packing) then miss the TLB on nearly every cache line: memory-bound ops run at
2-3 GB/s instead of the 15-25 GB/s numpy reaches on the same machine. With
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (glibc >= 2.35, THP mode "madvise" or "always") malloc
marks those mappings MADV_HUGEPAGE and they come in 2 MiB pages. Measured on a 2-core Zen 3,
one MAE step of the paper's UNet at 2 x 32x64x64: 17.4 s with the default allocator, 5.1 s
with huge pages (PyTorch's step in the same process: 6.3 vs 5.9 s). Raising glibc's mmap
threshold instead (`mallopt`, no restart) did not help (16.7 s): the pages' size matters, not
only their faulting.

Tunables are read when a process starts, hence a re-exec. `petct` does it for its
compute-heavy commands (`HEAVY_COMMANDS`) and the perf benchmarks for themselves, on CPU runs
only (`cpu_process.py`). It is a no-op
when the tunable is already set, off Linux, or when PETCT_NO_REEXEC is set (the opt-out).
Child processes (Grain's workers) inherit the setting.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "PETCT_NO_REEXEC"


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with huge pages on, once. It is the
    line this interpreter was started with (`sys.orig_argv`: keeps `-m module`, `-c code` and
    interpreter options, where `sys.argv` would run a module's file as a script)."""
    current = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLE.split("=")[0] in current or not sys.platform.startswith("linux") \
            or os.environ.get(OPT_OUT):
        return
    os.environ["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    os.environ[OPT_OUT] = "1"  # the restarted process must not restart again
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def huge_pages_on() -> bool:
    """Whether this process started with the tunable (benchmarks record it)."""
    return TUNABLE.split("=")[0] in os.environ.get("GLIBC_TUNABLES", "")
