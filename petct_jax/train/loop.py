"""One training loop for every task (MAE pretraining, fine-tuning, probing).

A task hands over its model, loss, data and preview; the loop owns what every run
needs: the mesh and sharded state, the jitted step, Orbax checkpoints that include
the data iterator, resume after a crash or `kill -9`, a checkpoint on SIGTERM or Ctrl-C
(`preemption.py`), metrics, previews, the non-finite guard and the summary. Re-running the
same command resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from petct_jax.data.pipeline import global_batch
from petct_jax.errors import PetctError
from petct_jax.folder_lock import folder_lock
from petct_jax.train import checkpoint as ckpt_lib
from petct_jax.train import mesh as mesh_lib
from petct_jax.train import metrics as metrics_lib
from petct_jax.train import optim
from petct_jax.train import step as step_lib
from petct_jax.train.preemption import Preempted, PreemptionWatch


@dataclasses.dataclass
class Task:
    """What a task supplies to the loop.

    model: the NNX module to train (freshly initialised, or with loaded weights).
    loss_fn: `(model, batch, key, train) -> (loss, aux)`; with train=False it scores
        validation batches.
    train_iter: a checkpointable Grain iterator of per-host numpy batches.
    val_batches: fixed per-host validation batches (the same every evaluation).
    voxels_per_batch: patch voxels in one global batch, for throughput.
    preview: optional `(model, batch, path) -> None` writing a PNG.
    trainable: optional filter of parameter paths (tuple of keys) to train; the rest
        stay frozen (linear probing).
    """

    model: nnx.Module
    loss_fn: Callable
    train_iter: Any
    val_batches: list[dict]
    voxels_per_batch: int
    preview: Callable | None = None
    trainable: Callable[[tuple], bool] | None = None


class NonFiniteLoss(PetctError):
    pass


def record_store_harmonization(config: ml_collections.ConfigDict) -> None:
    """Copy the store's harmonization (preset, voxel size) into `config.data`, so that the
    run's config.json says how its data was made even where the store is gone (prediction
    harmonizes new scans the same way; fine-tuning refuses weights of another preset)."""
    from petct_jax.store import read_info, store_preset

    if not config.get("store") or "data" not in config:
        return
    try:
        info = read_info(str(config.store))
    except (PetctError, OSError, ValueError):  # unreachable here: the data loader will say so
        return
    with config.unlocked():
        config.data.preset = store_preset(info)
        config.data.spacing_zyx = tuple(float(v) for v in info["spacing_zyx"])


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Write the resolved config (with the store's harmonization); refuse to resume a
    workdir made with another task."""
    record_store_harmonization(config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # a local path or a URL (gs://...)
    path = epath.Path(workdir) / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("task") != config.get("task"):
            raise PetctError(f"{workdir}: holds a {old.get('task')!r} run, not {config.get('task')!r}; "
                             "use another --workdir")
    if jax.process_index() == 0:
        metrics_lib.write_text_atomic(str(path), config.to_json_best_effort(indent=2, sort_keys=True))


def _trainable_mask(params: dict, trainable: Callable[[tuple], bool] | None):
    if trainable is None:
        return None
    return jax.tree_util.tree_map_with_path(
        lambda path, _: bool(trainable(tuple(getattr(k, "key", k) for k in path))), params)


def _frozen_tx(tx, mask):
    import optax
    if mask is None:
        return tx
    labels = jax.tree.map(lambda m: "train" if m else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    """Train (or resume) to `config.total_steps`; returns the summary. One run at a time
    per workdir: a second is refused while the first runs (held by process 0 of a job)."""
    lock = folder_lock(workdir, "training run") if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train(config, workdir, task)


def _train(config: ml_collections.ConfigDict, workdir: str, task: Task) -> dict:
    prepare_workdir(workdir, config)
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise PetctError(f"batch_size={config.batch_size} is not divisible by the "
                         f"{mesh.devices.size} devices of the mesh")
    per_device = config.batch_size // mesh.devices.size
    if per_device % config.grad_accum:
        raise PetctError(f"grad_accum={config.grad_accum} does not divide the per-device batch "
                         f"{per_device} (batch_size={config.batch_size} over {mesh.devices.size} "
                         f"devices): every device must hold rows of every micro-batch")

    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    graphdef, params, rest = step_lib.split_model(task.model)
    tx = _frozen_tx(tx, _trainable_mask(params, task.trainable))
    state = step_lib.init_state(params, tx, config.seed)
    shardings = step_lib.state_shardings(state, mesh, rules, config.mesh.min_fsdp_size)
    data_sharding = mesh_lib.batch_sharding(mesh)

    checkpointer = ckpt_lib.RunCheckpointer(
        ckpt_lib.checkpoint_dir(workdir), keep=config.ckpt.keep,
        keep_best=config.ckpt.keep_best, async_save=config.ckpt.async_save)
    writer = metrics_lib.MetricsWriter(workdir)
    latest = checkpointer.latest_step()
    if latest is not None:
        state = checkpointer.restore(latest, ckpt_lib.abstract_like(state, shardings),
                                     data_iter=task.train_iter)
        metrics_lib.truncate_metrics(workdir, latest)
    else:
        state = jax.device_put(state, shardings)
    start = int(jax.device_get(state["step"]))

    train_step = jax.jit(
        step_lib.make_train_step(graphdef, rest, task.loss_fn, tx, schedule,
                                 accum_steps=config.grad_accum,
                                 skip_nonfinite=config.on_nonfinite == "skip"),
        in_shardings=(shardings, data_sharding), out_shardings=(shardings, None),
        donate_argnums=0)
    eval_step = jax.jit(step_lib.make_eval_step(graphdef, rest, task.loss_fn),
                        in_shardings=(shardings["params"], data_sharding, None))
    to_global = lambda batch: global_batch(batch, mesh)

    def evaluate(step: int) -> dict | None:
        if not task.val_batches:
            return None
        totals: dict[str, float] = {}
        for i, batch in enumerate(task.val_batches):
            loss, aux = eval_step(state["params"], to_global(batch), jax.random.key(10_000 + i))
            for k, v in {"loss": loss, **aux}.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        row = {k: v / max(len(task.val_batches), 1) for k, v in totals.items()}
        writer.write(step, row, split="val")
        return row

    def save(step: int, val: dict | None, force: bool = False) -> None:
        checkpointer.save(step, state, data_iter=task.train_iter, config=config.to_dict(),
                          metrics=None if not val else {"val_loss": val["loss"]}, force=force)

    def preview(step: int) -> None:
        if task.preview is None or not task.val_batches:
            return
        params = state["params"]
        if jax.process_count() > 1:
            # Parameters split over hosts (FSDP) are not addressable from process 0 alone:
            # gather them (a collective, so every process takes part), then process 0 draws.
            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() == 0:
            model = step_lib.merge_model(graphdef, jax.device_get(params), rest)
            task.preview(model, task.val_batches[0],
                         os.path.join(workdir, "previews", f"step_{step:07d}.png"))

    throughput = metrics_lib.Throughput(task.voxels_per_batch)
    all_finite = jnp.array(True)

    def check_finite(step: int) -> None:
        """Before a step's state is logged or saved: stop on a non-finite loss or gradient
        since the last check (or note the skipped steps, with on_nonfinite="skip")."""
        nonlocal all_finite
        if bool(all_finite):
            return
        if config.on_nonfinite != "skip":
            raise NonFiniteLoss(
                f"non-finite loss or gradient before step {step}; stopped without "
                f"saving (last good checkpoint: step {checkpointer.latest_step()}). "
                "Lower optim.lr, check the data, or set --config.on_nonfinite=skip")
        writer.write(step, {"skipped_nonfinite": 1})
        all_finite = jnp.array(True)

    last_train: dict = {}
    bar = tqdm(total=config.total_steps, initial=start, desc=f"{config.task} {os.path.basename(workdir.rstrip('/'))}",
               file=sys.stderr, dynamic_ncols=True, disable=jax.process_index() != 0)
    started = time.perf_counter()
    step = start
    try:
        with PreemptionWatch() as preemption:
            while step < config.total_steps:
                batch = next(task.train_iter)
                state, m = train_step(state, to_global(batch))
                step += 1
                all_finite = all_finite & m["finite"]
                bar.update(1)
                due_eval = step % config.eval_every == 0 or step == config.total_steps
                due_save = step % config.ckpt.every_steps == 0 or step == config.total_steps
                if step % config.log_every == 0 or due_eval or due_save:
                    check_finite(step)
                    row = {k: v for k, v in jax.device_get(m).items() if k != "finite"}
                    row.update(throughput.update(step))
                    last_train = writer.write(step, row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                    vox_s=f"{row.get('voxels_per_s', 0):.3g}")
                val = evaluate(step) if due_eval else None
                if due_save:
                    save(step, val, force=step == config.total_steps)
                if step % config.preview_every == 0 or step == config.total_steps:
                    preview(step)
                if step < config.total_steps and preemption.reached(step):
                    if not due_save:
                        check_finite(step)
                        save(step, None, force=True)
                    raise Preempted(f"stopped by {preemption.signal_name} after step {step}, which "
                                    "is saved: run the same command again to resume", preemption.signum)
    finally:
        bar.close()
        checkpointer.wait()
        writer.close()

    summary = {
        "task": config.task, "workdir": workdir, "steps": step, "resumed_from": start or None,
        "seconds": time.perf_counter() - started, "final_train": last_train,
        "final_val": next((r for r in reversed(metrics_lib.read_metrics(workdir))
                           if r.get("split") == "val"), None),
        "best_step": checkpointer.best_step(), "devices": jax.device_count(),
    }
    if jax.process_index() == 0:
        (epath.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    checkpointer.close()
    return summary
