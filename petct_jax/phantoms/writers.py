"""Writing a rendered study to disk: AutoPET or nnU-Net raw layout, sidecars, previews."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from petct_jax.phantoms.grids import Grid
from petct_jax.phantoms.study import Rendered, StudyPlan

LAYOUTS = ("autopet", "nnunet")


def save_nifti(path: Path, data: np.ndarray, grid: Grid, scaling: tuple[float, float] = (1.0, 0.0),
               descrip: str = "") -> None:
    """Write `data` as stored (dtype kept) with the grid's affine in both qform and sform.

    `scaling` is (scl_slope, scl_inter): what a reader's get_fdata() applies to the stored ints.
    """
    img = nib.Nifti1Image(data, grid.affine)
    hdr = img.header
    hdr.set_xyzt_units("mm", "sec")
    img.set_qform(grid.affine, code=1)
    img.set_sform(grid.affine, code=1)
    if tuple(scaling) != (1.0, 0.0):
        hdr.set_slope_inter(*scaling)
    if descrip:
        hdr["descrip"] = descrip.encode()[:79]
    nib.save(img, str(path))


def study_paths(plan: StudyPlan, layout: str, preview: bool = False) -> dict[str, str]:
    """The files `write_study` (and, with `preview`, the preview) writes for a study, relative to
    the cohort folder, by role; known from the plan alone, before anything is rendered."""
    if layout == "autopet":
        d = Path(plan.patient.patient_id) / plan.study_id
        paths = {k: (d / f"{k}.nii.gz").as_posix() for k in ("CT", "CTres", "PET", "SUV", "SEG")}
    elif layout == "nnunet":
        paths = {"CTres": f"imagesTr/{plan.case}_0000.nii.gz", "SUV": f"imagesTr/{plan.case}_0001.nii.gz",
                 "SEG": f"labelsTr/{plan.case}.nii.gz"}
    else:  # pragma: no cover - validated by the caller
        raise ValueError(layout)
    if preview:
        paths["preview"] = f"previews/{plan.case}.png"
    return paths


def write_study(out: Path, plan: StudyPlan, r: Rendered, layout: str) -> dict[str, str]:
    """Write one study's files; returns their paths relative to `out` by role."""
    pg, cg = plan.pet_grid, plan.ct_grid
    paths = study_paths(plan, layout)
    if layout == "autopet":
        (out / paths["CT"]).parent.mkdir(parents=True, exist_ok=True)
        save_nifti(out / paths["CT"], r.ct_raw, cg, r.ct_scaling, "phantom CT (HU)")
        save_nifti(out / paths["CTres"], r.ctres, pg, descrip="phantom CT on PET grid (HU)")
        save_nifti(out / paths["PET"], r.pet_raw, pg, r.pet_scaling, "phantom PET (Bq/mL)")
        save_nifti(out / paths["SUV"], r.suv, pg, descrip="phantom PET (SUVbw)")
        save_nifti(out / paths["SEG"], r.seg, pg, descrip="lesion mask")
    elif layout == "nnunet":
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "labelsTr").mkdir(parents=True, exist_ok=True)
        save_nifti(out / paths["CTres"], r.ctres, pg, descrip="phantom CT on PET grid (HU)")
        save_nifti(out / paths["SUV"], r.suv, pg, descrip="phantom PET (SUVbw)")
        save_nifti(out / paths["SEG"], r.seg, pg, descrip="lesion mask")
    else:  # pragma: no cover - validated by the caller
        raise ValueError(layout)
    return paths


def study_record(plan: StudyPlan, r: Rendered, paths: dict[str, str], layout: str,
                 preview: str | None) -> dict:
    """The study's entry in phantoms.json."""
    lesions = []
    for les, stats in zip(plan.lesions, r.lesion_stats):
        lesions.append({**les.to_json(), **stats})
    pp = plan.patient
    rec = {
        "case": plan.case, "case_index": plan.case_index, "patient_id": pp.patient_id,
        "patient_index": pp.index, "study_number": plan.study_number, "study_id": plan.study_id,
        "study_date": plan.date.isoformat(), "centre": plan.centre.name, "size": plan.size.name,
        "layout": layout, "paths": paths, "preview": preview,
        "tumour_free": len(plan.lesions) == 0, "control_patient": pp.control,
        "n_lesions": len(plan.lesions), "lesion_voxels": int(r.seg.sum()),
        "pet_units": "Bq/mL", "suv_factor": plan.suv_factor, "weight_kg": round(pp.anatomy.weight_kg, 2),
        "injected_dose_MBq": round(plan.dose_mbq, 2), "uptake_min": round(plan.uptake_min, 2),
        "contrast_ct": plan.contrast, "arms": plan.st.arms,
        "pet_fwhm_mm": plan.centre.pet_fwhm,
        "pet_grid": plan.pet_grid.to_json(), "ct_grid": plan.ct_grid.to_json(),
        "landmarks_mm": {k: np.round(plan.to_world(v), 3).tolist()
                         for k, v in plan.anatomy.landmarks.items() if not k.startswith(("aorta", "iliac"))},
        "lesions": lesions,
    }
    if layout == "autopet":   # how CT.nii.gz and PET.nii.gz are stored (CTres, SUV: float32)
        rec["ct_storage"] = {"dtype": "int16", "scl_slope": r.ct_scaling[0], "scl_inter": r.ct_scaling[1]}
        rec["pet_storage"] = {"dtype": str(r.pet_raw.dtype), "scl_slope": r.pet_scaling[0],
                              "scl_inter": r.pet_scaling[1]}
    return rec


def write_dataset_json(out: Path, n: int) -> None:
    ds = {
        "channel_names": {"0": "CT", "1": "PET"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n,
        "file_ending": ".nii.gz",
        "name": "petct-phantoms",
        "description": "Digital whole-body FDG PET/CT phantoms (petct phantoms); CT resampled to the "
                       "PET grid, PET in SUV.",
    }
    (out / "dataset.json").write_text(json.dumps(ds, indent=2) + "\n")


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def write_preview(path: Path, plan: StudyPlan, r: Rendered) -> None:
    """PET MIP (coronal) and a coronal CT slice, lesions outlined; head at the top, patient's
    right on the image's left (radiological convention)."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    def canonical(data, grid):
        img = nib.as_closest_canonical(nib.Nifti1Image(data, grid.affine))
        return np.asarray(img.dataobj), img.affine

    suv, pa = canonical(r.suv, plan.pet_grid)
    seg, _ = canonical(r.seg, plan.pet_grid)
    ct, ca = canonical(r.ct_raw, plan.ct_grid)

    def extent(shape, aff):
        x0, z0 = aff[0, 3], aff[2, 3]
        dx, dz = aff[0, 0], aff[2, 2]
        return (x0 - dx / 2, x0 + dx * (shape[0] - 0.5), z0 - dz / 2, z0 + dz * (shape[2] - 0.5))

    y_world = plan.to_world([0.0, -10.0, 0.0])[1]
    j = int(np.clip(round((y_world - ca[1, 3]) / ca[1, 1]), 0, ct.shape[1] - 1))
    xs = pa[0, 3] + pa[0, 0] * np.arange(suv.shape[0])
    zs = pa[2, 3] + pa[2, 2] * np.arange(suv.shape[2])
    seg_mip = seg.max(axis=1).T
    lo, hi = plan.pet_grid.bounds()
    height = 4.8
    width = height * (hi[0] - lo[0]) / (hi[2] - lo[2]) * 2 + 0.4
    fig, axes = plt.subplots(1, 2, figsize=(width, height + 0.5), dpi=100)
    ct_slice = ct[:, j, :].astype(np.float32) * r.ct_scaling[0] + r.ct_scaling[1]
    axes[0].imshow(ct_slice.T, origin="lower", cmap="gray", vmin=-900, vmax=700,
                   extent=extent(ct.shape, ca), interpolation="bilinear")
    axes[0].set_title("CT coronal", fontsize=8)
    axes[1].imshow(suv.max(axis=1).T, origin="lower", cmap="gray_r", vmin=0, vmax=8,
                   extent=extent(suv.shape, pa), interpolation="bilinear")
    axes[1].set_title("PET MIP (SUV 0-8)", fontsize=8)
    for ax in axes:
        if seg_mip.any():
            ax.contour(xs, zs, seg_mip, levels=[0.5], colors="red", linewidths=0.7)
        ax.set_xlim(hi[0], lo[0])          # patient's right on the left
        ax.set_ylim(lo[2], hi[2])          # head at the top
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{plan.case}  centre {plan.centre.name}  {len(plan.lesions)} lesion(s)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
