"""One owner of checkpoints (petct_jax/train/checkpoint.py, restore.py): listing steps and
one definition of "best", the same for the loop, the study and the downstream commands."""

import numpy as np
import pytest

from petct_jax.errors import PetctError
from petct_jax.train.checkpoint import RunCheckpointer, checkpoint_dir, finished_steps
from petct_jax.train.restore import checkpoint_step


def test_steps_and_best_are_read_the_way_the_loop_wrote_them(tmp_path):
    workdir = str(tmp_path / "run")
    assert finished_steps(workdir) == []
    with pytest.raises(PetctError, match="no finished checkpoint"):
        checkpoint_step(workdir)
    ckpt = RunCheckpointer(checkpoint_dir(workdir), keep=3, keep_best=1, async_save=False)
    state = {"params": {"w": np.ones(3, np.float32)}}
    for step, loss in ((1, 0.9), (2, 0.4), (3, 0.7)):
        ckpt.save(step, state, metrics={"val_loss": loss}, force=True)
    ckpt.wait()
    assert finished_steps(workdir) == [1, 2, 3]
    assert checkpoint_step(workdir, "best") == ckpt.best_step() == 2
    assert checkpoint_step(workdir, "latest") == 3 and checkpoint_step(workdir, 1) == 1
    with pytest.raises(PetctError, match="no checkpoint at step 7"):
        checkpoint_step(workdir, 7)
    ckpt.close()


def test_best_falls_back_to_latest_without_validation(tmp_path):
    workdir = str(tmp_path / "run")
    ckpt = RunCheckpointer(checkpoint_dir(workdir), async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"params": {"w": np.zeros(2, np.float32)}}, force=True)
    ckpt.wait()
    assert checkpoint_step(workdir, "best") == 2
    ckpt.close()
