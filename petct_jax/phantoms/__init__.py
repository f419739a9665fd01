"""`petct phantoms`: a digital whole-body FDG PET/CT cohort generator.

Writes studies in the AutoPET NIfTI layout (`PETCT_<id>/<study>/{CT,CTres,PET,SUV,SEG}.nii.gz`)
or the nnU-Net raw layout (`imagesTr/<case>_0000|_0001.nii.gz`, `labelsTr/`, `dataset.json`),
plus a cohort sidecar `phantoms.json` with, per study, the patient, centre, SUV factor and the
lesions in world millimetres (RAS+), and the list of every file the cohort writes (recorded
before the first is written; `--overwrite` removes those and nothing else). The phantom is analytic in world coordinates and is
evaluated at each file's voxel centres, so every file's affine is right by construction;
centres differ in voxel sizes, fields of view, orientation, storage and noise.

Python API: `generate_cohort(out, cases, seed, layout="autopet", size="small", preview=False)`.
"""

from __future__ import annotations

import argparse
import time

from petct_jax.phantoms.centres import CENTRES, SIZES
from petct_jax.phantoms.cohort import SIDECAR, generate_cohort
from petct_jax.phantoms.writers import LAYOUTS

__all__ = ["generate_cohort", "add_arguments", "run", "SIZES", "CENTRES", "LAYOUTS", "SIDECAR"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True,
                        help="output directory (created; must be empty unless --overwrite)")
    parser.add_argument("--cases", type=int, default=24, help="number of studies (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--layout", choices=LAYOUTS, default="autopet",
                        help="autopet: PETCT_<id>/<study>/{CT,CTres,PET,SUV,SEG}.nii.gz; "
                             "nnunet: imagesTr/labelsTr/dataset.json (default autopet)")
    parser.add_argument("--size", choices=tuple(SIZES), default="small",
                        help="; ".join(f"{k}: {v.description}" for k, v in SIZES.items())
                        + " (default small)")
    parser.add_argument("--preview", action="store_true", help="write previews/<case>.png per study")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the phantom cohort in --out: removes only the files its "
                             "phantoms.json lists; other files there are kept")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    records = generate_cohort(args.out, args.cases, seed=args.seed, layout=args.layout, size=args.size,
                              preview=args.preview, overwrite=args.overwrite, workers=args.workers,
                              progress=not args.quiet)
    patients = len({r["patient_id"] for r in records})
    free = sum(r["tumour_free"] for r in records)
    lesions = sum(r["n_lesions"] for r in records)
    print(f"wrote {len(records)} studies of {patients} patients ({free} tumour-free, {lesions} lesions) "
          f"to {args.out} in {time.perf_counter() - t0:.1f} s [{args.layout}, {args.size}]")
    return 0
