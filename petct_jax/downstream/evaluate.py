"""`petct evaluate --pred DIR --gt DIR`: score predicted lesion masks with the AutoPET metrics.

Predictions and labels are paired by file name (`<case>.nii.gz` or `<case>.nii` in
both folders). `--gt` may also be an nnU-Net dataset folder: when it holds no NIfTI
files itself, its `labelsTr` (or `labelsTs`) folder is used. Files present on one side
only are listed and skipped (`--strict` makes them an error). Every pair must share
one voxel grid (shape and affine): a prediction on another grid is an error, never
silently resampled. Masks are binarized (> 0); the voxel volume comes from the label's
header zooms.

Writes to `--out` (default `report/`):
- `cases.csv`: one row per case with the keys of `metrics.CASE_KEYS` (empty where
  a metric is undefined: Dice without lesions, HD95 with an empty mask, ...);
- `summary.json`: `metrics.summarize` (FNV in both challenge aggregations: `*_fnv_ml`
  autoPET I, `*_fnv_ml_autopet3` autoPET III/IV, named under "aggregation") plus the
  folders and the unmatched files;
- `distributions.png` (Dice / FPV / FNV), `dice_per_case.png`, and
  `overlays/<case>.png` for a few lesion cases (the worst and best by Dice): a coronal
  slice through the largest ground-truth lesion with ground truth (green) and
  prediction (red) contours, plus the PET MIP with projected contours when `--pet`
  gives the images (`<case>.nii.gz` or nnU-Net's `<case>_0001.nii.gz`). Head at the
  top, patient's right on the left.
and prints a short summary table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Any

import numpy as np

from petct_jax.downstream import metrics
from petct_jax.errors import PetctError
from petct_jax.preprocessing.readers import NIFTI_ENDINGS
from petct_jax.parent_watch import exit_with_parent

CSV_COLUMNS = ("case",) + metrics.CASE_KEYS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="folder of predicted masks <case>.nii.gz")
    parser.add_argument("--gt", required=True,
                        help="folder of ground-truth masks <case>.nii.gz (or an nnU-Net dataset "
                             "folder holding labelsTr/)")
    parser.add_argument("--out", default="report", help="report folder (default: report)")
    parser.add_argument("--workers", type=int, default=1, help="processes scoring cases (default 1)")
    parser.add_argument("--pet", default=None,
                        help="optional folder of PET images (<case>.nii.gz or <case>_0001.nii.gz) "
                             "used as the overlay background (MIP)")
    parser.add_argument("--overlays", type=int, default=4, help="overlay PNGs to draw (default 4)")
    parser.add_argument("--strict", action="store_true",
                        help="fail when a prediction or a label has no counterpart")
    parser.add_argument("--affine-tol", type=float, default=1e-3,
                        help="largest affine difference (mm) still counted as the same grid")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- pairing


def _case_name(filename: str) -> str | None:
    for ending in NIFTI_ENDINGS:
        if filename.endswith(ending) and not filename.startswith("."):
            return filename[: -len(ending)]
    return None


def nifti_cases(folder: str) -> dict[str, str]:
    """case -> path of the NIfTI files directly in `folder`."""
    if not os.path.isdir(folder):
        raise PetctError(f"{folder}: not a folder")
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        case = _case_name(name)
        path = os.path.join(folder, name)
        if case is None or not os.path.isfile(path):
            continue
        if case in out:
            raise PetctError(f"{folder}: case {case!r} is there twice ({os.path.basename(out[case])}, {name})")
        out[case] = path
    return out


def resolve_gt_folder(folder: str) -> str:
    """`folder` itself, or its nnU-Net `labelsTr`/`labelsTs` when it holds no NIfTI files."""
    if nifti_cases(folder):
        return folder
    found = [os.path.join(folder, d) for d in ("labelsTr", "labelsTs")
             if os.path.isdir(os.path.join(folder, d))]
    if len(found) == 1:
        return found[0]
    if len(found) == 2:
        raise PetctError(f"{folder}: holds both labelsTr and labelsTs; pass one of them as --gt")
    raise PetctError(f"{folder}: no ground-truth NIfTI files (<case>.nii.gz) and no labelsTr folder")


def find_pairs(pred_dir: str, gt_dir: str) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """([(case, pred path, gt path)], predictions without label, labels without prediction)."""
    pred = nifti_cases(pred_dir)
    gt = nifti_cases(resolve_gt_folder(gt_dir))
    pairs = [(c, pred[c], gt[c]) for c in sorted(pred) if c in gt]
    return pairs, sorted(set(pred) - set(gt)), sorted(set(gt) - set(pred))


# ---------------------------------------------------------------- loading


def _spatial_shape(img) -> tuple[int, ...]:
    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) from some writers
        shape = shape[:-1]
    return shape


def check_same_grid(case: str, pred_path: str, gt_path: str, tol: float = 1e-3) -> None:
    """Raise PetctError unless the two NIfTI files share shape and affine (headers only)."""
    import nibabel as nib

    p, g = nib.load(pred_path), nib.load(gt_path)
    ps, gs = _spatial_shape(p), _spatial_shape(g)
    if len(gs) != 3:
        raise PetctError(f"case {case}: {gt_path} is not a 3D mask (shape {gs})")
    if ps != gs:
        raise PetctError(f"case {case}: prediction {pred_path} has shape {ps}, ground truth {gt_path} "
                         f"has {gs}; resample the prediction onto the label grid")
    diff = float(np.abs(np.asarray(p.affine) - np.asarray(g.affine)).max())
    if not diff <= tol:
        raise PetctError(f"case {case}: prediction {pred_path} and ground truth {gt_path} have different "
                         f"affines (max difference {diff:.4g} > {tol:g}); resample the prediction onto "
                         "the label grid")


def load_mask(path: str) -> np.ndarray:
    """Binary mask (> 0) in the file's array order."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj).reshape(_spatial_shape(img))
    return data > 0


def spacing_of(path: str) -> tuple[float, float, float]:
    import nibabel as nib

    return tuple(float(z) for z in nib.load(path).header.get_zooms()[:3])


def evaluate_case(case: str, pred_path: str, gt_path: str) -> dict[str, Any]:
    """Metrics of one pair (grids already checked); spacing from the label's header."""
    row = metrics.evaluate_arrays(load_mask(pred_path), load_mask(gt_path), spacing_of(gt_path))
    return {"case": case, **row}


def _evaluate_star(job: tuple[str, str, str]) -> dict[str, Any]:
    return evaluate_case(*job)


def evaluate_folder(pairs: list[tuple[str, str, str]], workers: int = 1, progress: bool = True
                    ) -> list[dict[str, Any]]:
    """Per-case rows, in the order of `pairs`."""
    from tqdm import tqdm

    bar = tqdm(total=len(pairs), unit="case", desc="evaluate", file=sys.stderr, disable=not progress)
    rows = []
    try:
        if workers <= 1 or len(pairs) <= 1:
            for job in pairs:
                rows.append(evaluate_case(*job))
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn: the parent may hold threads (tqdm, a JAX runtime when called from Python)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=exit_with_parent,
                                     initargs=(os.getpid(),)) as pool:
                for row in pool.map(_evaluate_star, pairs):
                    rows.append(row)
                    bar.update()
    finally:
        bar.close()
    return rows


# ---------------------------------------------------------------- writing


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "1" if value else "0"
    if isinstance(value, float):
        return format(value, ".10g")
    return str(value)


def write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for r in rows:
            w.writerow([_cell(r.get(k)) for k in CSV_COLUMNS])


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_distributions(path: str, rows: list[dict[str, Any]]) -> None:
    plt = _plt()
    dice = [r["dice"] for r in rows if r["dice"] is not None]
    panels = [("Dice (scans with lesions)", dice, (0.0, 1.0)),
              ("FPV (mL)", [r["fpv_ml"] for r in rows], None),
              ("FNV (mL)", [r["fnv_ml"] for r in rows], None)]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    for ax, (title, values, rng) in zip(axes, panels):
        if values:
            ax.hist(values, bins=min(20, max(5, len(values))), range=rng, color="0.55", edgecolor="k")
            ax.axvline(float(np.mean(values)), color="tab:red", label=f"mean {np.mean(values):.3g}")
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"{title}, n={len(values)}", fontsize=9)
        ax.set_ylabel("scans")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_dice_per_case(path: str, rows: list[dict[str, Any]]) -> None:
    plt = _plt()
    scored = sorted((r for r in rows if r["dice"] is not None), key=lambda r: -r["dice"])
    fig, ax = plt.subplots(figsize=(min(20.0, 3 + 0.18 * max(len(scored), 1)), 3.4))
    if scored:
        x = np.arange(len(scored))
        ax.bar(x, [r["dice"] for r in scored], color="tab:blue")
        ax.set_xticks(x, [r["case"] for r in scored], rotation=90, fontsize=6)
        ax.axhline(float(np.mean([r["dice"] for r in scored])), color="tab:red", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title(f"Dice per scan with lesions ({len(scored)}; {len(rows) - len(scored)} tumour-free not shown)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _canonical(path: str):
    """(array in RAS+ order, canonical affine) of a NIfTI file."""
    import nibabel as nib

    img = nib.load(path)
    data = np.asanyarray(img.dataobj).reshape(_spatial_shape(img))
    canon = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(data), img.affine))
    return np.asarray(canon.dataobj), canon.affine


def pet_path_for(pet_dir: str, case: str) -> str | None:
    for name in (case, f"{case}_0001"):
        for ending in NIFTI_ENDINGS:
            path = os.path.join(pet_dir, name + ending)
            if os.path.isfile(path):
                return path
    return None


def plot_overlay(path: str, row: dict[str, Any], pred_path: str, gt_path: str,
                 pet_path: str | None = None) -> None:
    """Coronal slice through the largest GT lesion (or predicted one, on a tumour-free scan)."""
    plt = _plt()
    gt, aff = _canonical(gt_path)
    pred, _ = _canonical(pred_path)
    gt, pred = gt > 0, pred > 0
    pet = None
    if pet_path is not None:
        pet, pet_aff = _canonical(pet_path)
        if pet.shape != gt.shape or not np.allclose(pet_aff, aff, atol=1e-2):
            print(f"petct evaluate: {pet_path} is not on the label grid; overlay without PET",
                  file=sys.stderr)
            pet = None
    ref = gt if gt.any() else pred
    labels, n = metrics.label_components(ref)
    if n:
        largest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
        j = int(round(float(np.argwhere(labels == largest)[:, 1].mean())))
    else:
        j = ref.shape[1] // 2
    # RAS canonical: axis 0 -> right, 2 -> superior; extent in mm keeps the aspect right.
    dx, dz = aff[0, 0], aff[2, 2]
    x0, z0 = aff[0, 3], aff[2, 3]
    extent = (x0 - dx / 2, x0 + dx * (gt.shape[0] - 0.5), z0 - dz / 2, z0 + dz * (gt.shape[2] - 0.5))
    xs = x0 + dx * np.arange(gt.shape[0])
    zs = z0 + dz * np.arange(gt.shape[2])
    panels = [(f"coronal slice {j}", gt[:, j, :], pred[:, j, :], None if pet is None else pet[:, j, :])]
    if pet is not None:
        panels.append(("PET MIP", gt.any(axis=1), pred.any(axis=1), pet.max(axis=1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.6), squeeze=False)
    for ax, (title, g, p, bg) in zip(axes[0], panels):
        if bg is not None:
            lo, hi = np.percentile(bg, [1, 99.5])
            ax.imshow(bg.T, origin="lower", cmap="gray_r", vmin=lo, vmax=hi, extent=extent,
                      interpolation="nearest")
        else:
            ax.imshow(g.T.astype(np.float32), origin="lower", cmap="Greens", vmin=0, vmax=3,
                      extent=extent, interpolation="nearest")
        for m, color in ((g, "tab:green"), (p, "tab:red")):
            if m.any() and not m.all():
                ax.contour(xs, zs, m.T.astype(np.float32), levels=[0.5], colors=color, linewidths=0.9)
        ax.set_xlim(extent[1], extent[0])  # patient's right on the left (radiological)
        ax.set_ylim(extent[2], extent[3])  # head at the top
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(title, fontsize=8)
    dice = "-" if row["dice"] is None else f"{row['dice']:.3f}"
    fig.suptitle(f"{row['case']}  Dice {dice}  FPV {row['fpv_ml']:.2f} mL  FNV {row['fnv_ml']:.2f} mL\n"
                 "green: ground truth, red: prediction", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def pick_overlay_cases(rows: list[dict[str, Any]], n: int) -> list[str]:
    """Up to `n` lesion cases: the worst and the best by Dice, alternating."""
    scored = sorted((r for r in rows if r["dice"] is not None), key=lambda r: (r["dice"], r["case"]))
    picked: list[str] = []
    lo, hi = 0, len(scored) - 1
    while len(picked) < min(n, len(scored)):
        picked.append(scored[lo]["case"])
        lo += 1
        if len(picked) < n and hi >= lo:
            picked.append(scored[hi]["case"])
            hi -= 1
    return picked


# ---------------------------------------------------------------- report


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def summary_table(s: dict[str, Any]) -> str:
    rows = [("dice", "Dice", s["n_with_lesions"]), ("fpv_ml", "FPV mL", s["n_cases"]),
            ("fnv_ml", "FNV mL, autoPET I", s["n_cases"]),
            ("fnv_ml_autopet3", "FNV mL, autoPET III/IV", s["n_fnv_autopet3"]),
            ("hd95_mm", "HD95 mm", s["n_hd95"])]
    width = max(len(label) for _, label, _ in rows)
    lines = [f"{s['n_cases']} cases ({s['n_with_lesions']} with lesions, {s['n_tumour_free']} tumour-free)",
             f"{'metric':<{width}} {'mean':>9} {'median':>9} {'std':>9} {'n':>5}"]
    for key, label, n in rows:
        lines.append(f"{label:<{width}} {_fmt(s['mean_' + key]):>9} {_fmt(s['median_' + key]):>9} "
                     f"{_fmt(s['std_' + key]):>9} {n:>5}")
    lines.append("FNV: autoPET I scores a tumour-free scan 0 and averages over all scans; "
                 "autoPET III/IV leaves it out (NaN) and averages over the scans with lesions")
    lines.append(f"lesions: {s['gt_lesions']} true, {s['pred_lesions']} predicted, {s['detected_lesions']} "
                 f"detected; precision {_fmt(s['lesion_precision'])}, recall {_fmt(s['lesion_recall'])}, "
                 f"F1 {_fmt(s['lesion_f1'])}")
    if s["n_tumour_free"]:
        lines.append(f"tumour-free scans: mean FPV {_fmt(s['mean_fpv_ml_tumour_free'])} mL, "
                     f"{s['n_tumour_free_with_fp']} of {s['n_tumour_free']} with any predicted lesion")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    pairs, only_pred, only_gt = find_pairs(args.pred, args.gt)
    for label, names in (("predictions without ground truth", only_pred),
                         ("ground-truth cases without prediction", only_gt)):
        if names:
            shown = ", ".join(names[:10]) + (f", ... ({len(names) - 10} more)" if len(names) > 10 else "")
            print(f"petct evaluate: {len(names)} {label}: {shown}", file=sys.stderr)
    if args.strict and (only_pred or only_gt):
        raise PetctError(f"{len(only_pred)} predictions and {len(only_gt)} labels have no counterpart "
                         "(--strict)")
    if not pairs:
        raise PetctError(f"no case is in both {args.pred} and {args.gt} "
                         "(files are paired by name, <case>.nii.gz)")
    for case, p, g in pairs:  # headers only: fail before any long computation
        check_same_grid(case, p, g, args.affine_tol)

    rows = evaluate_folder(pairs, workers=args.workers, progress=not args.no_progress)
    summary = metrics.summarize(rows)
    summary.update({"pred_dir": os.path.abspath(args.pred), "gt_dir": os.path.abspath(args.gt),
                    "unmatched_pred": only_pred, "unmatched_gt": only_gt})

    os.makedirs(args.out, exist_ok=True)
    write_csv(os.path.join(args.out, "cases.csv"), rows)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    plot_distributions(os.path.join(args.out, "distributions.png"), rows)
    plot_dice_per_case(os.path.join(args.out, "dice_per_case.png"), rows)
    by_case = {c: (p, g) for c, p, g in pairs}
    by_row = {r["case"]: r for r in rows}
    picked = pick_overlay_cases(rows, args.overlays)
    if picked:
        os.makedirs(os.path.join(args.out, "overlays"), exist_ok=True)
    for case in picked:
        pet = pet_path_for(args.pet, case) if args.pet else None
        if args.pet and pet is None:
            print(f"petct evaluate: no PET image for {case} in {args.pet}", file=sys.stderr)
        plot_overlay(os.path.join(args.out, "overlays", f"{case}.png"), by_row[case], *by_case[case], pet)

    print(summary_table(summary))
    print(f"report: {args.out}/ (cases.csv, summary.json, distributions.png, dice_per_case.png, "
          f"{len(picked)} overlays)")
    return 0
