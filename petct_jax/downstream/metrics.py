"""AutoPET lesion-segmentation metrics on binary masks: Dice, FPV, FNV, HD95, detection.

Pure numpy/scipy (no JAX), so `petct evaluate` and the fine-tuning loop score the same
way. Definitions (autoPET challenge, see docs/conventions.md):

- Dice = 2|P∩G| / (|P|+|G|), per scan; undefined (None) when G is empty: a
  tumour-free scan is judged by FPV and reported apart. An empty P on a lesion scan
  gives Dice 0.
- FPV (mL): volume of predicted connected components that touch no ground-truth voxel.
- FNV (mL): volume of ground-truth components that touch no predicted voxel.
- Components: 18-connectivity in 3D (`generate_binary_structure(3, 2)`): voxels that
  share a face or an edge are connected, voxels that share only a corner are not.
- Volume = voxel count x voxel volume (mm³, product of the spacing) / 1000.
- Aggregation over scans (`summarize`): the editions differ on FNV, so both are reported.
  autoPET I (2022) scores FNV = 0 on a tumour-free scan and averages over all scans
  (`mean_fnv_ml`); autoPET III/IV (2024/2025) score it NaN there and average over the
  scans with lesions (`mean_fnv_ml_autopet3`). Both average Dice over the lesion scans and
  FPV over all scans.
- HD95 (mm): symmetric 95th percentile Hausdorff distance, the medpy/MONAI
  convention: max of the two directed 95th percentiles (numpy's default linear
  interpolation) of the distances from each surface voxel of one mask to the nearest
  surface voxel of the other. Surface = mask voxels with a face neighbour outside the
  mask (6-connected erosion; the volume edge counts as outside). Distances use the
  voxel spacing (exact Euclidean distance transform). Undefined when either mask is
  empty. Computed on the bounding box of P∪G plus a 1-voxel margin: the distance to
  the nearest surface voxel does not depend on voxels outside the box, so the result
  is exact and memory follows the lesions, not the scan.
- Lesion-wise detection: a ground-truth component is *detected* when it overlaps any
  predicted voxel; a predicted component is a *true positive* component when it
  overlaps any ground-truth voxel. precision = predicted components overlapping GT /
  predicted components; recall = detected GT components / GT components; F1 =
  2PR/(P+R). Undefined cases, per scan: precision is None without predicted
  components, recall is None without GT components; F1 is None when there are
  neither (nothing to find, nothing claimed: FPV = 0 says it all), 0 when exactly one
  side is empty (every claim false, or every lesion missed), and 0 when P = R = 0.
  `summarize` pools the component counts over scans (micro average) with the same
  rules.

Arrays may be any 3D shape; `spacing` gives the voxel size (mm) along each array axis
in the same order ((z, y, x) inside petct-jax).
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

STRUCTURE_18 = ndi.generate_binary_structure(3, 2)  # components (AutoPET): face + edge neighbours
STRUCTURE_6 = ndi.generate_binary_structure(3, 1)  # surface erosion (medpy/MONAI)

# How `summarize` aggregates FNV, as its summary states it.
AGGREGATIONS = {
    "fnv_ml": "autoPET I: FNV 0 on tumour-free scans, averaged over all scans",
    "fnv_ml_autopet3": "autoPET III/IV: FNV NaN on tumour-free scans, averaged over the scans with lesions",
}

# Per-case keys, in the order `petct evaluate` writes them.
CASE_KEYS = ("dice", "fpv_ml", "fnv_ml", "hd95_mm", "gt_ml", "pred_ml", "n_gt_lesions",
             "n_pred_lesions", "tp_lesions", "fp_lesions", "fn_lesions", "precision", "recall",
             "f1", "tumour_free")


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...] | None:
    """Slices of the bounding box of `mask` grown by `margin` (clipped), None if empty."""
    out = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(np.any(mask, axis=other))
        if idx.size == 0:
            return None
        out.append(slice(max(int(idx[0]) - margin, 0), min(int(idx[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(out)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components of a binary mask with 18-connectivity (labels 1..n)."""
    labels, n = ndi.label(mask, structure=STRUCTURE_18)
    return labels, int(n)


def _component_overlap(labels: np.ndarray, n: int, other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(size per component, whether each component overlaps `other`), indexed 0..n-1."""
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    hit = np.zeros(n, dtype=bool)
    touched = np.unique(labels[other & (labels > 0)])
    hit[touched[touched > 0] - 1] = True
    return sizes, hit


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of `mask` with at least one face neighbour outside it (volume edge = outside)."""
    return mask & ~ndi.binary_erosion(mask, structure=STRUCTURE_6, border_value=0)


def directed_surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distance (mm) from every surface voxel of `a` to the nearest surface voxel of `b`."""
    sa, sb = surface(a), surface(b)
    dist_to_b = ndi.distance_transform_edt(~sb, sampling=spacing)
    return dist_to_b[sa]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], percentile: float = 95.0
         ) -> float | None:
    """Symmetric percentile Hausdorff distance (mm); None when either mask is empty."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if not pred.any() or not gt.any():
        return None
    box = _bbox(pred | gt, margin=1)
    p, g = pred[box], gt[box]
    d_pg = directed_surface_distances(p, g, spacing)
    d_gp = directed_surface_distances(g, p, spacing)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def detection_scores(tp_pred: int, n_pred: int, detected: int, n_gt: int
                     ) -> tuple[float | None, float | None, float | None]:
    """(precision, recall, F1) from component counts, with the undefined cases of the module doc."""
    precision = tp_pred / n_pred if n_pred else None
    recall = detected / n_gt if n_gt else None
    if not n_pred and not n_gt:
        f1 = None
    elif not n_pred or not n_gt:
        f1 = 0.0
    else:
        f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def evaluate_arrays(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> dict[str, Any]:
    """Per-scan metrics of a predicted mask against the ground truth (both binarized > 0).

    Returns a dict with the keys of `CASE_KEYS`: dice (None without GT), fpv_ml,
    fnv_ml, hd95_mm (None if either mask is empty), gt_ml, pred_ml, n_gt_lesions,
    n_pred_lesions, tp_lesions (detected GT components), fp_lesions (predicted
    components touching no GT), fn_lesions (missed GT components), precision, recall,
    f1 (see the module doc for the undefined cases), tumour_free (GT empty).
    """
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must be 3D arrays of the same shape")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3:
        raise ValueError(f"spacing_zyx must have 3 values, got {spacing_zyx!r}")
    voxel_ml = math.prod(spacing) / 1000.0

    box = _bbox(pred | gt)
    if box is not None:  # components never leave the bounding box of P∪G
        p, g = pred[box], gt[box]
    else:
        p = g = np.zeros((1, 1, 1), bool)
    n_p, n_g = int(p.sum()), int(g.sum())
    inter = int(np.count_nonzero(p & g))

    plab, n_pred = label_components(p)
    glab, n_gt = label_components(g)
    psize, phit = _component_overlap(plab, n_pred, g)
    gsize, ghit = _component_overlap(glab, n_gt, p)
    tp_pred, detected = int(phit.sum()), int(ghit.sum())
    precision, recall, f1 = detection_scores(tp_pred, n_pred, detected, n_gt)

    return {
        "dice": 2.0 * inter / (n_p + n_g) if n_g else None,
        "fpv_ml": float(psize[~phit].sum()) * voxel_ml,
        "fnv_ml": float(gsize[~ghit].sum()) * voxel_ml,
        "hd95_mm": hd95(p, g, spacing) if n_p and n_g else None,
        "gt_ml": n_g * voxel_ml,
        "pred_ml": n_p * voxel_ml,
        "n_gt_lesions": n_gt,
        "n_pred_lesions": n_pred,
        "tp_lesions": detected,
        "fp_lesions": n_pred - tp_pred,
        "fn_lesions": n_gt - detected,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "tumour_free": n_g == 0,
    }


def _defined(values: Iterable[Any]) -> np.ndarray:
    out = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return np.asarray(out, dtype=np.float64)


def _stats(values: np.ndarray, name: str) -> dict[str, float | None]:
    """mean / median / std (population, ddof=0) of defined values; None when there are none."""
    if values.size == 0:
        return {f"mean_{name}": None, f"median_{name}": None, f"std_{name}": None}
    return {f"mean_{name}": float(values.mean()), f"median_{name}": float(np.median(values)),
            f"std_{name}": float(values.std())}


def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate per-scan rows (from `evaluate_arrays`) into the AutoPET summary.

    Dice and HD95 statistics run over the scans where they are defined (scans with
    lesions; HD95 also needs a non-empty prediction); FPV over all scans. FNV both ways
    (`AGGREGATIONS`, named in the summary's "aggregation"): `*_fnv_ml` over all scans with
    0 on tumour-free ones (autoPET I), `*_fnv_ml_autopet3` over the lesion scans only
    (autoPET III/IV, whose tumour-free scans score NaN), `n_fnv_autopet3` of them.
    `mean_fpv_ml_tumour_free` is the mean FPV on tumour-free scans and
    `n_tumour_free_with_fp` how many of them have any predicted voxel. Detection
    precision/recall/F1 pool the component counts over all scans (micro average).
    Undefined values are None. Standard deviations are population (ddof=0).
    """
    rows = list(rows)
    tumour_free = [r for r in rows if r["tumour_free"]]
    lesion = [r for r in rows if not r["tumour_free"]]
    n_pred = sum(int(r["n_pred_lesions"]) for r in rows)
    n_gt = sum(int(r["n_gt_lesions"]) for r in rows)
    detected = sum(int(r["tp_lesions"]) for r in rows)
    tp_pred = n_pred - sum(int(r["fp_lesions"]) for r in rows)
    precision, recall, f1 = detection_scores(tp_pred, n_pred, detected, n_gt)
    fpv_free = _defined(r["fpv_ml"] for r in tumour_free)
    out: dict[str, Any] = {
        "n_cases": len(rows),
        "n_with_lesions": len(lesion),
        "n_tumour_free": len(tumour_free),
        **_stats(_defined(r["dice"] for r in rows), "dice"),
        **_stats(_defined(r["fpv_ml"] for r in rows), "fpv_ml"),
        **_stats(_defined(r["fnv_ml"] for r in rows), "fnv_ml"),
        **_stats(_defined(r["fnv_ml"] for r in lesion), "fnv_ml_autopet3"),
        "n_fnv_autopet3": len(lesion),
        **_stats(_defined(r["hd95_mm"] for r in rows), "hd95_mm"),
        "n_hd95": int(_defined(r["hd95_mm"] for r in rows).size),
        "mean_fpv_ml_tumour_free": float(fpv_free.mean()) if fpv_free.size else None,
        "n_tumour_free_with_fp": sum(float(r["pred_ml"]) > 0 for r in tumour_free),
        "gt_lesions": n_gt,
        "pred_lesions": n_pred,
        "detected_lesions": detected,
        "fp_lesions": n_pred - tp_pred,
        "lesion_precision": precision,
        "lesion_recall": recall,
        "lesion_f1": f1,
        "aggregation": dict(AGGREGATIONS),
    }
    return out
