"""`petct finetune`: lesion segmentation from an MAE run, converted weights, or scratch.

    petct finetune --config configs/finetune.py:tiny,frac10 --workdir runs/ft \
        --config.store=runs/store --config.init=runs/mae

Our recipe (docs/recipes.md; `finetune.py:paper` is the reference's executed one): the
backbone is built with 2 output classes; every parameter of the pretrained network (encoder
and decoder) is loaded, the output head is re-initialised unless `init_head`
(`weights.load_into`; what was loaded is written to `W/init.json`). Dice + CE loss
(`losses.py`), random patches with `data.foreground_fraction` on lesions and
`data.augment`, AdamW + cosine, optional deep supervision.

Data: the training pool is the train split (`common.resolve_split`), of which
`data.label_fraction` of the scans (whole patients) are used; the resolved split is in
`W/split.json`. A split file that already encodes a fraction (`splits.encoded_label_fraction`)
takes label_fraction 1. With `epochs` > 0, `total_steps` is that many epochs over the
labelled scans. The checkpoint scored is the one with the lowest validation loss on fixed
patches of the validation split, or the final one without a validation split
(`test_eval.checkpoint_rule`); it is scored on the whole scans of the test split
(`W/test/`, `test_eval.py`). Re-running the same command resumes, and reuses a finished
test evaluation.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import ml_collections
import numpy as np
from flax import nnx

from petct_jax import config as config_lib
from petct_jax import config_blocks
from petct_jax.data import splits
from petct_jax.downstream import common, weights
from petct_jax.downstream.common import NUM_CLASSES
from petct_jax.errors import PetctError
from petct_jax.store import Store, store_preset
from petct_jax.train import loop
from petct_jax.train.backbone import build_backbone


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="configs/finetune.py[:VARIANT]; then any --config.KEY=VALUE "
                             "(--config.init=MAE_RUN_DIR|CONVERTED_DIR|scratch)")
    parser.add_argument("--workdir", required=True, help="run directory")


def run(args) -> int:
    config = config_lib.resolve(args.config, args.config_overrides)
    summary = finetune(config, args.workdir)
    print(report(summary))
    return 0


def report(summary: dict) -> str:
    from petct_jax.downstream.evaluate import summary_table

    val = summary.get("final_val") or {}
    epochs = (f" ({summary['epochs']:.3g} epochs of {summary['split']['train']} labelled scans)"
              if "epochs" in summary else "")
    lines = [f"finetune: {summary['steps']} steps{epochs} in {summary['seconds']:.0f} s; validation loss "
             f"{val.get('loss', float('nan')):.4f}, Dice {val.get('dice', float('nan')):.3f}; "
             f"best step {summary['best_step']}; workdir {summary['workdir']}"]
    test = summary.get("test")
    if test and test.get("n_cases"):
        lines += [f"test split ({test['n_cases']} scans, checkpoint step {test.get('checkpoint_step')}: "
                  f"{test.get('checkpoint_rule')}):",
                  summary_table(test)]
    return "\n".join(lines)


def build_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
    model_cfg = config.model
    if config.loss.deep_supervision:
        if model_cfg.name == "swin_unetr":
            raise PetctError("loss.deep_supervision: SwinUNETR has a single output (use a CNN backbone)")
        model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
        model_cfg.overrides.deep_supervision = True
    return build_backbone(model_cfg, len(config.data.channels), NUM_CLASSES, rngs)


def initialise(model: nnx.Module, config: ml_collections.ConfigDict, data_preset: str) -> dict:
    """Load `config.init` into `model` (all but the head, unless `config.init_head`); the report.
    `data_preset`: the store's harmonization preset (weights of another are refused)."""
    if not config.init:
        raise PetctError("--config.init is not set: an MAE run directory, a `petct convert` "
                         "output directory, or 'scratch'")
    if config.init == weights.SCRATCH:
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(weights.pure_params(model)))
        return {"source": "scratch", "kind": "scratch", "loaded_arrays": 0, "loaded_parameters": 0,
                "random_parameters": n}
    source = weights.read_source(config.init, config.init_which)
    if source.channels is not None and tuple(source.channels) != tuple(config.data.channels):
        raise PetctError(f"{config.init}: pretrained on channels {tuple(source.channels)}, this run "
                         f"uses data.channels={tuple(config.data.channels)}")
    weights.check_preset(source, data_preset, bool(config.get("allow_preset_mismatch", False)),
                         str(config.store))
    return weights.load_into(model, source, config.model.name, head=bool(config.get("init_head", False)))


def select_train(store: Store, config: ml_collections.ConfigDict) -> tuple[list[str], dict]:
    """(labelled training scans, the split {"train": pool, "val", "test"})."""
    parts = common.resolve_split(store, config.data)
    pool = parts["train"]
    fraction = float(config.data.label_fraction)
    if fraction >= 1.0:
        return list(pool), parts
    if config.data.split:
        encoded = splits.encoded_label_fraction(config.data.split, parts)
        if encoded is not None:
            raise PetctError(
                f"data.split={config.data.split} already encodes a label fraction ({encoded:.0%}: "
                f"{len(pool)} training scans); data.label_fraction={fraction:g} would train on "
                f"{fraction:.0%} of those: set --config.data.label_fraction=1.0 to use the file's subset")
        if config.data.split.lower().endswith(".csv"):
            print(f"finetune: data.label_fraction={fraction:g} takes this project's own {fraction:.0%} "
                  f"of the {len(pool)} training scans of {config.data.split} (data.label_seed), not the "
                  "reference's subset: that is its *_10pct.csv / *_30pct.csv with label_fraction=1.0",
                  file=sys.stderr)
    return splits.label_fraction(common.records_of(store, pool), fraction,
                                 seed=config.data.label_seed), parts


def make_task(config: ml_collections.ConfigDict, workdir: str) -> tuple[loop.Task, dict]:
    """The loop's task and what the run uses: {"store", "split", "init"}."""
    from petct_jax.data import make_patch_iterator

    if not config.store:
        raise PetctError("--config.store is not set: point it at a store made by `petct preprocess`")
    store = Store(config.store)
    train_ids, parts = select_train(store, config)
    config_blocks.apply_epochs(config, len(train_ids), drop_last=False)  # MONAI's DataLoader
    split = common.write_split(os.path.join(workdir, "split.json"), train_ids, parts)
    model = build_model(config, nnx.Rngs(config.seed))
    init_path = os.path.join(workdir, "init.json")
    if common.resumable(workdir) and os.path.exists(init_path):
        with open(init_path, encoding="utf-8") as f:  # the checkpoint holds the weights
            init = json.load(f)
    else:
        init = initialise(model, config, store_preset(store.info))
        if jax.process_index() == 0:
            with open(init_path, "w", encoding="utf-8") as f:
                json.dump(init, f, indent=2)
    train_iter = make_patch_iterator(store, train_ids, config.data, seed=config.seed,
                                     batch_size=config.batch_size,
                                     num_workers=config.data.num_workers, task="seg")
    val_batches = common.make_val_batches(store, split["val"], config, train_iter.normalizer)
    task = loop.Task(model=model, loss_fn=common.make_loss_fn(config.loss), train_iter=train_iter,
                     val_batches=val_batches,
                     voxels_per_batch=int(config.batch_size * np.prod(config.data.patch)),
                     preview=common.make_preview(config))
    return task, {"store": store, "split": split, "init": init}


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Train (or resume), then score the best checkpoint on the test split.

    Returns the loop's summary plus "init" (what was loaded), "split" (scan counts) and
    "test" (`metrics.summarize` of the test scans, or None), also in `W/summary.json`.
    """
    loop.prepare_workdir(workdir, config)  # refuses another task's workdir before writing
    task, used = make_task(config, workdir)
    summary = loop.train(config, workdir, task)
    test = None
    if config.eval.test and used["split"]["test"]:
        from petct_jax.downstream.test_eval import evaluate_run
        test = evaluate_run(task.model, workdir, used["store"], used["split"]["test"], config,
                            normalizer=task.train_iter.normalizer)
    counts = {k: len(v) for k, v in used["split"].items()}
    epochs = summary["steps"] * config.batch_size / max(counts["train"], 1)  # passes over the labelled scans
    return common.finish_summary(workdir, summary, init=used["init"], split=counts, epochs=epochs,
                                 test=test)
