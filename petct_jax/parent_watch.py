"""Worker processes that do not outlive their parent.

A parent killed outright (SIGKILL, the OOM killer, a preempted job) runs no cleanup, and the
multiprocessing workers it started (Grain's data workers, a ProcessPoolExecutor's) then wait
for work for ever: they keep their memory and whatever else they hold (shared batch
segments, a half-written case) and may even finish a task that the next run is redoing.
`exit_with_parent(parent_pid)`, called in the worker (a pool's `initializer` with
`initargs=(os.getpid(),)`, Grain's `worker_init_fn`), ends the worker once its parent is gone.

The parent passes its own pid: a parent that dies while the worker is still starting has
already handed it to init, and `os.getppid()` read in the worker would then name init,
which never dies (such workers lived on for minutes and wrote cases outside the folder
lock). Work that writes checks `orphaned()` before it starts writing.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

CHECK_S = 1.0  # how often a worker looks for its parent


_parent: int | None = None  # the pid this worker serves, once exit_with_parent has run


def exit_with_parent(parent_pid: int, cleanup: Callable[[], None] | None = None) -> None:
    """Exit this process (status 1, after `cleanup`) now if process `parent_pid` is no
    longer its parent, else as soon as it dies (a daemon thread watches)."""
    global _parent
    _parent = parent_pid
    if orphaned():
        _exit(cleanup)
    threading.Thread(target=_exit_when_orphaned, args=(parent_pid, cleanup),
                     name="petct-parent-watch", daemon=True).start()


def orphaned() -> bool:
    """Whether the parent that `exit_with_parent` named has died (False outside workers)."""
    return _parent is not None and os.getppid() != _parent


def _exit(cleanup: Callable[[], None] | None) -> None:
    if cleanup is not None:
        cleanup()
    os._exit(1)


def _exit_when_orphaned(parent: int, cleanup: Callable[[], None] | None) -> None:
    # A dead parent's children are handed to init (or a subreaper): the parent pid changes.
    # Polling, not prctl(PR_SET_PDEATHSIG): that fires when the parent *thread* that started
    # the worker ends, which need not be the main thread, and exists on Linux only.
    while os.getppid() == parent:
        time.sleep(CHECK_S)
    _exit(cleanup)
