"""`petct export`: write a harmonized case back to NIfTI, to look at it in ITK-SNAP or Slicer.

    petct export --store STORE --case ID --out DIR

writes DIR/pet.nii.gz (SUV, float32), DIR/ct.nii.gz (HU, int16) and, for labelled
cases, DIR/seg.nii.gz (uint8). The store's arrays are indexed [z, y, x] with
`affine_zyx` mapping (z, y, x, 1) to RAS+ millimetres; NIfTI's data are indexed
[i, j, k], so the arrays are transposed to [x, y, z] and the affine's columns reordered
the same way. qform and sform both carry that affine (code 1, scanner), so every viewer
places the voxels where the source scan had them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from petct_jax.store import Store

NIFTI_DTYPES = {"pet": np.float32, "ct": np.int16, "seg": np.uint8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="harmonized store (path or URL)")
    parser.add_argument("--case", required=True, help="case id (see `petct store-info`)")
    parser.add_argument("--out", required=True, help="folder to write the NIfTI files into")


def nifti_affine(affine_zyx) -> np.ndarray:
    """The (i, j, k) = (x, y, z) affine of the transposed array."""
    return np.asarray(affine_zyx, dtype=np.float64)[:, [2, 1, 0, 3]]


def export_case(root: str, case_id: str, out_dir: str) -> dict[str, str]:
    """Write the case's arrays as NIfTI files in `out_dir`; returns {array name: path}."""
    import nibabel as nib

    store = Store(root)
    record = store.record(case_id)
    names = [n for n in ("pet", "ct", "seg") if n in record.get("arrays", ("pet", "ct"))]
    data = store.read(case_id, names)
    affine = nifti_affine(record["affine_zyx"])
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name in names:
        img = nib.Nifti1Image(data[name].transpose(2, 1, 0).astype(NIFTI_DTYPES[name]), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        img.header["descrip"] = f"petct {name} {case_id}"[:79].encode()
        path = os.path.join(out_dir, f"{name}.nii.gz")
        nib.save(img, path)
        written[name] = path
    return written


def run(args: argparse.Namespace) -> int:
    for name, path in export_case(args.store, args.case, args.out).items():
        print(f"{name}: {path}")
    return 0
