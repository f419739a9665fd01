"""Stopping a run cleanly on SIGTERM: finish the step, save a checkpoint, exit.

SIGTERM is how schedulers stop a job: SLURM preemption, `scancel` and time limits, `docker
stop`, Kubernetes, spot VMs. Killed at once, a run would lose the steps since its last
periodic checkpoint (up to `ckpt.every_steps`: about an hour of accelerator time at the
full-size defaults). Instead the training loop finishes the step it is in, saves, and raises
`Preempted`; the CLI exits with 128 + 15 = 143, and re-running the same command resumes
from that step.

One process: a signal handler notes the signal and the loop reads the note after each step.
Several processes (`jax.distributed`): JAX's coordination service catches SIGTERM on any of
them and lets all agree on the step at which they stop
(`multihost_utils.reached_preemption_sync_point`, called after every step), so every
process saves the same step.

The data worker processes ignore SIGTERM (`petct_jax.data.batch_buffers`): a scheduler
signals every process of the job, and a worker dying first would fail the trainer's next
batch before it could save. They end with their trainer (`petct_jax.parent_watch`).
"""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

from petct_jax.errors import PetctError


class Preempted(PetctError):
    """The run stopped on SIGTERM after saving a checkpoint."""
    exit_code = 128 + signal.SIGTERM


class PreemptionWatch:
    """`with PreemptionWatch() as watch: ... if watch.reached(step): save and stop`."""

    def __init__(self):
        # Several processes stopping at different steps would leave the others waiting in a
        # collective: without JAX's preemption service (jax_enable_preemption_service=False)
        # SIGTERM keeps its default action, as it does outside the main thread (signal
        # handlers can only be set there).
        if jax.process_count() > 1:
            self._mode = "sync" if jax.config.jax_enable_preemption_service else None
        else:
            self._mode = "signal" if threading.current_thread() is threading.main_thread() else None
        self._signalled = False
        self._previous = None

    def __enter__(self) -> "PreemptionWatch":
        if self._mode == "signal":
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _note(self, signum, frame) -> None:
        self._signalled = True

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer)."""
        if self._mode == "sync":
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled
