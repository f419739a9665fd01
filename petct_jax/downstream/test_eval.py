"""Scoring a trained segmentation model on whole held-out scans (the test split).

    summary = evaluate_on_cases(model, store, test_ids, config, out_dir="W/test",
                                normalizer=train_iter.normalizer)

Every case is read whole and normalized as in training (`make_case_iterator` with the
training normalizer), predicted by sliding windows of the training patch size
(overlap `eval.overlap`, Gaussian or constant weights by `eval.window_weights`, optional
mirroring: `inference.py`), turned into a
mask by argmax over the two classes, and scored with the AutoPET metrics at the store's
voxel spacing. Writes `cases.csv` (one row per case) and `summary.json`
(`metrics.summarize`), plus overlays of the first `eval.overlays` lesion cases.

`evaluate_run` first loads the run's checkpoint into the model by one rule, recorded as
`checkpoint_rule` in `W/test/summary.json`: the one with the lowest validation loss when
the run validated ("lowest validation loss"), else the final one ("final checkpoint (no
validation split)": e.g. the reference's split CSVs, whose held-out scans are all test
scans). The test split never picks a checkpoint (the reference picks its best test Dice).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

import jax
import ml_collections
import numpy as np
from flax import nnx

from petct_jax.data.patches import PatchConfig
from petct_jax.downstream import metrics
from petct_jax.downstream.common import NUM_CLASSES
from petct_jax.errors import PetctError

WINDOW_WEIGHTS = ("gaussian", "constant")  # eval.window_weights
RULE_BEST = "lowest validation loss"
RULE_FINAL = "final checkpoint (no validation split)"


def _eval_cfg(config: ml_collections.ConfigDict) -> dict:
    e = config.get("eval") or ml_collections.ConfigDict()
    weights = str(e.get("window_weights", "gaussian"))
    if weights not in WINDOW_WEIGHTS:
        raise PetctError(f"eval.window_weights={weights!r}: choose one of {list(WINDOW_WEIGHTS)}")
    return {"overlap": float(e.get("overlap", 0.5)), "batch_windows": int(e.get("batch_windows", 2)),
            "mirror": bool(e.get("mirror", False)), "overlays": int(e.get("overlays", 2)),
            "window_weights": weights}


def evaluate_on_cases(model: nnx.Module, store: Any, ids: Iterable[str], config: ml_collections.ConfigDict,
                      *, out_dir: str | None = None, normalizer: Any = None,
                      progress: bool = False) -> dict:
    """AutoPET metrics of `model` over the scans `ids` (see the module doc): the summary dict
    of `metrics.summarize` ({"n_cases": 0} without cases). `normalizer`: the training
    iterator's (required for `data.normalization="nnunet"`)."""
    from petct_jax.data import make_case_iterator
    from petct_jax.data.normalize import make_normalizer
    from petct_jax.data.source import open_store
    from petct_jax.downstream.evaluate import write_csv
    from petct_jax.downstream.common import logits_fn
    from petct_jax.downstream.inference import sliding_window_predict
    from petct_jax.downstream.preview import save_segmentation_preview

    store = open_store(store)
    ids = list(ids)
    data_cfg = PatchConfig.from_config(config.data, "seg")
    if normalizer is None:
        if data_cfg.normalization != "zscore":
            raise PetctError(f"data.normalization={data_cfg.normalization!r} needs the training "
                             "normalizer to evaluate")
        normalizer = make_normalizer("zscore")
    e = _eval_cfg(config)
    rows: list[dict] = []
    if ids:
        predict = logits_fn(model)
        overlays = 0
        for case in make_case_iterator(store, ids, data_cfg, task="seg", normalizer=normalizer):
            logits = sliding_window_predict(predict, case["image"], data_cfg.patch,
                                            num_classes=NUM_CLASSES, overlap=e["overlap"],
                                            batch_windows=e["batch_windows"], mirror=e["mirror"],
                                            use_gaussian=e["window_weights"] == "gaussian",
                                            progress=progress)
            pred = logits.argmax(-1).astype(np.uint8)
            spacing = store.record(case["case"])["spacing_zyx"]
            row = {"case": str(case["case"]), **metrics.evaluate_arrays(pred, case["label"], spacing)}
            rows.append(row)
            if out_dir and overlays < e["overlays"] and not row["tumour_free"] and jax.process_index() == 0:
                overlays += 1
                save_segmentation_preview(
                    os.path.join(out_dir, "overlays", f"{row['case']}.png"), case["image"],
                    case["label"], pred, data_cfg.channels,
                    title=f"{row['case'][:40]} Dice {row['dice']:.3f}")
    summary = metrics.summarize(rows) if rows else {"n_cases": 0}
    if out_dir and jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_csv(os.path.join(out_dir, "cases.csv"), rows)
        with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary


def load_best(model: nnx.Module, workdir: str, which: str | int = "best") -> int:
    """Load the run's checkpoint (`best` = lowest validation loss) into `model`; its step."""
    from petct_jax.downstream.weights import pure_params
    from petct_jax.train import restore

    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure_params(model))
    _, params, step = restore.load_params(workdir, which, target=target)
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return step


def checkpoint_rule(workdir: str) -> tuple[str, str]:
    """(which checkpoint to score, the rule's name): "best" when a checkpoint of `workdir`
    recorded a validation loss, else "latest" (the final step of a finished run)."""
    from petct_jax.train.checkpoint import read_only_manager

    if read_only_manager(workdir).best_step() is not None:
        return "best", RULE_BEST
    return "latest", RULE_FINAL


def evaluate_run(model: nnx.Module, workdir: str, store: Any, ids: Iterable[str],
                 config: ml_collections.ConfigDict, *, normalizer: Any = None) -> dict:
    """The checkpoint of `workdir` chosen by `checkpoint_rule` on the scans `ids`, written to
    `W/test/`. A finished evaluation of the same checkpoint with the same settings is reused."""
    out_dir = os.path.join(workdir, "test")
    which, rule = checkpoint_rule(workdir)
    step = load_best(model, workdir, which)
    ids = sorted(ids)
    key = {"checkpoint_step": step, "checkpoint_rule": rule, "cases": ids,
           "settings": _eval_cfg(config)}
    done = os.path.join(out_dir, "summary.json")
    if os.path.exists(done):
        with open(done, encoding="utf-8") as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in key.items()):
            return old
    summary = evaluate_on_cases(model, store, ids, config, out_dir=out_dir, normalizer=normalizer)
    summary.update(key)
    if jax.process_index() == 0:
        with open(done, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return summary
