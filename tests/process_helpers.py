"""Processes seen through /proc (Linux): for tests that kill a parent and watch its workers."""

from __future__ import annotations

import os
import signal
import time

HAS_PROC = os.path.isdir("/proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
        return state, int(ppid)
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def spawned_workers(parent: int) -> list[int]:
    """Live multiprocessing-spawned children of `parent` (not its resource tracker)."""
    workers = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                spawned = b"spawn_main" in f.read()
        except OSError:
            continue
        stat = _stat(int(entry))
        if spawned and stat is not None and stat[0] != "Z" and stat[1] == parent:
            workers.append(int(entry))
    return workers


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:  # gone already
            pass


def wait_for(condition, timeout: float, interval: float = 0.1) -> bool:
    """Poll `condition()` until it holds (True) or `timeout` seconds have passed (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
