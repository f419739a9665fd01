"""Reused shared batch segments (worker side and trainer side in one process)."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
from multiprocessing import shared_memory

import numpy as np
import pytest

from petct_jax.data import batch_buffers as bb
from petct_jax.errors import PetctError

SPEC = {"image": ((2, 4, 5, 3), "float32"), "label": ((2, 4, 5), "uint8")}
RING = 2


@pytest.fixture
def worker(monkeypatch):
    """BatchBuffers as in a Grain worker process with a ring of RING segments."""
    monkeypatch.setattr(bb, "_ring_size", RING)
    buffers = bb.BatchBuffers()
    yield buffers
    if buffers._created is not None:
        buffers._created.unlink_unread()


def _fill(buffers: bb.BatchBuffers, value: int) -> dict:
    arrays, batch = buffers.new(SPEC)
    for a in arrays.values():
        a[...] = value
    return batch  # what the worker returns to Grain: the arrays are dropped here


def _name(batch: dict) -> str:
    return batch[bb.REF_KEY].name


def _exists(name: str) -> bool:
    try:
        shared_memory.SharedMemory(name).close()
        return True
    except FileNotFoundError:
        return False


def test_outside_a_worker_batches_are_plain_arrays():
    arrays, batch = bb.BatchBuffers().new(SPEC)
    assert batch.keys() == arrays.keys() == SPEC.keys()
    assert type(batch["image"]) is np.ndarray and batch["image"].shape == (2, 4, 5, 3)
    assert batch["label"].dtype == np.uint8


def test_a_batch_crosses_as_a_small_ref_and_opens_as_aligned_views(worker):
    batch = pickle.loads(pickle.dumps(_fill(worker, 3)))
    assert list(batch) == [bb.REF_KEY] and len(pickle.dumps(batch)) < 600
    got = bb.BatchViews().open({**batch, "case": np.asarray(["a", "b"])})
    assert got["image"].shape == (2, 4, 5, 3) and got["image"].dtype == np.float32
    assert got["label"].shape == (2, 4, 5) and got["label"].dtype == np.uint8
    assert (got["image"] == 3).all() and (got["label"] == 3).all()
    assert list(got["case"]) == ["a", "b"] and bb.REF_KEY not in got
    assert all(a.ctypes.data % bb.ALIGN == 0 for a in (got["image"], got["label"]))
    assert not _exists(_name(batch))  # the trainer unlinked the name when it mapped it


def test_a_segment_is_reused_once_the_trainer_drops_its_batch(worker):
    views = bb.BatchViews()
    first = _fill(worker, 1)
    opened = views.open(first)
    image = opened["image"][0]  # a view of a view keeps the segment in use
    del opened
    gc.collect()
    assert _name(_fill(worker, 2)) != _name(first)
    del image
    gc.collect()
    again = _fill(worker, 5)
    assert _name(again) == _name(first)
    assert (views.open(again)["image"] == 5).all()


def test_a_held_batch_is_never_overwritten(worker):
    """With the whole ring held by the trainer the worker makes one-off segments."""
    views = bb.BatchViews()
    held = [views.open(_fill(worker, v)) for v in (1, 2)]
    one_offs = [_fill(worker, v) for v in (7, 8, 9)]
    assert len({_name(b) for b in one_offs}) == 3
    for v, batch in zip((7, 8, 9), one_offs):
        got = views.open(batch)
        assert (got["image"] == v).all()
        assert _name(batch) not in views._mapped  # closed when its views die, not cached
    assert (held[0]["image"] == 1).all() and (held[1]["label"] == 2).all()


def test_a_one_off_stays_mapped_while_its_arrays_live(worker):
    """Grain's read threads fill several batches at once: making the next batch must not
    unmap a one-off still being filled (numpy arrays do not pin a SharedMemory's mapping)."""
    views = bb.BatchViews()
    held = [views.open(_fill(worker, v)) for v in (1, 2)]  # the whole ring
    arrays, batch = worker.new(SPEC)  # a one-off, being filled...
    later = _fill(worker, 6)  # ...while another batch is made
    arrays["image"][...] = 4  # a segfault if the one-off had been unmapped
    arrays["label"][...] = 4
    del arrays
    assert (views.open(batch)["image"] == 4).all() and (views.open(later)["label"] == 6).all()
    assert (held[0]["image"] == 1).all()


def test_segments_never_read_are_unlinked_when_the_worker_exits(worker):
    unread = _name(_fill(worker, 1))
    read = _fill(worker, 2)
    bb.BatchViews().open(read)
    assert _exists(unread)
    worker._created.unlink_unread()
    assert not _exists(unread) and not _exists(_name(read))
    late = _fill(worker, 3)  # a prefetch thread still running: unlinked at once
    assert not _exists(_name(late))


ORPHAN = """
from multiprocessing import resource_tracker
resource_tracker.register = resource_tracker.unregister = lambda *a: None  # nobody else unlinks
from petct_jax.data import batch_buffers as bb
bb._ring_size = 2
buffers = bb.BatchBuffers()
names = [buffers.new({"x": ((4,), "float32")})[1][bb.REF_KEY].name for _ in range(3)]
print(" ".join(names), flush=True)  # two ring segments and a one-off, none read
from petct_jax import parent_watch
parent_watch._exit_when_orphaned(-1, bb.unlink_created)  # -1 is no parent: the trainer died
"""


def test_a_worker_whose_trainer_died_unlinks_its_segments_and_exits():
    """What a Grain worker does once its trainer is gone (test_data_pipeline.py kills one)."""
    run = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=120)
    names = run.stdout.split()
    assert run.returncode == 1 and len(names) == 3, run.stderr
    assert not any(map(_exists, names))


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_data_worker_leaves_stop_signals_to_its_trainer(signum):
    """A scheduler stopping a job signals every process, a terminal's Ctrl-C its process
    group: the trainer saves a checkpoint and then closes its workers, so the workers must
    outlive the signal."""
    script = ("import os, signal\nfrom petct_jax.data import batch_buffers as bb\n"
              f"bb.init_worker_process(2)\nos.kill(os.getpid(), signal.{signum})\nprint('alive')")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "alive", run.stderr


def test_ring_size_covers_grain_buffers_and_two_held_batches():
    assert bb.ring_size_for(2) == 10 and bb.ring_size_for(2, read_threads=4) == 12


def test_a_full_shared_memory_filesystem_is_a_clear_error(tmp_path, monkeypatch):
    bb.check_shared_memory(1 << 20, str(tmp_path))  # room enough: no error
    bb.check_shared_memory(1 << 60, str(tmp_path / "absent"))  # no such filesystem: not Linux
    with pytest.raises(PetctError, match="shm-size.*data.num_workers") as err:
        bb.check_shared_memory(1 << 60, str(tmp_path))
    assert "no longer running" not in str(err.value)
    # Segments of a trainer that is gone are pointed out (a pid above any pid_max is never
    # running); those of running processes and other files are not.
    (tmp_path / f"{bb.NAME_PREFIX}99999999_ab12").write_bytes(b"x" * (3 << 20))
    (tmp_path / f"{bb.NAME_PREFIX}{os.getpid()}_cd34").write_bytes(b"x")
    (tmp_path / "sem.mp-xyz").write_bytes(b"x")
    assert bb.orphaned_segments(str(tmp_path)) == [f"{bb.NAME_PREFIX}99999999_ab12"]
    with pytest.raises(PetctError, match=r"3 MiB of it are segments of trainers no longer run"):
        bb.check_shared_memory(1 << 60, str(tmp_path))
