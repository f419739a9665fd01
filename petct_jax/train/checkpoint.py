"""Orbax checkpoints of a training run: model + optimizer state, step, RNG, the Grain
iterator's position and the resolved config, saved together (maxtext's habit).

Saves are asynchronous and atomic: Orbax writes into a temporary directory and
renames it when complete, so a run killed with `kill -9` mid-save leaves the previous
checkpoint intact and the next run resumes from it. Kept: the latest `keep` steps plus
the `keep_best` steps with the lowest validation metric.
"""

from __future__ import annotations

import dataclasses
import json
import os
import logging
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as cm


class _IteratorSnapshot:
    """The iterator's state taken at save time.

    Grain's handler calls `get_state()` when Orbax writes, which with async saves
    is on a background thread while the loop has already moved the iterator on;
    a snapshot pins the state to the saved step. Handed over as JSON bytes, the
    form Grain's handler writes as is (one file per process).
    """

    def __init__(self, iterator: Any):
        self._state = json.dumps(iterator.get_state()).encode()

    def get_state(self) -> bytes:
        return self._state


class _IteratorRestorer:
    """Feeds the JSON that Grain's handler reads back into the live iterator."""

    def __init__(self, iterator: Any):
        self.iterator = iterator

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        if hasattr(self.iterator, "start_prefetch"):
            self.iterator.start_prefetch()


class _DataHandler(grain.checkpoint.CheckpointHandler):
    """Grain's handler (one `process_<i>-of-<n>.json` per process), which also resumes
    on another number of processes: Grain's own only reads the file of the current
    process count. The PatchIterator's state is the global batch counter, the same in
    every process's file (petct_jax/data/pipeline.py), so any saved file restores every
    process; its fingerprint (seed, global batch size, scans) is still checked."""

    def restore(self, directory: epath.Path, item: Any = None, args: Any = None) -> Any:
        item = item or args.item
        directory = epath.Path(directory)
        own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        if own.exists():
            return super().restore(directory, item=item)
        saved = sorted(directory.glob("process_*-of-*.json"))
        if not saved:
            raise ValueError(f"{directory}: no data iterator state saved")
        logging.getLogger(__name__).warning(
            "data iterator state saved by another number of processes: restoring %s in "
            "process %d of %d", saved[0].name, jax.process_index(), jax.process_count())
        state = saved[0].read_text()
        item.set_state(json.loads(state) if isinstance(item, grain.DatasetIterator) else state.encode())
        item.start_prefetch()
        return item


@ocp.args.register_with_handler(_DataHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(_DataHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
    item: Any


# "Best" means one thing everywhere: the lowest validation loss among the checkpoints that
# recorded one (RunCheckpointer's BestN policy and best_step, and `read_only_manager`).
BEST_METRIC = "val_loss"


def read_only_manager(workdir: str) -> ocp.CheckpointManager:
    """A manager that lists and reads W/checkpoints (local or gs://) and never writes."""
    # The options read_only implies, spelled out: orbax warns about each one it has to change.
    options = ocp.CheckpointManagerOptions(
        read_only=True, save_interval_steps=0, create=False,
        best_fn=lambda m: m[BEST_METRIC], best_mode="min")
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def finished_steps(workdir: str) -> list[int]:
    """The steps of W's finished checkpoints, oldest first; [] for a new or missing workdir."""
    if not epath.Path(checkpoint_dir(workdir)).exists():
        return []
    return sorted(read_only_manager(workdir).all_steps())


class RunCheckpointer:
    def __init__(self, directory: str, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str = BEST_METRIC, async_save: bool = True):
        self.best_metric = best_metric
        policy = cm.preservation_policy.AnyPreservationPolicy([
            cm.preservation_policy.LatestN(n=keep),
            # BestN keeps the n at the end of the sorted order: reverse=True puts the lowest losses there.
            cm.preservation_policy.BestN(get_metric_fn=lambda m: m[best_metric], reverse=True,
                                         n=keep_best, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, best_fn=lambda m: m[best_metric], best_mode="min",
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(
            directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "data": _DataHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def save(self, step: int, state: Any, *, data_iter: Any = None, config: dict | None = None,
             metrics: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iter is not None:
            items["data"] = _DataSave(_IteratorSnapshot(data_iter))
        if config is not None:
            items["config"] = ocp.args.JsonSave(config)
        return self.manager.save(step, args=ocp.args.Composite(**items),
                                 metrics=metrics, force=force)

    def restore(self, step: int, abstract_state: Any, *, data_iter: Any = None) -> Any:
        """Restore the train state onto the shardings in `abstract_state` (any device count)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = _DataRestore(_IteratorRestorer(data_iter))
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    """W/checkpoints, absolute for a local workdir (Orbax wants that); URLs stay as given."""
    if "://" in str(workdir):
        return str(workdir).rstrip("/") + "/checkpoints"
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying target shardings: what Orbax restores into."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
