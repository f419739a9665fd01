"""`petct probe`: k-shot linear probing of frozen pretrained features.

    petct probe --config configs/probe.py:tiny --workdir runs/probe \
        --config.store=runs/store --config.init=runs/mae
    petct probe --config configs/probe.py:tiny,separate --workdir runs/probe_sep \
        --config.store=runs/store --config.init_pet=runs/mae_pet --config.init_ct=runs/mae_ct

Definition (the paper describes linear probing, the reference code has none; this is ours):
every pretrained weight is frozen, and the only trained parameters are one 1x1x1
convolution (a per-voxel linear map, with bias) from the final decoder features
(`backbone.features(x)["decoder"]`, full resolution, the input of the network's own head)
to the two classes. With `feature="bottleneck"` the head reads the deepest features
instead and its logits are upsampled to the input size trilinearly (half-pixel centres).
The frozen networks run in inference mode (no drop-path) and their features pass through
`jax.lax.stop_gradient`, so no backward pass runs through them; the loop's `trainable`
filter also gives them zero updates (no weight decay either): they stay bit-identical.

Joint vs separated modalities: the joint model is one network pretrained on PET+CT
(`init`); the separated baseline is a PET-only and a CT-only network (`init_pet`,
`init_ct`), each fed its own channel, whose features are concatenated before the same
kind of head, trained on the same patches and labels.

k-shot: k patients with lesions from the training pool (one lesion scan each,
`splits.k_shot`), drawn per seed; each seed `s` of `config.seeds` is a normal, resumable
training run in `W/seed_<s>/` (its own split.json, checkpoints, test scores). The
checkpoint used per seed has the lowest validation loss (validation split, never test).
`W/summary.json` and `W/table.md` report the test metrics per seed and their mean and
standard deviation (population, ddof=0) over seeds.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from petct_jax import config as config_lib
from petct_jax.data import splits
from petct_jax.downstream import common, weights
from petct_jax.downstream.common import NUM_CLASSES
from petct_jax.errors import PetctError
from petct_jax.store import Store, read_info, store_preset
from petct_jax.train import loop
from petct_jax.train.backbone import build_backbone

FEATURES = ("decoder", "bottleneck")
# Test metrics aggregated over seeds (keys of metrics.summarize).
REPORTED = ("mean_dice", "median_dice", "mean_fpv_ml", "mean_fnv_ml", "mean_fnv_ml_autopet3",
            "mean_hd95_mm", "lesion_f1")


class LinearProbe(nnx.Module):
    """Frozen backbones -> concatenated features -> one trainable 1x1x1 conv (`head`).

    backbones: networks with `features(x) -> {"decoder", "bottleneck"}`; `inputs[i]` lists
    the input channels backbone i sees (e.g. [(0, 1)] joint, [(0,), (1,)] separated).
    `feature_channels`: the widths of the chosen features, summed for the head's input.
    """

    def __init__(self, backbones: Sequence[nnx.Module], inputs: Sequence[Sequence[int]],
                 feature_channels: Sequence[int], *, num_classes: int = NUM_CLASSES,
                 feature: str = "decoder", rngs: nnx.Rngs):
        if feature not in FEATURES:
            raise PetctError(f"feature={feature!r}: choose one of {FEATURES}")
        if len(backbones) != len(inputs) or len(backbones) != len(feature_channels):
            raise PetctError("LinearProbe: one input channel list and one width per backbone")
        self.backbones = nnx.List(list(backbones))
        self.inputs = tuple(tuple(int(c) for c in i) for i in inputs)
        self.feature = feature
        self.head = nnx.Conv(int(sum(feature_channels)), num_classes, (1, 1, 1), use_bias=True,
                             rngs=rngs)

    def features(self, x: jax.Array) -> jax.Array:
        """The head's input: frozen features, concatenated over backbones, float32."""
        feats = []
        for backbone, channels in zip(self.backbones, self.inputs):
            f = backbone.features(x[..., list(channels)], deterministic=True)[self.feature]
            feats.append(jax.lax.stop_gradient(f).astype(jnp.float32))
        shapes = {f.shape[1:4] for f in feats}
        if len(shapes) > 1:
            raise PetctError(f"LinearProbe: the backbones' {self.feature} features differ in size {shapes}")
        return jnp.concatenate(feats, axis=-1)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        logits = self.head(self.features(x))
        if logits.shape[1:4] != x.shape[1:4]:
            logits = jax.image.resize(logits, (*x.shape[:4], logits.shape[-1]), method="trilinear")
        return logits.astype(jnp.float32)


def is_head(path: tuple) -> bool:
    """The trainable filter: parameters under `head`."""
    return bool(path) and path[0] == "head"


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="configs/probe.py[:VARIANT]; then any --config.KEY=VALUE "
                             "(--config.init=MAE_RUN, or --config.init_pet / --config.init_ct)")
    parser.add_argument("--workdir", required=True, help="run directory (one sub-run per seed)")


def run(args) -> int:
    config = config_lib.resolve(args.config, args.config_overrides)
    summary = probe(config, args.workdir)
    print(f"probe: {summary['k']}-shot, seeds {summary['seeds']}, {summary['mode']} features "
          f"({summary['feature']}); workdir {args.workdir}")
    print(summary["table"])
    return 0


def _sources(config: ml_collections.ConfigDict) -> list[tuple[str, tuple[str, ...]]]:
    """[(source path, the channels it sees)] for the joint or the separated model."""
    if config.mode == "joint":
        if config.init_pet or config.init_ct:
            raise PetctError("mode 'joint' takes --config.init; --config.init_pet / init_ct belong "
                             "to the separated probe (variant token 'separate')")
        if not config.init:
            raise PetctError("--config.init is not set: an MAE run directory, a `petct convert` "
                             "directory, or 'scratch' (frozen random features)")
        return [(config.init, tuple(config.data.channels))]
    if config.mode == "separate":
        if config.init or not (config.init_pet and config.init_ct):
            raise PetctError("the separated-modality probe takes --config.init_pet and "
                             "--config.init_ct (and no --config.init)")
        return [(config.init_pet, ("pet",)), (config.init_ct, ("ct",))]
    raise PetctError(f"--config.mode={config.mode!r}: choose 'joint' or 'separate'")


def load_backbones(config: ml_collections.ConfigDict) -> tuple[list, list, list, list[dict]]:
    """(backbones, input channel indices, feature widths, reports), weights loaded."""
    data_channels = tuple(config.data.channels)
    backbones, inputs, widths, reports = [], [], [], []
    for path, wanted in _sources(config):
        if path == weights.SCRATCH:
            model = build_backbone(config.model, len(wanted), NUM_CLASSES, nnx.Rngs(config.model_seed))
            channels, report = wanted, {"source": "scratch", "kind": "random (frozen)"}
        else:
            model, source = weights.load_backbone(path, config.init_which)
            weights.check_preset(source, store_preset(read_info(str(config.store))),
                                 bool(config.get("allow_preset_mismatch", False)), str(config.store))
            channels = tuple(source.channels) if source.channels is not None else wanted
            if tuple(channels) != tuple(wanted):
                raise PetctError(f"{path}: pretrained on channels {tuple(channels)}, expected "
                                 f"{tuple(wanted)} here")
            n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(source.params))
            report = {"source": os.path.abspath(path), "kind": source.kind, "step": source.step,
                      "model": source.model_name, "frozen_parameters": n}
        missing = [c for c in channels if c not in data_channels]
        if missing:
            raise PetctError(f"{path}: needs channel(s) {missing}, not in data.channels={data_channels}")
        idx = tuple(data_channels.index(c) for c in channels)
        x = jax.ShapeDtypeStruct((1, *config.data.patch, len(idx)), jnp.float32)
        graphdef, state = nnx.split(model)
        shape = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).features(x)[config.feature],
                               state, x).shape
        backbones.append(model)
        inputs.append(idx)
        widths.append(int(shape[-1]))
        reports.append({**report, "channels": list(channels), "feature_shape": list(shape[1:])})
    return backbones, inputs, widths, reports


def seed_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    c = copy.deepcopy(config)
    c.seed = int(seed)
    c.seeds = (int(seed),)
    return c


def probe(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Every seed's run (train or resume, then the test split), and the aggregate summary:
    {"task": "probe", "mode", "feature", "k", "seeds", "backbones" (what was loaded),
    "head_in_channels", "per_seed" (test metrics, validation Dice, best step),
    "per_seed_test" (each seed's `metrics.summarize`), "stats" ({metric: {"mean", "std",
    "n"}} over seeds), "table" (markdown)}, also in `W/summary.json` and `W/table.md`."""
    from petct_jax.data import make_patch_iterator
    from petct_jax.downstream.test_eval import evaluate_run

    if not config.store:
        raise PetctError("--config.store is not set: point it at a store made by `petct preprocess`")
    if config.feature not in FEATURES:
        raise PetctError(f"--config.feature={config.feature!r}: choose one of {FEATURES}")
    if not config.seeds:
        raise PetctError("--config.seeds is empty")
    loop.prepare_workdir(workdir, config)  # W/config.json; refuses another task's workdir
    store = Store(config.store)
    parts = common.resolve_split(store, config.data)
    common.write_split(os.path.join(workdir, "split.json"), parts["train"], parts)
    backbones, inputs, widths, reports = load_backbones(config)
    pool = common.records_of(store, parts["train"])
    per_seed = {}
    for seed in config.seeds:
        sub = os.path.join(workdir, f"seed_{seed}")
        cfg = seed_config(config, seed)
        loop.prepare_workdir(sub, cfg)
        train_ids = splits.k_shot(pool, int(config.k), seed=int(seed), all_scans=bool(config.all_scans))
        split = common.write_split(os.path.join(sub, "split.json"), train_ids, parts)
        model = LinearProbe(backbones, inputs, widths, feature=config.feature, rngs=nnx.Rngs(int(seed)))
        train_iter = make_patch_iterator(store, train_ids, config.data, seed=int(seed),
                                         batch_size=config.batch_size,
                                         num_workers=config.data.num_workers, task="seg")
        task = loop.Task(model=model, loss_fn=common.make_loss_fn(config.loss), train_iter=train_iter,
                         val_batches=common.make_val_batches(store, split["val"], cfg,
                                                             train_iter.normalizer),
                         voxels_per_batch=int(config.batch_size * np.prod(config.data.patch)),
                         preview=common.make_preview(cfg), trainable=is_head)
        run_summary = loop.train(cfg, sub, task)
        test = None
        if config.eval.test and split["test"]:
            test = evaluate_run(model, sub, store, split["test"], cfg, normalizer=train_iter.normalizer)
        run_summary = common.finish_summary(sub, run_summary, test=test, train_cases=split["train"],
                                            head_in_channels=int(sum(widths)))
        per_seed[int(seed)] = run_summary
    return _aggregate(config, workdir, per_seed, reports, widths)


def _aggregate(config, workdir: str, per_seed: dict, reports: list[dict], widths: list[int]) -> dict:
    rows, tests = {}, {}
    for seed, s in per_seed.items():
        tests[str(seed)] = s.get("test")
        test = s.get("test") or {}
        val = s.get("final_val") or {}
        rows[seed] = {**{k: test.get(k) for k in REPORTED}, "val_dice": val.get("dice"),
                      "best_step": s.get("best_step")}
    keys = (*REPORTED, "val_dice")
    stats = {}
    for key in keys:
        values = np.array([r[key] for r in rows.values() if r[key] is not None], dtype=np.float64)
        stats[key] = {"mean": float(values.mean()) if values.size else None,
                      "std": float(values.std()) if values.size else None, "n": int(values.size)}
    table = _table(rows, stats, keys)
    summary = {"task": "probe", "workdir": workdir, "mode": config.mode, "feature": config.feature,
               "k": int(config.k), "seeds": [int(s) for s in config.seeds],
               "backbones": reports, "head_in_channels": int(sum(widths)),
               "per_seed": {str(k): v for k, v in rows.items()}, "per_seed_test": tests,
               "stats": stats, "table": table}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(workdir, "table.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
    return summary


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _table(rows: dict, stats: dict, keys: Sequence[str]) -> str:
    head = "| seed | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for seed, r in rows.items():
        lines.append(f"| {seed} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    lines.append("| mean ± std | " + " | ".join(
        "-" if stats[k]["mean"] is None else f"{stats[k]['mean']:.3f} ± {stats[k]['std']:.3f}"
        for k in keys) + " |")
    return "\n".join(lines)
