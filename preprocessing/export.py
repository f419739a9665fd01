"""`petct export`: write a harmonized case back to NIfTI, to look at it in ITK-SNAP or Slicer.

    petct export --store STORE --case ID --out DIR [--overwrite]

writes DIR/pet.nii.gz (SUV, float32), DIR/ct.nii.gz (HU, int16) and, for labelled
cases, DIR/seg.nii.gz (uint8). Existing files of those names are replaced only with
`--overwrite`; DIR may hold other files, which are never touched. DIR/.petct-outputs.json
records what export wrote, so an `--overwrite` export of an unlabelled case removes the
seg.nii.gz an earlier export wrote there (and no seg.nii.gz it did not write). DIR may not
be, or lie inside, the store itself. The store's arrays are indexed [z, y, x] with
`affine_zyx` mapping (z, y, x, 1) to RAS+ millimetres; NIfTI's data are indexed
[i, j, k], so the arrays are transposed to [x, y, z] and the affine's columns reordered
the same way. qform and sform both carry that affine (code 1, scanner), so every viewer
places the voxels where the source scan had them.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from petct_jax.errors import PetctError
from petct_jax.output_paths import (is_local, is_within, read_record, refuse_existing, remove_recorded,
                                    save_nifti, write_record)
from petct_jax.store import Store

NIFTI_DTYPES = {"pet": np.float32, "ct": np.int16, "seg": np.uint8}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", required=True, help="harmonized store (path or URL)")
    parser.add_argument("--case", required=True, help="case id (see `petct store-info`)")
    parser.add_argument("--out", required=True, help="folder to write the NIfTI files into")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace pet/ct/seg.nii.gz already in --out (other files there are kept)")


def nifti_affine(affine_zyx) -> np.ndarray:
    """The (i, j, k) = (x, y, z) affine of the transposed array."""
    return np.asarray(affine_zyx, dtype=np.float64)[:, [2, 1, 0, 3]]


def export_case(root: str, case_id: str, out_dir: str, overwrite: bool = False) -> dict[str, str]:
    """Write the case's arrays as NIfTI files in `out_dir`; returns {array name: path}.

    Refuses (PetctError, nothing written) an `out_dir` that is or lies in the store, and
    existing pet/ct/seg.nii.gz unless `overwrite`.
    """
    import nibabel as nib

    if is_local(root) and is_local(out_dir) and os.path.isdir(root) and is_within(out_dir, root):
        raise PetctError(f"--out {out_dir} lies in --store {root}: refusing to write into the store")
    store = Store(root)
    record = store.record(case_id)
    names = [n for n in ("pet", "ct", "seg") if n in record.get("arrays", ("pet", "ct"))]
    files = {name: f"{name}.nii.gz" for name in names}
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PetctError(f"--out {out_dir} exists and is not a folder")
    # An earlier export's file this case has no counterpart for (seg.nii.gz of a labelled case
    # before an unlabelled one) would be taken for this case's: it goes too, and only with
    # --overwrite, and only because the record says export wrote it.
    stale = [f for f in read_record(out_dir, "export") if f not in files.values()]
    refuse_existing([os.path.join(out_dir, f) for f in (*files.values(), *stale)], overwrite)
    data = store.read(case_id, names)  # before writing anything: a damaged case leaves no files
    affine = nifti_affine(record["affine_zyx"])
    os.makedirs(out_dir, exist_ok=True)
    remove_recorded(out_dir, stale)
    written = {}
    for name in names:
        img = nib.Nifti1Image(data[name].transpose(2, 1, 0).astype(NIFTI_DTYPES[name]), affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm")
        img.header["descrip"] = f"petct {name} {case_id}"[:79].encode()
        path = os.path.join(out_dir, files[name])
        save_nifti(img, path)
        written[name] = path
    write_record(out_dir, "export", files.values())
    return written


def run(args: argparse.Namespace) -> int:
    for name, path in export_case(args.store, args.case, args.out, overwrite=args.overwrite).items():
        print(f"{name}: {path}")
    return 0
