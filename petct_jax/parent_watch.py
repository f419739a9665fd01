"""Worker processes that do not outlive their parent.

A parent killed outright (SIGKILL, the OOM killer, a preempted job) runs no cleanup, and the
multiprocessing workers it started (Grain's data workers, a ProcessPoolExecutor's) then wait
for work for ever: they keep their memory and whatever else they hold (shared batch
segments, a half-written case) and may even finish a task that the next run is redoing.
`exit_with_parent`, called in the worker (a pool's `initializer`, Grain's `worker_init_fn`),
ends the worker once its parent is gone.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

CHECK_S = 1.0  # how often a worker looks for its parent


def exit_with_parent(cleanup: Callable[[], None] | None = None) -> None:
    """Start a daemon thread that runs `cleanup` and exits this process (status 1) once the
    process that started it has died."""
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(), cleanup),
                     name="petct-parent-watch", daemon=True).start()


def _exit_when_orphaned(parent: int, cleanup: Callable[[], None] | None) -> None:
    # A dead parent's children are handed to init (or a subreaper): the parent pid changes.
    # Polling, not prctl(PR_SET_PDEATHSIG): that fires when the parent *thread* that started
    # the worker ends, which need not be the main thread, and exists on Linux only.
    while os.getppid() == parent:
        time.sleep(CHECK_S)
    if cleanup is not None:
        cleanup()
    os._exit(1)
