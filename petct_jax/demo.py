"""`petct demo`: the paper's pipeline end to end on a synthetic cohort, on a laptop CPU.

    petct demo --workdir runs/demo

Stages, each resumable (re-running the command picks up where it stopped):
  1. phantoms    24 small synthetic whole-body FDG PET/CT studies (AutoPET layout)
  2. preprocess  harmonized into a store (at a coarser grid than the paper's, see DEMO)
  3. split       patient-level train / validation / test (W/split.json)
  4. pretrain    MAE: joint PET+CT, PET-only and CT-only (the separated baseline)
  5. finetune    from scratch and from the joint MAE, with 10% and 100% of the labels
  6. probe       5-shot linear probing, joint features vs PET-only + CT-only features
  7. report      W/report.md with the test-split table and figures, W/results.csv

Stages 4-6 are `petct study` with `configs/study.py:demo` (`demo,quick` for --quick) on the
store and split of stages 2-3: the cells live in W/cells/tiny/<cell>/, and a finished cell is
skipped when the demo runs again (petct_jax/study.py).

Everything is a demonstration size: a 4-stage UNet of widths 8-64 (the paper's has 6
stages of 32-320), 16^3 patches on a 4 mm grid, a few hundred steps, a few test scans.
The numbers show the system working, not the paper's result; the report says so.
"""

from __future__ import annotations

import json
import os
import sys
import time

# The demonstration's sizes, in one place so the report can print them.
DEMO = {
    "cases": 24,
    "phantom_size": "small",
    "spacing_zyx": (4.0, 4.0, 4.0),
    "patch": (16, 16, 16),
    "batch_size": 4,
    "widths": (8, 16, 32, 64),
    "batch_dice": True,
    "pretrain_steps": 600,
    "finetune_steps": 800,
    "probe_steps": 400,
    "probe_seeds": (0, 1, 2),
    "k_shot": 5,
    "test_fraction": 0.25,
    "val_fraction": 0.15,
}
QUICK = dict(DEMO, cases=10, pretrain_steps=6, finetune_steps=6, probe_steps=4, probe_seeds=(0, 1),
             k_shot=2, patch=(16, 16, 16), batch_size=2, widths=(4, 8, 16))


def add_arguments(parser) -> None:
    parser.add_argument("--workdir", default="runs/demo", help="where everything goes (default %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a minute-long smoke run of every stage (tiny sizes; for tests)")


def run(args) -> int:
    report = demo(args.workdir, sizes=QUICK if args.quick else DEMO)
    print(f"demo: report at {report}")
    return 0


_START = time.perf_counter()


def _stage(n: int, text: str) -> None:
    elapsed = time.perf_counter() - _START
    print(f"\n[{n}/7] {text}  (at {elapsed / 60:.1f} min)", file=sys.stderr, flush=True)


def apply_sizes(config, sizes: dict) -> None:
    """Make a `configs/study.py` config the demo's grid for `sizes` (its `demo` variant calls
    this with DEMO, `demo,quick` with QUICK): the tiny UNet of `widths` on `patch` for one
    seed, MAE joint / PET / CT, fine-tuning from scratch and from the joint MAE at 10% and
    100% labels for the same number of steps, `k_shot`-shot probes over `probe_seeds`."""
    widths = tuple(sizes["widths"])
    steps = lambda n: (f"total_steps={n}", f"ckpt.every_steps={max(n // 3, 1)}",
                       f"eval_every={max(n // 3, 1)}", f"preview_every={n}",
                       f"log_every={max(n // 15, 1)}")
    config.backbones = ("tiny",)
    config.seeds = (0,)
    config.overrides = (f"model.overrides.n_stages={len(widths)}",
                        f"model.overrides.features_per_stage={widths}",
                        f"model.overrides.strides={(1,) + (2,) * (len(widths) - 1)}",
                        f"data.patch={tuple(sizes['patch'])}", "data.num_workers=0",
                        f"batch_size={sizes['batch_size']}")
    config.mae.modalities = ("joint", "pet", "ct")
    config.mae.overrides = (*steps(sizes["pretrain_steps"]), "mae.block=(4,4,4)")
    config.finetune.inits = ("scratch", "mae")
    config.finetune.fractions = (10, 100)
    config.finetune.schedule = "steps"
    # Batch Dice (nnU-Net's, one Dice over the whole batch) for every fine-tuning and probe run
    # alike: on 16^3 patches most samples hold no lesion, and a per-sample Dice then mostly
    # rewards predicting nothing (tests/test_finetune.py learns with it at this size).
    config.finetune.overrides = (*steps(sizes["finetune_steps"]),
                                 f"loss.batch_dice={bool(sizes['batch_dice'])}")
    config.probe.modes = ("joint", "separate")
    config.probe.shots = (sizes["k_shot"],)
    config.probe.seeds = tuple(sizes["probe_seeds"])
    config.probe.overrides = (*steps(sizes["probe_steps"]),
                              f"loss.batch_dice={bool(sizes['batch_dice'])}")
    config.estimate.test_scans = max(round(sizes["cases"] * sizes["test_fraction"]), 1)
    config.estimate.scan_shape = tuple(sizes["patch"])  # small phantoms at 4 mm: about one window


def study_config(store: str, split_path: str, sizes: dict = DEMO):
    """The `configs/study.py:demo` config (`demo,quick` for QUICK) for this store and split."""
    from petct_jax.config import packaged_config, resolve

    variant = "demo,quick" if sizes == QUICK else "demo"
    config = resolve(f"{packaged_config('study.py')}:{variant}",
                     [f"store={store}", f"split={split_path}"])
    apply_sizes(config, sizes)  # the same for DEMO and QUICK; other sizes for callers of demo()
    return config


_STAGES = {"pretrain": (4, "MAE pretraining: joint PET+CT, PET-only, CT-only"),
           "finetune": (5, "fine-tuning: scratch vs MAE-joint, 10% and 100% labels")}


def demo(workdir: str, sizes: dict = DEMO) -> str:
    from petct_jax.study import study
    from petct_jax.phantoms.cohort import generate_cohort
    from petct_jax.preprocessing.preprocess import preprocess

    started = time.perf_counter()
    os.makedirs(workdir, exist_ok=True)
    raw, store = os.path.join(workdir, "raw"), os.path.join(workdir, "store")

    _stage(1, f"phantoms: {sizes['cases']} synthetic studies -> {raw}")
    sidecar = os.path.join(raw, "phantoms.json")
    if not (os.path.exists(sidecar) and json.load(open(sidecar)).get("status") == "complete"):
        generate_cohort(raw, sizes["cases"], seed=0, size=sizes["phantom_size"], preview=True,
                        overwrite=True)
    else:
        print("  done before", file=sys.stderr)

    _stage(2, f"preprocess -> {store}")
    preprocess(raw, store, spacing_zyx=sizes["spacing_zyx"], workers=2)

    _stage(3, "patient-level split")
    split_path = _make_split(store, workdir, sizes)

    # Stages 4-6 are the cells of `petct study --config configs/study.py:demo` (petct_jax/study.py).
    stages = dict(_STAGES, probe=(6, f"{sizes['k_shot']}-shot linear probing: joint vs separated"))
    shown = set()

    def on_cell(cell, status):
        if cell.kind not in shown:
            shown.add(cell.kind)
            _stage(*stages[cell.kind])

    results = study(study_config(store, split_path, sizes), workdir, report=False, on_cell=on_cell)

    _stage(7, "report")
    from petct_jax.demo_report import write_report
    from petct_jax.study import write_results_csv
    write_results_csv(os.path.join(workdir, "results.csv"), results["rows"])
    path = write_report(workdir, store, split_path, results, sizes,
                        seconds=time.perf_counter() - started)
    print(f"  {path} ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return path


def _make_split(store: str, workdir: str, sizes: dict) -> str:
    """One patient-level split for every run: pretraining never sees the test scans."""
    from petct_jax.data import splits
    from petct_jax.store import Store

    path = os.path.join(workdir, "split.json")
    if not os.path.exists(path):
        records = [r for r in Store(store).records if r.get("has_label")]
        parts = splits.train_val_test(records, val=sizes["val_fraction"], test=sizes["test_fraction"], seed=0)
        splits.write_split_json(path, parts)
    parts = json.load(open(path))
    print("  " + ", ".join(f"{k} {len(v)}" for k, v in parts.items()), file=sys.stderr)
    return path
