"""What fine-tuning and linear probing share: the split, validation patches, loss, previews.

Splits (patient level, never leaking a patient across train/val/test):
`data.split` names a split file (JSON {"train", "val", "test"} or the reference's CSV,
`splits.read_splits`); empty, the labelled scans of the store are split deterministically
by `splits.train_val_test(val=data.val_fraction, test=data.test_fraction, seed=data.split_seed)`.
The train split is the *training pool*; each task then takes its labelled subset from it
(a label fraction, or k shots). The resolved split is written to `W/split.json` (readable
by `splits.read_splits`; the pool's scans left out go to "unused").

Model selection uses the validation split only: the loop keeps the checkpoint with the
lowest validation loss (Dice + CE on fixed validation patches), and without a validation
split (the reference's CSVs have none) the final checkpoint is scored
(`test_eval.checkpoint_rule`); the test split is touched once, after training, by `test_eval`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from petct_jax.data import splits
from petct_jax.data.augment import AugmentConfig
from petct_jax.data.patches import PatchConfig
from petct_jax.downstream import losses
from petct_jax.errors import PetctError
from petct_jax.store import Store

NUM_CLASSES = 2  # background, lesion
VAL_SEED = 2_147_483  # validation patches do not depend on the run's seed


def labelled(record: Mapping) -> bool:
    return "seg" in record.get("arrays", ("pet", "ct", "seg")) and bool(record.get("has_label", True))


def resolve_split(store: Store, data_cfg: ml_collections.ConfigDict) -> dict[str, list[str]]:
    """{"train": the training pool, "val": ..., "test": ...[, "unused": left out by the split
    file]} (sorted scan ids)."""
    records = store.records
    if data_cfg.split:
        parts = splits.read_splits(data_cfg.split, records)
        # "unused": what the file leaves out on purpose (splits.encoded_label_fraction reads it)
        parts = {name: list(parts.get(name, [])) for name in (*splits.SPLIT_NAMES, "unused")}
        unlabelled = [i for name in ("train", "val", "test") for i in parts[name]
                      if not labelled(store.record(i))]
        if unlabelled:
            raise PetctError(f"{data_cfg.split}: case {unlabelled[0]!r} has no segmentation")
    else:
        parts = splits.train_val_test([r for r in records if labelled(r)], val=data_cfg.val_fraction,
                                      test=data_cfg.test_fraction, seed=data_cfg.split_seed)
    if not parts["train"]:
        raise PetctError(f"{store.root}: the split leaves no labelled training scans")
    return parts


def write_split(path: str, train: list[str], parts: Mapping[str, list[str]]) -> dict[str, list[str]]:
    """Write {"train": used, "val", "test", "unused": rest of the pool}; returns it."""
    used = set(train)
    out = {"train": sorted(train), "val": sorted(parts["val"]), "test": sorted(parts["test"]),
           "unused": sorted(i for i in parts["train"] if i not in used)}
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        splits.write_split_json(path, out)
    return out


def records_of(store: Store, ids: list[str]) -> list[dict]:
    return [store.record(i) for i in ids]


def val_patch_config(data_cfg: ml_collections.ConfigDict) -> PatchConfig:
    """The training patches' geometry and lesion share, without augmentation or zoom."""
    cfg = PatchConfig.from_config(data_cfg, "seg")
    return dataclasses.replace(cfg, augment=AugmentConfig(), zoom_prob=0.0)


def make_val_batches(store: Store, ids: list[str], config: ml_collections.ConfigDict,
                     normalizer: Any) -> list[dict]:
    """`config.eval_batches` fixed validation batches of patches (a third on lesions)."""
    from petct_jax.data import make_patch_iterator

    if not ids or not config.eval_batches:
        print(f"{config.task}: no validation {'scans' if not ids else 'batches'} (data.val_fraction / "
              "data.split, eval_batches): the latest checkpoint, not the best, will be scored",
              file=sys.stderr)
        return []
    it = make_patch_iterator(store, ids, val_patch_config(config.data), seed=VAL_SEED,
                             batch_size=config.batch_size, num_workers=0, task="seg",
                             normalizer=normalizer)
    return list(itertools.islice(it, config.eval_batches))


def outputs_of(model: Any, x: jax.Array, train: bool):
    return model(x, deterministic=not train)


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    out = nnx.merge(graphdef, state)(x)
    out = out[0] if isinstance(out, (list, tuple)) else out  # deep supervision: full resolution
    return out.astype(jnp.float32)


def logits_fn(model: nnx.Module):
    """`x -> full-resolution float32 logits` of `model` in inference mode. Jitted once per
    model structure and input shape: the previews and sliding windows of every run in a
    process that share a network layout share the compiled function."""
    graphdef, state = nnx.split(model)
    return lambda x: _logits(graphdef, state, x)


def make_loss_fn(loss_cfg: ml_collections.ConfigDict):
    """`loss_fn(model, batch, key, train) -> (loss, {"dice", "dice_loss", "ce"})`; "dice" is the
    hard foreground Dice of the batch (pooled), an aux metric logged on validation too."""
    kwargs = dict(dice_weight=float(loss_cfg.dice_weight), ce_weight=float(loss_cfg.ce_weight),
                  batch_dice=bool(loss_cfg.batch_dice),
                  include_background=bool(loss_cfg.include_background),
                  ds_label_mode=str(loss_cfg.ds_label_mode))

    def loss_fn(model, batch, key, train):
        out = outputs_of(model, batch["image"], train)
        loss, aux = losses.segmentation_loss(out, batch["label"], **kwargs)
        full = out[0] if isinstance(out, (list, tuple)) else out
        return loss, {**aux, "dice": losses.hard_dice(full, batch["label"])}

    return loss_fn


def make_preview(config: ml_collections.ConfigDict):
    """Overlay of the validation patch with the most lesion voxels (first validation batch).

    The patch is predicted inside a zero-filled batch of `eval.batch_windows` windows, the
    shape the test-split evaluation uses, so both share one compiled network."""
    from petct_jax.downstream.preview import save_segmentation_preview

    names = tuple(config.data.channels)
    windows = int(config.eval.batch_windows) if "eval" in config else 1

    def preview(model, batch, path):
        x = np.asarray(batch["image"])
        label = np.asarray(batch["label"])
        i = int(np.argmax(label.reshape(len(label), -1).sum(axis=1)))
        padded = np.zeros((windows, *x.shape[1:]), np.float32)
        padded[0] = x[i]
        pred = np.asarray(logits_fn(model)(padded))[0].argmax(-1)
        save_segmentation_preview(path, x[i], label[i], pred, names,
                                  title=os.path.basename(path).removesuffix(".png"))

    return preview


def finish_summary(workdir: str, summary: dict, **extra: Any) -> dict:
    """Add `extra` to the loop's summary and rewrite `W/summary.json`."""
    summary = {**summary, **extra}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2, default=_json_default)
    return summary


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return float(value)


def resumable(workdir: str) -> bool:
    """Whether `workdir` already holds a checkpoint (the loop will resume from it)."""
    from petct_jax.train.checkpoint import finished_steps

    return bool(finished_steps(workdir))
