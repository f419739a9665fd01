"""Stopping a run cleanly on SIGTERM or Ctrl-C: finish the step, save a checkpoint, exit.

SIGTERM is how schedulers stop a job: SLURM preemption, `scancel` and time limits, `docker
stop`, Kubernetes, spot VMs. Killed at once, a run would lose the steps since its last
periodic checkpoint (up to `ckpt.every_steps`: about an hour of accelerator time at the
full-size defaults). Instead the training loop finishes the step it is in, saves, and raises
`Preempted`; the CLI exits with 128 + 15 = 143, and re-running the same command resumes
from that step.

Ctrl-C (SIGINT) in a single-process run does the same (exit status 130): an interactive
user stopping a run rarely wants to lose its last steps. A second Ctrl-C stops at once
(KeyboardInterrupt, nothing saved beyond the periodic checkpoints), for a step that takes too
long to wait for.

One process: a signal handler notes the signal and the loop reads the note after each step.
Several processes (`jax.distributed`): JAX's coordination service catches SIGTERM on any of
them and lets all agree on the step at which they stop
(`multihost_utils.reached_preemption_sync_point`, called after every step), so every
process saves the same step.

The data worker processes ignore SIGTERM and SIGINT (`petct_jax.data.batch_buffers`): a
scheduler signals every process of the job, and a terminal's Ctrl-C reaches its whole
process group, so a worker dying first would fail the trainer's next batch before it could
save. They end with their trainer (`petct_jax.parent_watch`).
"""

from __future__ import annotations

import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

from petct_jax.errors import PetctError


SIGNAL_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


class Preempted(PetctError):
    """The run stopped on a signal after saving a checkpoint; the CLI exits 128 + signal."""

    def __init__(self, message: str, signum: int = signal.SIGTERM):
        super().__init__(message)
        self.exit_code = 128 + int(signum)


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
        self.signum: int | None = None  # the signal that stops the run
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatch":
        if self._mode == "signal":
            self._previous = {s: signal.signal(s, self._note) for s in SIGNAL_NAMES}
        elif self._mode == "sync":
            self.signum = signal.SIGTERM  # the only signal the preemption service catches
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def _note(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
            print("\nCtrl-C: saving a checkpoint after this step; press Ctrl-C again to stop "
                  "at once", file=sys.stderr, flush=True)

    @property
    def signal_name(self) -> str:
        return SIGNAL_NAMES.get(self.signum, "a signal")

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step` (every process gets the same answer)."""
        if self._mode == "sync":
            return multihost_utils.reached_preemption_sync_point(step)
        return self.signum is not None
