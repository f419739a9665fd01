"""The demo report's test table: FNV in both challenge aggregations, named as such."""

import json
import os
from types import SimpleNamespace

import pytest

from petct_jax import demo_report
from petct_jax.store import Store


def _cell(tmp_path, kind, short, **fields):
    base = dict(kind=kind, short=short, backbone="tiny", workdir=str(tmp_path / "cells" / short),
                modality=None, init=None, fraction=None, mode=None, seed=0)
    return SimpleNamespace(**{**base, **fields})


def test_demo_table_names_both_fnv_aggregations(phantom_store, tmp_path):
    records = Store(phantom_store).records
    split = {"train": [], "val": [], "test": sorted(r["id"] for r in records)}
    split_path = tmp_path / "split.json"
    split_path.write_text(json.dumps(split))
    test = {"mean_dice": 0.4, "std_dice": 0.1, "mean_fpv_ml": 1.0, "mean_fnv_ml": 2.0,
            "mean_fnv_ml_autopet3": 3.0}
    cells = {"mae": (_cell(tmp_path, "pretrain", "mae_joint", modality="joint"),
                     {"final_val": {"loss": 0.3}})}
    for init in ("scratch", "mae"):
        for frac in (10, 100):
            cells[f"{init}{frac}"] = (_cell(tmp_path, "finetune", f"seg_{init}_frac{frac}_s0", init=init,
                                            fraction=frac), {"test": test})
    stats = {k: {"mean": v, "std": 0.0, "n": 2} for k, v in test.items()}
    for mode in ("joint", "separate"):
        cells[mode] = (_cell(tmp_path, "probe", f"probe_{mode}_k5", mode=mode), {"stats": stats})
    results = {"cells": {c.short: {"cell": c, "summary": s} for c, s in cells.values()}}
    sizes = dict(cases=6, phantom_size="tiny", spacing_zyx=(3.0, 2.0, 2.0), widths=(4, 8), batch_size=2,
                 patch=(16, 16, 16), pretrain_steps=2, finetune_steps=2, probe_steps=2, k_shot=5)
    path = demo_report.write_report(str(tmp_path), phantom_store, str(split_path), results, sizes, 60.0)
    text = open(path, encoding="utf-8").read()
    assert "| setting | Dice | FPV mL | FNV mL, autoPET I | FNV mL, autoPET III/IV |" in text
    assert "| fine-tune: MAE joint, 10% labels | 0.400 ± 0.100 | 1.00 | 2.00 | 3.00 |" in text
    assert "| 5-shot probe: joint PET+CT MAE features | 0.400 ± 0.000 | 1.00 | 2.00 | 3.00 |" in text
    rows = json.load(open(os.path.join(tmp_path, "report.json")))["rows"]
    baseline = demo_report.threshold_baseline(phantom_store, split["test"])
    assert rows[0]["mean_fnv_ml"] == pytest.approx(baseline["mean_fnv_ml"])
    assert rows[0]["mean_fnv_ml_autopet3"] == pytest.approx(baseline["mean_fnv_ml_autopet3"])
    # on this cohort the two aggregations differ (2 of 6 scans are tumour-free)
    assert baseline["mean_fnv_ml_autopet3"] == pytest.approx(baseline["mean_fnv_ml"] * 6 / 4)
