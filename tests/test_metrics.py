"""AutoPET metrics on hand-computed cases: Dice, FPV, FNV, HD95, lesion detection."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from petct_jax.downstream import metrics
from petct_jax.downstream.metrics import evaluate_arrays, hd95, summarize

SPACING = (3.0, 1.5, 0.8)  # anisotropic (z, y, x) mm: one voxel = 3.6 mm³ = 0.0036 mL
VOXEL_ML = 3.0 * 1.5 * 0.8 / 1000


def _empty(shape=(16, 16, 16)):
    return np.zeros(shape, bool)


def _box(shape, lo, hi):
    m = _empty(shape)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


def test_identical_masks():
    g = _box((16, 16, 16), (4, 4, 4), (8, 8, 8)) | _box((16, 16, 16), (10, 10, 10), (12, 12, 13))
    r = evaluate_arrays(g, g.copy(), SPACING)
    assert r["dice"] == 1.0
    assert r["fpv_ml"] == 0.0 and r["fnv_ml"] == 0.0
    assert r["hd95_mm"] == 0.0
    assert r["gt_ml"] == pytest.approx((64 + 12) * VOXEL_ML) == r["pred_ml"]
    counts = (r["n_gt_lesions"], r["n_pred_lesions"], r["tp_lesions"], r["fp_lesions"], r["fn_lesions"])
    assert counts == (2, 2, 2, 0, 0)
    assert r["precision"] == r["recall"] == r["f1"] == 1.0
    assert r["tumour_free"] is False


def test_disjoint_masks():
    p = _box((16, 16, 16), (1, 1, 1), (3, 3, 4))   # 12 voxels
    g = _box((16, 16, 16), (9, 9, 9), (14, 10, 10))  # 5 voxels
    r = evaluate_arrays(p, g, SPACING)
    assert r["dice"] == 0.0
    assert r["fpv_ml"] == pytest.approx(12 * VOXEL_ML)
    assert r["fnv_ml"] == pytest.approx(5 * VOXEL_ML)
    assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0
    assert r["hd95_mm"] > 0


def test_empty_prediction_on_lesion_scan():
    g = _box((16, 16, 16), (5, 5, 5), (7, 7, 7))
    r = evaluate_arrays(_empty(), g, SPACING)
    assert r["dice"] == 0.0
    assert r["fpv_ml"] == 0.0
    assert r["fnv_ml"] == pytest.approx(8 * VOXEL_ML)
    assert r["hd95_mm"] is None
    assert r["precision"] is None and r["recall"] == 0.0 and r["f1"] == 0.0
    assert (r["tp_lesions"], r["fn_lesions"]) == (0, 1)


def test_empty_ground_truth_with_prediction():
    p = _box((16, 16, 16), (5, 5, 5), (7, 7, 8))
    r = evaluate_arrays(p, _empty(), SPACING)
    assert r["dice"] is None and r["tumour_free"] is True
    assert r["fpv_ml"] == pytest.approx(12 * VOXEL_ML)
    assert r["fnv_ml"] == 0.0
    assert r["hd95_mm"] is None
    assert r["precision"] == 0.0 and r["recall"] is None and r["f1"] == 0.0


def test_both_empty():
    r = evaluate_arrays(_empty(), _empty(), SPACING)
    assert r["dice"] is None and r["hd95_mm"] is None
    assert r["fpv_ml"] == 0.0 and r["fnv_ml"] == 0.0 and r["gt_ml"] == 0.0
    assert r["precision"] is None and r["recall"] is None and r["f1"] is None
    assert r["tumour_free"] is True and r["n_gt_lesions"] == 0


def test_partial_overlap_one_of_two_lesions_hit():
    shape = (12, 14, 16)
    lesion1 = _box(shape, (2, 2, 2), (4, 4, 4))        # 8 voxels
    lesion2 = _box(shape, (8, 10, 10), (9, 11, 13))    # 3 voxels, missed
    g = lesion1 | lesion2
    hit = _box(shape, (3, 2, 2), (5, 4, 5))            # 12 voxels, 4 inside lesion1
    fp = _box(shape, (9, 2, 10), (10, 3, 15))          # 5 voxels, far from any lesion
    p = hit | fp
    r = evaluate_arrays(p, g, SPACING)
    assert r["dice"] == pytest.approx(2 * 4 / (17 + 11))
    assert r["fpv_ml"] == pytest.approx(5 * 0.0036, abs=1e-12)  # only the separate component
    assert r["fnv_ml"] == pytest.approx(3 * 0.0036, abs=1e-12)  # only the untouched lesion
    assert r["gt_ml"] == pytest.approx(11 * 0.0036) and r["pred_ml"] == pytest.approx(17 * 0.0036)
    assert (r["n_gt_lesions"], r["n_pred_lesions"]) == (2, 2)
    assert (r["tp_lesions"], r["fp_lesions"], r["fn_lesions"]) == (1, 1, 1)
    assert r["precision"] == 0.5 and r["recall"] == 0.5 and r["f1"] == 0.5


def test_18_connectivity_corner_touching_voxels_are_separate():
    shape = (10, 10, 10)
    p = _empty(shape)
    p[5, 5, 5] = p[6, 6, 6] = True  # share only a corner
    g = _empty(shape)
    g[5, 5, 5] = True
    r = evaluate_arrays(p, g, (1.0, 1.0, 1.0))
    # Under 18-connectivity the corner voxel is its own component and touches no GT voxel.
    assert r["n_pred_lesions"] == 2
    assert r["fpv_ml"] == pytest.approx(0.001)
    assert r["fp_lesions"] == 1
    # Under 26-connectivity it would be one component overlapping GT: FPV 0.
    assert ndi.label(p, structure=np.ones((3, 3, 3)))[1] == 1
    # Edge-sharing voxels are connected under 18-connectivity.
    q = _empty(shape)
    q[5, 5, 5] = q[6, 6, 5] = True
    assert metrics.label_components(q)[1] == 1
    r = evaluate_arrays(q, g, (1.0, 1.0, 1.0))
    assert r["fpv_ml"] == 0.0 and r["n_pred_lesions"] == 1


def _brute_surface(m):
    pad = np.pad(m, 1)
    inner = np.ones_like(m)
    for axis in range(3):
        for shift in (-1, 1):
            inner &= np.roll(pad, shift, axis=axis)[1:-1, 1:-1, 1:-1]
    return m & ~inner


def _brute_hd95(p, g, spacing):
    sp = np.asarray(spacing)
    a = np.argwhere(_brute_surface(p)) * sp
    b = np.argwhere(_brute_surface(g)) * sp
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_matches_brute_force():
    rng = np.random.default_rng(0)
    shape = (14, 12, 16)
    p = ndi.binary_dilation(rng.random(shape) > 0.97, iterations=1)
    g = ndi.binary_dilation(rng.random(shape) > 0.97, iterations=1)
    p[0, 0, :4] = True  # touches the volume edge: the edge counts as outside
    expected = _brute_hd95(p, g, SPACING)
    assert hd95(p, g, SPACING) == pytest.approx(expected, rel=1e-9)
    assert evaluate_arrays(p, g, SPACING)["hd95_mm"] == pytest.approx(expected, rel=1e-9)
    # Same masks inside a larger volume: the bounding-box crop must not change anything.
    big_p, big_g = np.zeros((30, 28, 40), bool), np.zeros((30, 28, 40), bool)
    big_p[5:19, 7:19, 11:27] = p
    big_g[5:19, 7:19, 11:27] = g
    # (the edge voxels stay surface voxels: their outside neighbours are now background)
    assert hd95(big_p, big_g, SPACING) == pytest.approx(expected, rel=1e-9)
    assert _brute_hd95(big_p, big_g, SPACING) == pytest.approx(expected, rel=1e-9)


def test_hd95_two_voxels_anisotropic():
    p, g = _empty(), _empty()
    p[2, 5, 5] = True
    g[5, 5, 5] = True
    assert hd95(p, g, (2.0, 1.0, 1.0)) == pytest.approx(6.0)
    g2 = _empty()
    g2[2, 5, 9] = True
    assert hd95(p, g2, (2.0, 1.0, 0.5)) == pytest.approx(2.0)


def test_summarize():
    shape = (12, 12, 12)
    g1 = _box(shape, (2, 2, 2), (4, 4, 4))
    rows = [
        evaluate_arrays(g1, g1, SPACING),                                  # Dice 1
        evaluate_arrays(_empty(shape), g1, SPACING),                       # Dice 0, missed
        evaluate_arrays(_box(shape, (6, 6, 6), (7, 7, 8)), _empty(shape), SPACING),  # tumour-free, FP 2 vox
        evaluate_arrays(_empty(shape), _empty(shape), SPACING),            # tumour-free, clean
    ]
    s = summarize(rows)
    assert (s["n_cases"], s["n_with_lesions"], s["n_tumour_free"]) == (4, 2, 2)
    assert s["mean_dice"] == 0.5 and s["median_dice"] == 0.5 and s["std_dice"] == 0.5
    assert s["mean_fpv_ml"] == pytest.approx(2 * VOXEL_ML / 4)
    assert s["mean_fnv_ml"] == pytest.approx(8 * VOXEL_ML / 4)
    assert s["mean_fpv_ml_tumour_free"] == pytest.approx(VOXEL_ML)
    assert s["n_tumour_free_with_fp"] == 1
    assert s["mean_hd95_mm"] == 0.0 and s["n_hd95"] == 1
    assert (s["gt_lesions"], s["pred_lesions"], s["detected_lesions"], s["fp_lesions"]) == (2, 2, 1, 1)
    assert s["lesion_precision"] == 0.5 and s["lesion_recall"] == 0.5 and s["lesion_f1"] == 0.5
    empty = summarize([])
    assert empty["n_cases"] == 0 and empty["mean_dice"] is None and empty["lesion_f1"] is None


def test_fnv_in_both_challenge_aggregations():
    """Hand-computed: lesion scans missing 8, 0 and 1 voxels of lesion, two tumour-free scans.
    autoPET I: (8 + 0 + 1 + 0 + 0) / 5 scans; autoPET III/IV: (8 + 0 + 1) / 3 lesion scans."""
    shape = (12, 12, 12)
    big = _box(shape, (2, 2, 2), (4, 4, 4))  # 8 voxels
    small = _box(shape, (8, 8, 8), (9, 9, 9))  # 1 voxel, 18-separate from big
    rows = [
        evaluate_arrays(_empty(shape), big, SPACING),  # misses all 8
        evaluate_arrays(big, big, SPACING),  # misses nothing
        evaluate_arrays(big, big | small, SPACING),  # misses the 1-voxel lesion
        evaluate_arrays(small, _empty(shape), SPACING),  # tumour-free with a false positive
        evaluate_arrays(_empty(shape), _empty(shape), SPACING),  # tumour-free, clean
    ]
    assert [r["fnv_ml"] / VOXEL_ML for r in rows] == pytest.approx([8, 0, 1, 0, 0])
    s = summarize(rows)
    assert s["mean_fnv_ml"] == pytest.approx(9 * VOXEL_ML / 5)
    assert s["median_fnv_ml"] == pytest.approx(0.0)
    assert s["std_fnv_ml"] == pytest.approx(np.std([8, 0, 1, 0, 0]) * VOXEL_ML)
    assert s["mean_fnv_ml_autopet3"] == pytest.approx(9 * VOXEL_ML / 3)
    assert s["median_fnv_ml_autopet3"] == pytest.approx(1 * VOXEL_ML)
    assert s["std_fnv_ml_autopet3"] == pytest.approx(np.std([8, 0, 1]) * VOXEL_ML)
    assert s["n_fnv_autopet3"] == 3
    assert s["aggregation"]["fnv_ml"].startswith("autoPET I:")
    assert s["aggregation"]["fnv_ml_autopet3"].startswith("autoPET III/IV:")
    # FPV is averaged over every scan in both editions
    assert s["mean_fpv_ml"] == pytest.approx(1 * VOXEL_ML / 5)
    # Only tumour-free scans: autoPET III/IV has no FNV to average
    free = summarize(rows[3:])
    assert free["mean_fnv_ml"] == 0.0 and free["mean_fnv_ml_autopet3"] is None
    assert free["n_fnv_autopet3"] == 0


def test_detection_scores_undefined_cases():
    f = metrics.detection_scores
    assert f(0, 0, 0, 0) == (None, None, None)
    assert f(0, 3, 0, 0) == (0.0, None, 0.0)
    assert f(0, 0, 0, 2) == (None, 0.0, 0.0)
    assert f(0, 2, 0, 2) == (0.0, 0.0, 0.0)
    p, r, f1 = f(1, 2, 2, 2)
    assert (p, r) == (0.5, 1.0) and f1 == pytest.approx(2 / 3)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        evaluate_arrays(_empty((4, 4, 4)), _empty((4, 4, 5)), SPACING)


def test_metrics_and_evaluate_do_not_import_jax():
    code = ("import sys; import petct_jax.downstream.metrics, petct_jax.downstream.evaluate; "
            "assert 'jax' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
