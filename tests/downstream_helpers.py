"""Shared by tests/test_finetune.py and tests/test_probe.py: tiny MAE runs made once per
pytest process, a fixed split of the phantom store, and the tiny-network overrides."""

from __future__ import annotations

import json
import os

from conftest import REPO

# A 3-stage PlainConvUNet, widths 4-8, on 16^3 patches: what every downstream test trains.
TINY_UNET = ["model.overrides.n_stages=3", "model.overrides.features_per_stage=(4,8,8)",
             "model.overrides.strides=(1,2,2)"]
TINY_DATA = ["data.patch=(16,16,16)", "batch_size=2", "eval_batches=1"]

_MAE_RUNS: dict[tuple[str, str], str] = {}


def tiny_mae_run(store: str, root: str, modality: str = "joint") -> str:
    """Workdir of a 2-step MAE run (configs/pretrain.py:tiny,<modality> with TINY_UNET),
    made once per (store, modality). Seed 3 and no warmup, so its weights differ from
    any seed-0 initialisation a test compares against."""
    key = (store, modality)
    if key not in _MAE_RUNS:
        from petct_jax.config import resolve
        from petct_jax.mae.pretrain import pretrain

        workdir = os.path.join(root, f"mae_{modality}")
        config = resolve(os.path.join(REPO, f"configs/pretrain.py:tiny,{modality}"), [
            f"store={store}", "data.patch=(16,16,16)", "mae.block=(4,4,4)", "batch_size=2",
            "eval_batches=0", "data.zoom_prob=0.0", "total_steps=2", "ckpt.every_steps=2",
            "optim.warmup_steps=0", "seed=3", "preview_every=1000", *TINY_UNET])
        pretrain(config, workdir)
        _MAE_RUNS[key] = workdir
    return _MAE_RUNS[key]


def phantom_split(store: str, path: str) -> dict[str, list[str]]:
    """A fixed split of the 6-study phantom store (4 with lesions, 2 tumour-free):
    train = 2 lesion studies + 1 tumour-free, val = 1 lesion study, test = 1 lesion study +
    1 tumour-free. Written to `path` (JSON)."""
    from petct_jax.store import Store

    records = Store(store).records
    lesion = sorted(r["id"] for r in records if r["lesion_count"])
    free = sorted(r["id"] for r in records if not r["lesion_count"])
    assert len(lesion) == 4 and len(free) == 2, (lesion, free)
    split = {"train": sorted([lesion[0], lesion[3], free[0]]), "val": [lesion[2]],
             "test": sorted([lesion[1], free[1]])}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(split, f)
    return split
