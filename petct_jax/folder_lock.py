"""One run at a time per folder: an exclusive lock the kernel releases when the process ends.

Two training runs in one workdir (a command started twice, a requeued job starting while
the old one still saves) would both restore the same checkpoint, save the same steps and
interleave their metrics; two `petct preprocess` runs into one store would rewrite each
other's half-written cases. `folder_lock` takes `flock` on FOLDER/.petct.lock for as long
as the block runs, and refuses a second holder with an error naming the first. The kernel
drops the lock when its process dies, `kill -9` included, so no stale lock is ever left.

Object-store folders (gs://...) have no locks and are not guarded; nor is anything on a
system without `fcntl` (Windows).
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Iterator

from petct_jax.errors import PetctError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".petct.lock"


@contextlib.contextmanager
def folder_lock(folder: str, what: str) -> Iterator[None]:
    """Hold FOLDER's lock while the block runs (`what` names the holder in a refusal);
    PetctError if another process, or another block of this one, holds it."""
    if fcntl is None or "://" in str(folder):
        yield
        return
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise PetctError(f"{folder} is in use by another process ({holder}): wait for it to "
                             "end or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{what}, pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
