"""`petct study`: the plan of every variant (cells, configs, dependencies, hours) without a
store or JAX, the demo variant equal to the demo's grid, `--cells`, resuming (finished cells
skipped, through an injected runner: nothing trains here), and the collected table and
report from fabricated cell summaries (mean ± std over seeds)."""

import contextlib
import csv
import io
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from petct_jax import cli
from petct_jax import study as study_lib
from petct_jax.config import resolve
from petct_jax.errors import PetctError

STUDY = os.path.join(REPO, "configs/study.py")


def study_config(variant, *overrides, store="/no/such/store", split="/no/such/split.csv"):
    return resolve(f"{STUDY}:{variant}", [f"store={store}", f"split={split}", *overrides])


def run_cli(*argv) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(list(argv))
    return rc, buf.getvalue()


# ---------------------------------------------------------------------------
# The plan and the dry run.

def test_dry_run_of_the_full_scale_grid_prints_every_cell_without_store_or_jax(tmp_path):
    workdir = tmp_path / "W"
    code = ("import sys; from petct_jax import cli; "
            "rc = cli.main(sys.argv[1:]); print('JAX_IMPORTED', 'jax' in sys.modules); sys.exit(rc)")
    out = subprocess.run(
        [sys.executable, "-c", code, "study", "--config", f"{STUDY}:autopet", "--workdir", str(workdir),
         "--dry-run", "--config.store=/no/such/store", "--config.split=/no/such/split.csv"],
        capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    rows = re.findall(r"^(\d+)\s+(plain_unet/\S+)\s+(pretrain|finetune|probe)\s.*\s(\d+\.\d\d)\s+new$",
                      out.stdout, re.M)
    # 3 MAE + 3 fractions x 2 inits x 3 seeds + 2 probes (k=5)
    assert len(rows) == 3 + 3 * 2 * 3 + 2 == 23
    names = [r[1] for r in rows]
    assert names[:3] == ["plain_unet/mae_joint", "plain_unet/mae_pet", "plain_unet/mae_ct"]
    assert "plain_unet/seg_mae_frac30_s2" in names and names[-1] == "plain_unet/probe_separate_k5"
    assert all(float(r[3]) > 0 for r in rows)
    total = re.search(r"about ([\d.]+) H100-hours", out.stdout)
    assert total and abs(float(total.group(1)) - sum(float(r[3]) for r in rows)) < 0.2
    assert "Estimate, not a measurement" in out.stdout
    assert "data.exclude=/no/such/split.csv" in out.stdout  # pretraining never sees the test scans
    assert "JAX_IMPORTED False" in out.stdout
    assert not workdir.exists()


@pytest.mark.parametrize("variant,backbones,seeds", [
    ("autopet,swin_base", ["swin_base"], 3),
    ("autopet,plain_unet,swin_large,resenc_l,seeds5", ["plain_unet", "swin_large", "resenc_l"], 5),
    ("autopet,swin_small,seeds1", ["swin_small"], 1),
])
def test_full_scale_variants_plan_all_cells_with_dependencies(tmp_path, variant, backbones, seeds):
    config = study_config(variant)
    cells = study_lib.plan(config, str(tmp_path))
    assert len(cells) == len(backbones) * (3 + 3 * 2 * seeds + 2)
    by_name = {c.name: c for c in cells}
    for bb in backbones:
        mae = by_name[f"{bb}/mae_joint"]
        assert mae.config.task == "mae" and mae.config.data.channels == ("pet", "ct")
        assert mae.config.data.exclude == "/no/such/split.csv" and mae.config.total_steps == 62_500
        assert by_name[f"{bb}/mae_pet"].config.data.channels == ("pet",)
        seg = by_name[f"{bb}/seg_mae_frac10_s0"]
        assert seg.config.init == mae.workdir and seg.depends == (f"{bb}/mae_joint",)
        assert seg.config.data.label_fraction == 0.1 and seg.config.data.split == "/no/such/split.csv"
        # "epochs": the reference's 100 epochs over the labelled scans: 10% -> 1,750 steps
        assert seg.config.total_steps == 1_750 and seg.config.eval_every == 50
        scratch = by_name[f"{bb}/seg_scratch_frac100_s{seeds - 1}"]
        assert scratch.config.total_steps == 17_500 and scratch.config.init == "scratch"
        assert scratch.depends == () and scratch.config.seed == scratch.config.data.label_seed == seeds - 1
        sep = by_name[f"{bb}/probe_separate_k5"]
        assert (sep.config.init_pet, sep.config.init_ct) == (by_name[f"{bb}/mae_pet"].workdir,
                                                             by_name[f"{bb}/mae_ct"].workdir)
        assert sep.depends == (f"{bb}/mae_pet", f"{bb}/mae_ct") and sep.config.k == 5
        assert len(sep.config.seeds) == seeds
        if bb.startswith("swin"):
            assert mae.config.model.name == "swin_unetr" and mae.config.optim.lr == 1e-4
    order = {c.name: i for i, c in enumerate(cells)}  # every cell after the cells it needs
    assert all(order[d] < order[c.name] for c in cells for d in c.depends)
    assert len({c.workdir for c in cells}) == len(cells)
    assert all(study_lib.estimate(c, config.estimate)["hours"] > 0 for c in cells)


def test_each_cell_is_a_plain_command_with_the_same_config(tmp_path):
    """The command a cell records (cell.json, study.json) resolves to the cell's config, so
    `petct pretrain|finetune|probe` can run (or continue) any cell by hand."""
    import shlex

    from petct_jax.config import split_overrides

    for cell in study_lib.plan(study_config("demo,quick"), str(tmp_path)):
        argv = shlex.split(cell.command())
        assert argv[:2] == ["petct", cell.kind]
        rest, overrides = split_overrides(argv[2:])
        spec, workdir = rest[rest.index("--config") + 1], rest[rest.index("--workdir") + 1]
        assert workdir == cell.workdir
        assert resolve(os.path.join(REPO, spec), overrides).to_dict() == cell.config.to_dict(), cell.name


def test_estimate_follows_its_stated_basis(tmp_path):
    config = study_config("autopet")
    cells = {c.name: c for c in study_lib.plan(config, str(tmp_path))}
    mae = study_lib.estimate(cells["plain_unet/mae_joint"], config.estimate)
    rate = 0.30 * 989e12
    flop = 0.695e12  # forward, one 96x128x128 patch
    train = 62_500 * 16 * 3 * flop
    val = (62 + 1) * 16 * 16 * flop  # every 1,000 steps and at the last, 16 batches of 16
    assert math.isclose(mae["hours"], (train + val) / rate / 3600, rel_tol=1e-9)
    assert math.isclose(mae["ms_per_step"], 1e3 * 16 * 3 * flop / rate, rel_tol=1e-9)
    assert study_lib.sliding_windows((326, 160, 260), (96, 128, 128), 0.5) == 6 * 2 * 4
    sep = study_lib.estimate(cells["plain_unet/probe_separate_k5"], config.estimate)
    joint = study_lib.estimate(cells["plain_unet/probe_joint_k5"], config.estimate)
    assert math.isclose(sep["hours"], 2 * joint["hours"]) and sep["train_steps"] == 3 * 2_000


def test_forward_flop_constants_match_xla_cost_analysis():
    for token in ("plain_unet", "swin_small", "tiny"):
        assert math.isclose(study_lib.forward_tflop(token), study_lib.FORWARD_TFLOP[token], rel_tol=0.01)


def test_config_errors_name_the_setting(tmp_path):
    with pytest.raises(PetctError, match="no variant"):
        resolve(f"{STUDY}:autopet,nonsense")
    with pytest.raises(PetctError, match="mae.modalities"):
        study_lib.plan(study_config("autopet", "mae.modalities=('pet','ct')"), str(tmp_path))
    with pytest.raises(PetctError, match="store is not set"):
        study_lib.study(resolve(f"{STUDY}:autopet"), str(tmp_path), runner=lambda c: None)
    with pytest.raises(PetctError, match="split is not set"):
        study_lib.study(resolve(f"{STUDY}:autopet", ["store=/s"]), str(tmp_path), runner=lambda c: None)
    with pytest.raises(PetctError, match="no such setting"):  # a cell override that does not exist
        study_lib.plan(study_config("autopet", "finetune.overrides=('optim.lrr=1',)"), str(tmp_path))


# ---------------------------------------------------------------------------
# The demo variant is the demo's grid.

def _old_demo_configs(workdir, store, split_path, sizes):
    """The runs `petct demo` made before it ran through `petct study` (its own loop, as it
    was): {old run name: resolved config}, init paths pointing at the same run names."""
    runs = os.path.join(workdir, "RUNS")
    widths = tuple(sizes["widths"])
    common = [f"model.overrides.n_stages={len(widths)}", f"model.overrides.features_per_stage={widths}",
              f"model.overrides.strides={(1,) + (2,) * (len(widths) - 1)}",
              f"data.patch={tuple(sizes['patch'])}", "data.num_workers=0",
              f"batch_size={sizes['batch_size']}", f"store={store}"]
    steps = lambda n: [f"total_steps={n}", f"ckpt.every_steps={max(n // 3, 1)}",
                       f"eval_every={max(n // 3, 1)}", f"preview_every={n}", f"log_every={max(n // 15, 1)}"]
    cfg = lambda name, variant, ov: resolve(os.path.join(REPO, f"configs/{name}.py:{variant}"), ov)
    out = {}
    for modality in ("joint", "pet", "ct"):
        out[f"mae_{modality}"] = cfg("pretrain", f"tiny,{modality}", common + steps(sizes["pretrain_steps"])
                                     + [f"data.exclude={split_path}", "mae.block=(4,4,4)"])
    for init in ("scratch", "mae"):
        for frac in ("frac10", "frac100"):
            init_value = "scratch" if init == "scratch" else os.path.join(runs, "mae_joint")
            out[f"seg_{init}_{frac}"] = cfg("finetune", f"tiny,{frac}", common + steps(sizes["finetune_steps"])
                                            + [f"data.split={split_path}", f"init={init_value}",
                                               f"loss.batch_dice={sizes['batch_dice']}"])
    for mode in ("joint", "separate"):
        inits = ([f"init={os.path.join(runs, 'mae_joint')}"] if mode == "joint" else
                 [f"init_pet={os.path.join(runs, 'mae_pet')}", f"init_ct={os.path.join(runs, 'mae_ct')}"])
        out[f"probe_{mode}"] = cfg("probe", f"tiny,{mode}", common + steps(sizes["probe_steps"]) + inits
                                   + [f"data.split={split_path}", f"k={sizes['k_shot']}",
                                      f"loss.batch_dice={sizes['batch_dice']}",
                                      f"seeds={tuple(sizes['probe_seeds'])}"])
    return out


@pytest.mark.parametrize("quick", [False, True])
def test_demo_variant_plans_exactly_the_demo_runs(tmp_path, quick):
    from petct_jax import demo

    sizes = demo.QUICK if quick else demo.DEMO
    workdir, store, split = str(tmp_path), str(tmp_path / "store"), str(tmp_path / "split.json")
    config = demo.study_config(store, split, sizes)
    variant = study_config("demo,quick" if quick else "demo", store=store, split=split)
    assert config.to_dict() == variant.to_dict()  # `petct study` with the demo variant = the demo
    cells = study_lib.plan(config, workdir)
    old = _old_demo_configs(workdir, store, split, sizes)
    # old run name -> cell (one seed: the old names had no seed suffix, probes no k)
    renamed = {re.sub(r"_s0$|_k\d+$", "", c.short): c for c in cells}
    assert sorted(renamed) == sorted(old) and len(cells) == 9
    runs_dir = os.path.join(workdir, "RUNS")
    for name, cell in renamed.items():
        got = cell.config.to_dict()
        for key in ("init", "init_pet", "init_ct"):  # the same runs, in their new place
            if got.get(key) and got[key] != "scratch":
                got[key] = os.path.join(runs_dir, os.path.basename(got[key]))
        assert got == old[name].to_dict(), name
        assert cell.workdir == os.path.join(workdir, "cells", "tiny", cell.short)


def test_demo_runs_its_study_and_skips_finished_cells(tmp_path, monkeypatch):
    """`petct demo` = data stages + study(demo variant) + report: the cells the study runs are
    the plan's, in order, once; a second demo trains nothing."""
    import petct_jax.phantoms.cohort as cohort
    import petct_jax.preprocessing.preprocess as prep
    from petct_jax import demo, demo_report

    calls, reports = [], []
    monkeypatch.setattr(cohort, "generate_cohort", lambda *a, **k: None)
    monkeypatch.setattr(prep, "preprocess", lambda *a, **k: None)
    monkeypatch.setattr(demo, "_make_split", lambda store, workdir, sizes: os.path.join(workdir, "split.json"))
    monkeypatch.setattr(study_lib, "enable_compile_cache", lambda default: None)
    monkeypatch.setattr(study_lib, "run_cell", FakeRunner(calls))
    monkeypatch.setattr(demo_report, "write_report",
                        lambda workdir, store, split, results, sizes, seconds: reports.append(results) or "r.md")
    workdir = str(tmp_path / "demo")
    demo.demo(workdir, sizes=demo.QUICK)
    planned = study_lib.plan(demo.study_config(os.path.join(workdir, "store"),
                                               os.path.join(workdir, "split.json"), demo.QUICK), workdir)
    assert calls == [c.name for c in planned]
    assert reports[0]["n_done"] == 9 and os.path.exists(os.path.join(workdir, "results.csv"))
    demo.demo(workdir, sizes=demo.QUICK)
    assert len(calls) == 9 and reports[1]["n_done"] == 9


# ---------------------------------------------------------------------------
# Running: fabricated cells, no training.

class FakeRunner:
    """Stands in for `run_cell`: records the cell and writes the files a finished cell of its
    kind has (`write_finished`)."""

    def __init__(self, calls, dice=None):
        self.calls, self.dice = calls, dice or (lambda cell: 0.5)

    def __call__(self, cell):
        self.calls.append(cell.name)
        write_finished(cell, self.dice)


def write_finished(cell, dice=lambda cell: 0.5):
    """summary.json as the commands write it: fine-tune test Dice `dice(cell)`; probe seed s
    Dice 0.2 + 0.01 s (joint) or 0.1 + 0.01 s (separated)."""
    os.makedirs(cell.workdir, exist_ok=True)
    total = int(cell.config.total_steps)
    if cell.kind == "pretrain":
        summary = {"task": "mae", "steps": total, "final_val": {"loss": 0.25}, "best_step": total,
                   "seconds": 1.0}
    elif cell.kind == "finetune":
        summary = {"task": "seg", "steps": total, "best_step": total, "seconds": 2.0,
                   "final_val": {"loss": 0.9, "dice": 0.4},
                   "test": {"n_cases": 4, "mean_dice": dice(cell), "std_dice": 0.2, "median_dice": dice(cell),
                            "mean_fpv_ml": 1.5, "mean_fnv_ml": 2.5, "mean_hd95_mm": 10.0, "lesion_f1": 0.6}}
    else:
        base = 0.2 if cell.mode == "joint" else 0.1
        per_seed = {}
        for s in cell.seeds:
            d = base + 0.01 * s
            per_seed[str(s)] = {"mean_dice": d, "median_dice": d, "mean_fpv_ml": 3.0, "mean_fnv_ml": 4.0,
                                "mean_hd95_mm": 20.0, "lesion_f1": 0.3, "val_dice": 0.2, "best_step": total}
            sub = os.path.join(cell.workdir, f"seed_{s}")
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, "summary.json"), "w") as f:
                json.dump({"task": "probe", "steps": total, "seconds": 1.0, "test": {"n_cases": 4}}, f)
        summary = {"task": "probe", "seeds": list(cell.seeds), "per_seed": per_seed, "stats": {}}
    with open(os.path.join(cell.workdir, "summary.json"), "w") as f:
        json.dump(summary, f)


SMALL = ("finetune.fractions=(10,100)", "seeds=(0,1)", "probe.seeds=(0,1,2)")


def small_config(*overrides):
    """One backbone, 2 fractions, 2 seeds: 3 MAE + 2 x 2 x 2 fine-tunes + 2 probes (3 seeds)."""
    return study_config("autopet,tiny", *SMALL, *overrides)


def test_finished_cells_are_skipped_and_unfinished_ones_run(tmp_path):
    config, workdir = small_config(), str(tmp_path)
    cells = {c.name: c for c in study_lib.plan(config, workdir)}
    assert len(cells) == 3 + 8 + 2
    write_finished(cells["tiny/mae_joint"])  # finished before
    write_finished(cells["tiny/seg_scratch_frac10_s1"])
    # unfinished: a fine-tune trained but not scored, an MAE run short of its steps
    partial = cells["tiny/seg_mae_frac100_s0"]
    os.makedirs(partial.workdir)
    with open(os.path.join(partial.workdir, "summary.json"), "w") as f:
        json.dump({"task": "seg", "steps": int(partial.config.total_steps)}, f)
    short = cells["tiny/mae_pet"]
    os.makedirs(os.path.join(short.workdir, "checkpoints", "100"))
    with open(os.path.join(short.workdir, "summary.json"), "w") as f:
        json.dump({"task": "mae", "steps": 100}, f)
    assert study_lib.cell_status(partial) == ("partial", "trained; test scores missing")
    assert study_lib.cell_status(short) == ("partial", "checkpoint at step 100 of 400")
    assert study_lib.cell_status(cells["tiny/mae_joint"]) == ("done", "")

    calls = []
    results = study_lib.study(config, workdir, runner=FakeRunner(calls), report=False)
    assert "tiny/mae_joint" not in calls and "tiny/seg_scratch_frac10_s1" not in calls
    assert "tiny/seg_mae_frac100_s0" in calls and "tiny/mae_pet" in calls
    assert len(calls) == len(cells) - 2 and results["n_done"] == len(cells)
    assert calls.index("tiny/mae_pet") < calls.index("tiny/probe_separate_k5")
    # what each cell was started with, and the study's plan
    record = json.load(open(os.path.join(partial.workdir, "cell.json")))
    assert record["overrides"] == list(partial.overrides) and record["depends"] == ["tiny/mae_joint"]
    assert len(json.load(open(os.path.join(workdir, "study.json")))["cells"]) == len(cells)

    again = []
    study_lib.study(config, workdir, runner=FakeRunner(again), report=False)
    assert again == []
    # more steps asked for: the MAE cells are no longer finished, they resume
    study_lib.study(small_config("mae.overrides=('total_steps=500',)"), workdir,
                    runner=FakeRunner(again), report=False)
    assert again == ["tiny/mae_joint", "tiny/mae_pet", "tiny/mae_ct"]


def test_cells_filter_selects_and_checks_dependencies(tmp_path):
    config, workdir = small_config(), str(tmp_path)
    cells = study_lib.plan(config, workdir)
    names = lambda spec: [c.name for c in study_lib.select(cells, spec)]
    assert names("tiny/mae_joint") == ["tiny/mae_joint"]
    assert names("mae_*") == ["tiny/mae_joint", "tiny/mae_pet", "tiny/mae_ct"]
    assert names(" seg_*_s1 , probe_joint_k5") == [
        "tiny/seg_scratch_frac10_s1", "tiny/seg_scratch_frac100_s1", "tiny/seg_mae_frac10_s1",
        "tiny/seg_mae_frac100_s1", "tiny/probe_joint_k5"]
    assert len(names("")) == len(cells) and len(names("tiny/*")) == len(cells)
    with pytest.raises(PetctError, match="names no cell"):
        names("seg_mae_frac50_s0")

    calls = []
    with pytest.raises(PetctError, match="needs tiny/mae_joint, not finished"):
        study_lib.study(config, workdir, cells="seg_mae_frac10_s0", runner=FakeRunner(calls), report=False)
    assert calls == []
    study_lib.study(config, workdir, cells="seg_scratch_frac10_s0,mae_joint", runner=FakeRunner(calls),
                    report=False)
    assert calls == ["tiny/mae_joint", "tiny/seg_scratch_frac10_s0"]  # plan order, not the filter's
    study_lib.study(config, workdir, cells="seg_mae_frac10_s0", runner=FakeRunner(calls), report=False)
    assert calls[-1] == "tiny/seg_mae_frac10_s0"
    with pytest.raises(PetctError, match="needs tiny/mae_pet, tiny/mae_ct"):
        study_lib.study(config, workdir, cells="probe_separate_k5", runner=FakeRunner(calls), report=False)

    # the dry run with --cells: only those, with the status of the cells on disk
    rc, text = run_cli("study", "--config", f"{STUDY}:autopet,tiny", "--workdir", workdir, "--dry-run",
                       "--cells", "mae_*", "--config.store=/s", "--config.split=/p.csv",
                       *(f"--config.{o}" for o in SMALL))
    assert rc == 0 and "3 of 13 cells (--cells)" in text
    assert re.search(r"tiny/mae_joint .* done$", text, re.M) and re.search(r"tiny/mae_pet .* new$", text, re.M)
    assert "seg_" not in text.split("H100-h")[1].split("total:")[0]


def test_collected_table_is_mean_and_std_over_seeds(tmp_path):
    config, workdir = small_config(), str(tmp_path)
    dice = {("scratch", 10): [0.30, 0.40], ("scratch", 100): [0.60, 0.70], ("mae", 10): [0.55, 0.75],
            ("mae", 100): [0.80, 0.70]}
    runner = FakeRunner([], dice=lambda c: dice[(c.init, c.fraction)][c.seed])
    cells = study_lib.plan(config, workdir)
    # one cell left unfinished: the table says so and averages what is there
    study_lib.study(config, workdir, runner=runner, report=False,
                    cells=[c.name for c in cells if c.name != "tiny/seg_scratch_frac100_s1"])
    results = study_lib.collect(cells, workdir)
    assert results["n_done"] == len(cells) - 1
    settings = {(e["backbone"], e["setting"]): e for e in results["settings"]}
    mae10 = settings[("tiny", "seg_mae_frac10")]
    assert mae10["seeds"] == [0, 1] and mae10["mean_dice"]["n"] == 2
    assert math.isclose(mae10["mean_dice"]["mean"], 0.65) and math.isclose(mae10["mean_dice"]["std"], 0.10)
    scr100 = settings[("tiny", "seg_scratch_frac100")]
    assert scr100["seeds"] == [0] and scr100["n_planned"] == 2 and scr100["mean_dice"]["mean"] == 0.6
    probe = settings[("tiny", "probe_joint_k5")]
    assert np.isclose(probe["mean_dice"]["mean"], np.mean([0.20, 0.21, 0.22]))
    assert np.isclose(probe["mean_dice"]["std"], np.std([0.20, 0.21, 0.22]))
    assert settings[("tiny", "mae_joint")]["val_loss"]["mean"] == 0.25

    path = study_lib.write_report(config, workdir, results)
    with open(os.path.join(workdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 + 8 + 2 * 3  # one row per cell and seed (probes: per seed)
    row = next(r for r in rows if r["cell"] == "tiny/seg_mae_frac10_s1")
    assert (row["status"], float(row["mean_dice"]), row["seed"]) == ("done", 0.75, "1")
    assert next(r for r in rows if r["cell"] == "tiny/seg_scratch_frac100_s1")["status"] == "new"
    report = open(path).read()
    assert "| tiny | MAE joint | 10% | 2 | 0.650 ± 0.100 |" in report
    assert "| tiny | scratch | 100% | 1 of 2 | 0.600 |" in report
    assert "MAE joint at 10% reaches Dice 0.650 ± 0.100, within one standard deviation over seeds of" in report
    assert "joint 0.210 ± 0.008, above separated 0.110 ± 0.008" in report
    assert "`tiny/seg_scratch_frac100_s1`: new" in report
    for name in ("label_efficiency.png", "dice_per_setting.png", "learning_curves.png"):
        assert os.path.getsize(os.path.join(workdir, "figures", name)) > 1000


def test_report_only_through_the_cli(tmp_path):
    workdir = str(tmp_path)
    for cell in study_lib.plan(small_config(), workdir):
        write_finished(cell)
    rc, text = run_cli("study", "--config", f"{STUDY}:autopet,tiny", "--workdir", workdir, "--report-only",
                       "--config.store=/no/such/store", "--config.split=/no/such/split.csv",
                       *(f"--config.{o}" for o in SMALL))
    assert rc == 0 and "13/13 cells finished" in text
    report = open(os.path.join(workdir, "report.md")).read()
    assert "13 of 13 cells finished" in report and "## Not finished" not in report
