"""`petct pretrain`: masked-autoencoder pretraining of a UNet backbone on a store.

    petct pretrain --config configs/pretrain.py:tiny --workdir runs/mae --config.store=runs/store

Validation: a held-out set of patients (`data.val_fraction`), scored with fixed masks,
picks the best checkpoint (without one, as in `pretrain.py:paper`, the latest is used);
`epochs` > 0 sets `total_steps` from the training scans when the run starts; a split file in `data.exclude` keeps its test cases out of
pretraining altogether. Re-running the same command resumes from the last checkpoint.
`--dry-run` prints the mesh, the per-host batch, the sharding of every parameter group and
a memory estimate per device, without a store and without training (petct_jax/train/plan.py).
Several processes (SLURM, Cloud TPU, PETCT_* variables) join through
`petct_jax.train.distributed.initialize()` before JAX looks for devices.
"""

from __future__ import annotations

import itertools
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from petct_jax import config as config_lib
from petct_jax import config_blocks
from petct_jax.data import make_patch_iterator, splits
from petct_jax.errors import PetctError
from petct_jax.mae.loss import reconstruction_loss
from petct_jax.mae.masking import block_mask
from petct_jax.mae.model import MaskedAutoencoder
from petct_jax.mae.preview import save_reconstruction_preview
from petct_jax.store import Store
from petct_jax.train import distributed, loop
from petct_jax.train.backbone import build_backbone


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="configs/pretrain.py[:VARIANT]; then any --config.KEY=VALUE")
    parser.add_argument("--workdir", required=True, help="run directory (local path or URL)")
    parser.add_argument("--dry-run", nargs="?", const="compile", choices=("compile", "shapes"),
                        help="print the mesh, batch, parameter shardings and memory per device, "
                             "then exit without training (=shapes: skip compiling the step)")


def run(args) -> int:
    distributed.initialize()  # before anything asks JAX for devices
    config = config_lib.resolve(args.config, args.config_overrides)
    if args.dry_run:
        from petct_jax.train import plan as plan_lib
        plan = plan_lib.train_plan(config, lambda: build_model(config, nnx.Rngs(config.seed)),
                                   mae_loss_fn(config.mae), batch_spec(config),
                                   compile=args.dry_run == "compile")
        if jax.process_index() == 0:
            print(plan_lib.format_plan(plan))
        return 1 if plan["problems"] else 0
    summary = pretrain(config, args.workdir)
    val = summary["final_val"] or {}
    print(f"pretrain: {summary['steps']} steps in {summary['seconds']:.0f} s; "
          f"validation loss {val.get('loss', float('nan')):.4f}; best step {summary['best_step']}; "
          f"workdir {args.workdir}")
    return 0


def pretraining_split(store: Store, config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
    """(train ids, validation ids): patients held out for validation, test cases excluded."""
    records = store.records
    if config.data.exclude:
        held = set(splits.read_splits(config.data.exclude, records).get("test", []))
        records = [r for r in records if r["id"] not in held]
    parts = splits.train_val_test(records, val=config.data.val_fraction, test=0.0, seed=config.seed)
    if not parts["train"]:
        raise PetctError(f"{config.store}: no scans left to pretrain on")
    return parts["train"], parts["val"]


def mae_loss_fn(mae_cfg: ml_collections.ConfigDict):
    block, ratio = tuple(mae_cfg.block), float(mae_cfg.ratio)
    per_channel, visible_weight = bool(mae_cfg.per_channel), float(mae_cfg.visible_weight)

    def loss_fn(model, batch, key, train):
        x = batch["image"]
        mask = block_mask(key, x.shape, block, ratio, per_channel)
        pred = model(x, mask, deterministic=not train)
        loss = reconstruction_loss(pred, x, mask, visible_weight)
        return loss, {"masked_fraction": mask.mean()}

    return loss_fn


def make_preview(config: ml_collections.ConfigDict):
    names = tuple(c.upper() for c in config.data.channels)

    def preview(model, batch, path):
        x = np.asarray(batch["image"][:1])
        mask = block_mask(jax.random.key(0), x.shape, tuple(config.mae.block), config.mae.ratio,
                          config.mae.per_channel)
        recon = np.asarray(model(x, mask))
        save_reconstruction_preview(path, x[0], np.asarray(mask[0]), recon[0], names,
                                    title=os.path.basename(path).removesuffix(".png"))

    return preview


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MaskedAutoencoder:
    channels = len(config.data.channels)
    backbone = build_backbone(config.model, channels, channels, rngs)
    return MaskedAutoencoder(backbone, channels, config.mae.imputation)


def batch_spec(config: ml_collections.ConfigDict) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch's shapes, known from the config alone (the dry run needs no store)."""
    shape = (config.batch_size, *config.data.patch, len(config.data.channels))
    return {"image": jax.ShapeDtypeStruct(shape, np.float32)}


def make_task(config: ml_collections.ConfigDict) -> loop.Task:
    if not config.store:
        raise PetctError("--config.store is not set: point it at a store made by `petct preprocess`")
    store = Store(config.store)
    train_ids, val_ids = pretraining_split(store, config)
    config_blocks.apply_epochs(config, len(train_ids), drop_last=True)  # the reference's DataLoader
    model = build_model(config, nnx.Rngs(config.seed))
    train_iter = make_patch_iterator(store, train_ids, config.data, seed=config.seed,
                                     batch_size=config.batch_size,
                                     num_workers=config.data.num_workers, task="mae")
    val_batches = []
    if val_ids and config.eval_batches:
        val_iter = make_patch_iterator(store, val_ids, config.data, seed=config.seed + 1,
                                       batch_size=config.batch_size, num_workers=0, task="mae",
                                       normalizer=train_iter.normalizer)
        val_batches = list(itertools.islice(val_iter, config.eval_batches))
    return loop.Task(model=model, loss_fn=mae_loss_fn(config.mae), train_iter=train_iter,
                     val_batches=val_batches,
                     voxels_per_batch=int(config.batch_size * np.prod(config.data.patch)),
                     preview=make_preview(config))


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict:
    return loop.train(config, workdir, make_task(config))
