"""Trained weights out of a run's workdir, for fine-tuning, prediction and conversion.

Reads the resolved config (`W/config.json`) and the parameters of one checkpoint (the
best by validation loss by default, else the latest) onto the host, without the
optimizer state or the data iterator.
"""

from __future__ import annotations

import json

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from petct_jax.errors import PetctError
from petct_jax.train.checkpoint import checkpoint_dir, finished_steps, read_only_manager


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = epath.Path(workdir) / "config.json"  # a local path or a URL
    if not path.exists():
        raise PetctError(f"{workdir}: not a petct run directory (no config.json)")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def checkpoint_step(workdir: str, which: str | int = "best") -> int:
    """The step of checkpoint `which`: "best" (lowest validation loss; the latest when no
    checkpoint recorded one), "latest", or a step number."""
    steps = finished_steps(workdir)
    if not steps:
        raise PetctError(f"{workdir}: no finished checkpoint")
    if which == "latest":
        return max(steps)
    if which == "best":
        best = read_only_manager(workdir).best_step()
        return max(steps) if best is None else best
    step = int(which)
    if step not in steps:
        raise PetctError(f"{workdir}: no checkpoint at step {step}; have {sorted(steps)}")
    return step


def load_params(workdir: str, which: str | int = "best", target: dict | None = None
                ) -> tuple[ml_collections.ConfigDict, dict, int]:
    """(run config, parameters as a pure dict of numpy arrays, step).

    `target` is the parameter pure dict of the model the weights are for
    (`nnx.to_pure_dict(nnx.state(model, nnx.Param))`, arrays or ShapeDtypeStructs): the
    result then has exactly its keys (NNX lists use integer keys, which the checkpoint's
    own metadata spells as strings). Without it, the checkpoint's tree is returned.
    """
    config = read_run_config(workdir)
    step = checkpoint_step(workdir, which)
    path = f"{checkpoint_dir(workdir)}/{step}/state"
    if target is None:
        meta = ocp.StandardCheckpointer().metadata(path)
        target = (meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree)["params"]
    # Restore as plain host arrays whatever mesh wrote them.
    target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), target)
    restored = ocp.PyTreeCheckpointer().restore(
        path, args=ocp.args.PyTreeRestore(
            item={"params": target},
            restore_args={"params": jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)},
            partial_restore=True))
    return config, restored["params"], step
