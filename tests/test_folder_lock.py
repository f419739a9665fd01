"""One run at a time per workdir or store (petct_jax/folder_lock.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from petct_jax.errors import PetctError
from petct_jax.folder_lock import folder_lock
from test_train_loop import config, make_iter, task

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock")

HOLD = """
import sys, time
from petct_jax.folder_lock import folder_lock
with folder_lock(sys.argv[1], "test holder"):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(folder: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, folder], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_naming_the_holder_and_freed_by_its_death(tmp_path):
    folder = str(tmp_path / "w")
    proc = _holder(folder)
    try:
        with pytest.raises(PetctError, match=rf"in use by another process \(test holder, pid {proc.pid} on "):
            with folder_lock(folder, "training run"):
                pass
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no cleanup runs: the kernel drops the lock
        proc.wait()
    with folder_lock(folder, "training run"):
        with pytest.raises(PetctError, match="training run, pid"):  # also within one process
            with folder_lock(folder, "second"):
                pass
    with folder_lock(folder, "again"):  # released at the end of the block
        pass


def test_training_refuses_a_workdir_in_use_and_writes_nothing(tmp_path):
    from petct_jax.train import loop as loop_lib
    wd = str(tmp_path / "run")
    with folder_lock(wd, "training run"):
        with pytest.raises(PetctError, match="in use by another process"):
            loop_lib.train(config(), wd, task(make_iter()))
    assert os.listdir(wd) == [".petct.lock"]


def test_preprocess_refuses_a_store_in_use(tmp_path):
    import nifti_scenes as ns
    from petct_jax.preprocessing.preprocess import preprocess
    raw, out = str(tmp_path / "raw"), str(tmp_path / "store")
    ns.write_scan(os.path.join(raw, "PETCT_a", "s"))
    with folder_lock(out, "petct preprocess"):
        with pytest.raises(PetctError, match="in use by another process"):
            preprocess(raw, out, progress=False)
    assert preprocess(raw, out, progress=False).committed == ["PETCT_a_s"]
