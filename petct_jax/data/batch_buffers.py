"""Batch memory that Grain's worker processes reuse instead of a new shared segment per batch.

Grain hands every batch from a worker process to the trainer in fresh shared memory
(`SharedMemoryArray`), which the trainer unlinks when it drops the batch. New memory costs
page faults and zeroing for every byte: on our 2-core KVM machine ~1.7 ms per MB, about
20 of the ~85 CPU ms a default 96 x 128 x 128 x 2 patch cost (google/grain#851 reports the
same cost). Instead each worker keeps a small ring of shared segments, one batch each. The
sampler writes its patches straight into a free segment (no stacking, no copy), and the
batch crosses the process boundary as a `BatchRef` (segment name and layout) that Grain
pickles as a few bytes. In the trainer, `BatchViews.open` maps the segment (once: it unlinks
the name at once, so nothing outlives the processes) and returns numpy views of it; when
the last view is gone, a finalizer marks the segment free, and only then does the worker
write into it again. A worker whose whole ring is in use (a trainer holding many batches)
makes a one-off segment instead: it never waits for the trainer.

A trainer killed outright (SIGKILL, the OOM killer, a preempted job) never tells its Grain
workers to stop: they would wait on their full queue forever, holding their memory and
segments. Each worker therefore watches its parent (`petct_jax.parent_watch`) and, once it
is gone, unlinks its segments and exits.

Byte 0 of a segment says who owns it: FREE (the worker may write), IN_USE (sent; views may
be alive) or ONE_OFF (not in a ring: each process closes its mapping once its arrays over it
are gone; numpy arrays do not keep a SharedMemory mapping open). Segments
whose batch never reached the trainer (still queued when the iterator closed) are unlinked
by their worker as it exits.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import threading
import weakref
from multiprocessing import shared_memory, util
from typing import Any, Mapping

import numpy as np

from petct_jax.errors import PetctError
from petct_jax.parent_watch import exit_with_parent

FREE, IN_USE, ONE_OFF = 0, 1, 2
HEADER = 64  # bytes before the first array; arrays start 64-byte aligned
ALIGN = 64
REF_KEY = "_batch_ref"  # where a worker's batch carries its BatchRef
NAME_PREFIX = "petct_"  # segment names: petct_<trainer pid>_<random>
SHM_DIR = "/dev/shm"  # where Linux keeps the segments (a tmpfs; containers often make it small)

_ring_size = 0  # > 0 in a Grain worker process: batches go to shared segments
_created_here: list["_Created"] = []  # this process's segment names, for a hasty exit


def init_worker_process(ring_size: int, worker_index: int = 0, worker_count: int = 1, *,
                        parent_pid: int | None = None) -> None:
    """Grain `worker_init_fn` (bind `ring_size` and the trainer's `parent_pid` with
    functools.partial; default: this process's parent now): batches made in this
    process go to shared segments, at most `ring_size` of them reused; SIGTERM is left to
    the trainer, and the process unlinks its segments and exits when the trainer is gone."""
    global _ring_size
    _ring_size = int(ring_size)
    exit_with_parent(os.getppid() if parent_pid is None else parent_pid, cleanup=unlink_created)
    if threading.current_thread() is threading.main_thread():
        # A scheduler stopping the job signals every process, a terminal's Ctrl-C the whole
        # process group; the trainer saves first (train/preemption.py) and closes its
        # workers, which must not have died before it.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def unlink_created() -> None:
    """Unlink every segment this process made that the trainer has not opened."""
    for created in list(_created_here):
        created.unlink_unread()


def ring_size_for(buffer: int, read_threads: int = 1) -> int:
    """Segments a worker needs so that it makes no one-offs while the trainer holds at most
    two batches: Grain's prefetch inside the worker (`buffer` or `read_threads` batches), its
    queue to the trainer (`buffer`), the trainer side's per-worker prefetch (`buffer`), two in
    transit between those stages and two in the trainer's hands."""
    return max(buffer, read_threads) + 2 * buffer + 4


@dataclasses.dataclass(frozen=True)
class BatchRef:
    """Where a worker put a batch: segment name and (key, offset, shape, dtype) per array."""
    name: str
    layout: tuple[tuple[str, int, tuple[int, ...], str], ...]


Spec = Mapping[str, "tuple[tuple[int, ...], Any]"]  # key -> (shape, dtype)


def _layout(spec: Spec) -> tuple[tuple, int]:
    layout, offset = [], HEADER
    for key, (shape, dtype) in spec.items():
        dtype = np.dtype(dtype)
        layout.append((key, offset, tuple(int(s) for s in shape), dtype.str))
        offset += -(-int(np.prod(shape, dtype=np.int64)) * dtype.itemsize // ALIGN) * ALIGN
    return tuple(layout), offset


def _views(buffer: Any, layout: tuple) -> dict[str, np.ndarray]:
    return {key: np.ndarray(shape, np.dtype(dtype), buffer=buffer, offset=offset)
            for key, offset, shape, dtype in layout}


def check_shared_memory(size: int, shm_dir: str = SHM_DIR) -> None:
    """Refuse a segment that the shared-memory filesystem has no room for: writing into it
    would kill the worker with SIGBUS instead of an error."""
    if not os.path.isdir(shm_dir):
        return  # not Linux: the system sizes shared memory itself
    stat = os.statvfs(shm_dir)
    free = stat.f_bavail * stat.f_frsize
    if free < size:
        stale = orphaned_segments(shm_dir)
        held = sum(os.path.getsize(os.path.join(shm_dir, f)) for f in stale)
        hint = (f"; {held / 2**20:.0f} MiB of it are segments of trainers no longer running "
                f"here ({len(stale)} files, rm {shm_dir}/{NAME_PREFIX}<pid>_*)") if stale else ""
        raise PetctError(f"{shm_dir} has {free / 2**20:.0f} MiB free, a batch needs {size / 2**20:.0f} "
                         "MiB: give it more (docker run --shm-size=...) or lower data.num_workers, "
                         f"the batch size or the patch{hint}")


def orphaned_segments(shm_dir: str = SHM_DIR) -> list[str]:
    """Batch segments named after a trainer pid that is not running (left when a trainer and
    its workers were killed together). Only reported, never removed here: in a container
    sharing /dev/shm but not the pid namespace, a pid that is not ours may be running."""
    found = []
    for name in os.listdir(shm_dir):
        pid = name[len(NAME_PREFIX):].split("_")[0] if name.startswith(NAME_PREFIX) else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            found.append(name)
        except PermissionError:  # running, as another user
            pass
    return sorted(found)


class _Created:
    """The names of the segments a process made, unlinked when it exits (those the trainer
    opened are unlinked already). A segment made after that (a Grain prefetch thread still
    running) is unlinked at once: its batch will never be read."""

    def __init__(self):
        self.names: list[str] = []
        self.exited = False
        self.lock = threading.Lock()

    def add(self, shm: shared_memory.SharedMemory) -> None:
        with self.lock:
            if self.exited:
                shm.unlink()
            else:
                self.names.append(shm.name)

    def unlink_unread(self) -> None:
        with self.lock:
            self.exited, names, self.names = True, self.names, []
        for name in names:
            try:
                shared_memory.SharedMemory(name).unlink()
            except FileNotFoundError:  # the trainer opened it and unlinked the name
                pass


class BatchBuffers:
    """`new(spec)` -> (arrays to fill, the batch to return). In a Grain worker process the
    arrays lie in a ring segment and the batch is {REF_KEY: BatchRef}; elsewhere they are
    plain numpy arrays and the batch is those arrays. Pickles without its segments (each
    process has its own ring); thread-safe (Grain may run several batches at once)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ring: list[shared_memory.SharedMemory] = []
        self._created: _Created | None = None

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def new(self, spec: Spec) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        if not _ring_size:
            arrays = {k: np.empty(shape, dtype) for k, (shape, dtype) in spec.items()}
            return arrays, dict(arrays)
        layout, size = _layout(spec)
        with self._lock:
            shm = self._segment(size)
        whole = np.ndarray((size,), np.uint8, buffer=shm.buf)
        if shm.buf[0] == ONE_OFF:
            # numpy arrays do not pin the mapping (shm.close() would succeed under them): a
            # one-off is closed when the last array over it is gone, not before.
            weakref.finalize(whole, shm.close)
        return _views(whole, layout), {REF_KEY: BatchRef(shm.name, layout)}

    def _segment(self, size: int) -> shared_memory.SharedMemory:
        shm = next((s for s in self._ring if s.size == size and s.buf[0] == FREE), None)
        if shm is None:
            shm = self._create(size)
            if len(self._ring) < _ring_size:
                self._ring.append(shm)
            else:  # the trainer holds the whole ring
                shm.buf[0] = ONE_OFF
        if shm.buf[0] == FREE:
            shm.buf[0] = IN_USE
        return shm

    def _create(self, size: int) -> shared_memory.SharedMemory:
        check_shared_memory(size)
        if self._created is None:  # the first segment: clean up when the process exits
            self._created = _Created()
            _created_here.append(self._created)
            util.Finalize(self, self._created.unlink_unread, exitpriority=10)
        while True:  # named after the trainer, so that leftovers are easy to tell
            try:
                shm = shared_memory.SharedMemory(
                    f"{NAME_PREFIX}{os.getppid()}_{secrets.token_hex(4)}", create=True, size=size)
                break
            except FileExistsError:
                continue
        self._created.add(shm)
        return shm


def _release(shm: shared_memory.SharedMemory) -> None:
    if shm.buf[0] == ONE_OFF:
        shm.close()
    else:
        shm.buf[0] = FREE


class BatchViews:
    """Trainer side: replaces a batch's BatchRef by numpy arrays over its segment."""

    def __init__(self):
        self._mapped: dict[str, shared_memory.SharedMemory] = {}

    def open(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        ref = out.pop(REF_KEY, None)
        if ref is None:
            return out
        shm = self._mapped.get(ref.name)
        if shm is None:
            shm = shared_memory.SharedMemory(ref.name)
            shm.unlink()  # both processes keep their mappings; nobody needs the name again
            if shm.buf[0] != ONE_OFF:
                self._mapped[ref.name] = shm
        whole = np.ndarray((shm.size,), np.uint8, buffer=shm.buf)
        # The segment goes back to the worker when `whole` and every view of it are gone.
        weakref.finalize(whole, _release, shm)
        out.update(_views(whole, ref.layout))
        return out

    def close(self) -> None:
        """Forget the mappings (views still alive keep theirs until they are dropped)."""
        self._mapped.clear()
