"""`petct evaluate` end to end on a few tiny NIfTI masks written here."""

from __future__ import annotations

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from petct_jax.cli import main
from petct_jax.downstream import evaluate

SHAPE = (16, 14, 12)
ZOOMS = (2.0, 2.5, 3.0)  # per array axis; one voxel = 15 mm³ = 0.015 mL
VOXEL_ML = 0.015


def _affine(zooms=ZOOMS, shift=(0.0, 0.0, 0.0)):
    # LPS-like axes (x, y flipped), as many scanners write them.
    a = np.diag([-zooms[0], -zooms[1], zooms[2], 1.0])
    a[:3, 3] = np.array([10.0, 20.0, -30.0]) + np.asarray(shift)
    return a


def _save(path, data, affine=None, dtype=np.uint8):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=dtype), _affine() if affine is None else affine), path)


def _box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    pred, gt, pet = root / "pred", root / "gt", root / "pet"
    # a: two lesions, one hit partially (4 of 8 voxels), one missed (3 voxels); one FP blob (5 voxels)
    ga = _box((2, 2, 2), (4, 4, 4)) | _box((10, 10, 5), (11, 11, 8))
    pa = _box((3, 2, 2), (5, 4, 5)) | _box((12, 2, 6), (13, 3, 11))
    # b: tumour-free with a 2-voxel false positive; c: perfect; d: label only; e: prediction only
    gb, pb = np.zeros(SHAPE, bool), _box((6, 6, 6), (7, 7, 8))
    gc = _box((5, 5, 5), (9, 8, 7))
    for name, p, g in (("a", pa, ga), ("b", pb, gb), ("c", gc, gc)):
        _save(str(pred / f"case_{name}.nii.gz"), p)
        _save(str(gt / f"case_{name}.nii.gz"), g * 1, dtype=np.int16)
        suv = np.random.default_rng(0).random(SHAPE).astype(np.float32) + 4 * g
        _save(str(pet / f"case_{name}_0001.nii.gz"), suv, dtype=np.float32)
    _save(str(gt / "case_d.nii.gz"), gc)
    _save(str(pred / "case_e.nii.gz"), gc)
    (pred / "plans.json").write_text("{}")  # nnU-Net output folders hold such files
    return root


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_end_to_end(cohort, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--pred", str(cohort / "pred"), "--gt", str(cohort / "gt"), "--out", str(out),
               "--pet", str(cohort / "pet"), "--no-progress"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "1 predictions without ground truth: case_e" in captured.err
    assert "1 ground-truth cases without prediction: case_d" in captured.err
    assert "Dice" in captured.out and "FPV mL" in captured.out
    table = {line.split("  ")[0]: line.split() for line in captured.out.splitlines()}
    assert table["FNV mL, autoPET I"][-1] == "3"  # n: all scans, 1 tumour-free
    assert table["FNV mL, autoPET III/IV"][-1] == "2"  # n: the lesion scans
    assert float(table["FNV mL, autoPET III/IV"][-4]) == pytest.approx(3 * VOXEL_ML / 2, abs=1e-3)

    rows = _read_csv(out / "cases.csv")
    required = {"case", "dice", "fpv_ml", "fnv_ml", "hd95_mm", "gt_ml", "pred_ml", "n_gt_lesions",
                "n_pred_lesions", "tp_lesions", "precision", "recall", "f1", "tumour_free"}
    assert required <= set(rows[0])
    by = {r["case"]: r for r in rows}
    assert sorted(by) == ["case_a", "case_b", "case_c"]
    a, b, c = by["case_a"], by["case_b"], by["case_c"]
    assert float(a["dice"]) == pytest.approx(2 * 4 / (17 + 11))
    assert float(a["fpv_ml"]) == pytest.approx(5 * VOXEL_ML)
    assert float(a["fnv_ml"]) == pytest.approx(3 * VOXEL_ML)
    assert (a["n_gt_lesions"], a["n_pred_lesions"], a["tp_lesions"]) == ("2", "2", "1")
    assert float(a["hd95_mm"]) > 0
    assert b["dice"] == "" and b["hd95_mm"] == "" and b["tumour_free"] == "1"
    assert float(b["fpv_ml"]) == pytest.approx(2 * VOXEL_ML) and float(b["fnv_ml"]) == 0
    assert float(c["dice"]) == 1.0 and float(c["hd95_mm"]) == 0.0
    assert float(c["gt_ml"]) == pytest.approx(4 * 3 * 2 * VOXEL_ML)

    s = json.loads((out / "summary.json").read_text())
    for key in ("mean_dice", "median_dice", "std_dice", "mean_fpv_ml", "median_fpv_ml", "std_fpv_ml",
                "mean_fnv_ml", "median_fnv_ml", "std_fnv_ml", "n_cases", "n_tumour_free",
                "mean_fpv_ml_tumour_free", "lesion_precision", "lesion_recall", "lesion_f1"):
        assert key in s, key
    assert s["n_cases"] == 3 and s["n_tumour_free"] == 1
    assert s["mean_dice"] == pytest.approx((8 / 28 + 1.0) / 2)
    assert s["mean_fpv_ml"] == pytest.approx((5 + 2) * VOXEL_ML / 3)
    assert s["mean_fnv_ml"] == pytest.approx(3 * VOXEL_ML / 3)  # autoPET I: over all 3 scans
    assert s["mean_fnv_ml_autopet3"] == pytest.approx(3 * VOXEL_ML / 2)  # III/IV: the 2 lesion scans
    assert set(s["aggregation"]) == {"fnv_ml", "fnv_ml_autopet3"}
    assert s["mean_fpv_ml_tumour_free"] == pytest.approx(2 * VOXEL_ML)
    # lesions: GT a:2 + c:1 = 3, detected 2; predicted a:2 + b:1 + c:1 = 4, 2 touch GT
    assert s["lesion_recall"] == pytest.approx(2 / 3) and s["lesion_precision"] == pytest.approx(0.5)
    assert s["unmatched_pred"] == ["case_e"] and s["unmatched_gt"] == ["case_d"]

    for png in ("distributions.png", "dice_per_case.png", "overlays/case_a.png", "overlays/case_c.png"):
        assert (out / png).stat().st_size > 1000, png
    assert not (out / "overlays" / "case_b.png").exists()  # tumour-free scans get no overlay


def test_nnunet_labels_folder_and_workers(cohort, tmp_path):
    ds = tmp_path / "Dataset001_X"
    os.makedirs(ds / "labelsTr")
    for name in ("case_a", "case_b", "case_c"):
        os.symlink(cohort / "gt" / f"{name}.nii.gz", ds / "labelsTr" / f"{name}.nii.gz")
    pairs, only_pred, only_gt = evaluate.find_pairs(str(cohort / "pred"), str(ds))
    assert [c for c, _, _ in pairs] == ["case_a", "case_b", "case_c"]
    assert only_pred == ["case_e"] and only_gt == []
    serial = evaluate.evaluate_folder(pairs, workers=1, progress=False)
    parallel = evaluate.evaluate_folder(pairs, workers=2, progress=False)
    assert serial == parallel
    out = tmp_path / "r"
    assert main(["evaluate", "--pred", str(cohort / "pred"), "--gt", str(ds), "--out", str(out),
                 "--overlays", "0", "--no-progress"]) == 0
    assert len(_read_csv(out / "cases.csv")) == 3
    assert not (out / "overlays").exists()


def test_strict_unmatched_is_an_error(cohort, tmp_path, capsys):
    rc = main(["evaluate", "--pred", str(cohort / "pred"), "--gt", str(cohort / "gt"),
               "--out", str(tmp_path / "r"), "--strict", "--no-progress"])
    assert rc == 2
    assert "--strict" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["shape", "affine"])
def test_mismatched_grid_is_an_error(tmp_path, capsys, kind):
    g = _box((2, 2, 2), (5, 5, 5))
    _save(str(tmp_path / "gt" / "x1.nii.gz"), g)
    if kind == "shape":
        _save(str(tmp_path / "pred" / "x1.nii.gz"), np.zeros((16, 14, 13)))
    else:  # same shape, shifted by half a voxel: must not be silently accepted
        _save(str(tmp_path / "pred" / "x1.nii.gz"), g, affine=_affine(shift=(1.0, 0, 0)))
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
               "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "x1" in err[0] and str(tmp_path / "pred" / "x1.nii.gz") in err[0]
    assert ("shape" in err[0]) if kind == "shape" else ("affine" in err[0])
    assert not (tmp_path / "r" / "cases.csv").exists()


def test_no_common_case_is_an_error(tmp_path, capsys):
    _save(str(tmp_path / "gt" / "a.nii.gz"), np.zeros(SHAPE))
    _save(str(tmp_path / "pred" / "b.nii.gz"), np.zeros(SHAPE))
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"),
               "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 2 and "no case is in both" in capsys.readouterr().err
