"""Generating a whole cohort: output folder checks, the per-case loop, cohort sidecar."""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from petct_jax.errors import PetctError
from petct_jax.phantoms.centres import CENTRES, SIZES
from petct_jax.phantoms.study import case_table, plan_study, render_study
from petct_jax.phantoms.writers import (LAYOUTS, study_record, write_dataset_json, write_json_atomic,
                                            write_preview, write_study)

SIDECAR = "phantoms.json"


def _prepare_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise PetctError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PetctError(f"output directory {out} is not empty; pass --overwrite to replace a "
                             "previous phantom cohort")
        if not (out / SIDECAR).is_file():
            raise PetctError(f"refusing to overwrite {out}: it holds no {SIDECAR}, so it is not a "
                             "phantom cohort")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _make_case(job: tuple) -> dict:
    seed, size, index, patient, study, out, layout, preview = job
    plan = plan_study(seed, SIZES[size], index, patient, study)
    rendered = render_study(plan)
    paths = write_study(Path(out), plan, rendered, layout)
    pv = None
    if preview:
        (Path(out) / "previews").mkdir(exist_ok=True)
        pv = f"previews/{plan.case}.png"
        write_preview(Path(out) / pv, plan, rendered)
    return study_record(plan, rendered, paths, layout, pv)


def generate_cohort(out: str | os.PathLike, cases: int, seed: int = 0, layout: str = "autopet",
                    size: str = "small", preview: bool = False, overwrite: bool = False,
                    workers: int = 1, progress: bool = True) -> list[dict]:
    """Write a phantom cohort of `cases` studies to `out`; returns the per-study sidecar records.

    Case i depends only on (seed, i): a larger cohort with the same seed starts with the same
    studies, and arrays are byte-identical between runs (also with several workers).
    """
    if isinstance(cases, bool) or not isinstance(cases, int) or cases < 1:
        raise PetctError(f"--cases must be a positive integer (got {cases!r})")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PetctError(f"--seed must be a non-negative integer (got {seed!r})")
    if layout not in LAYOUTS:
        raise PetctError(f"--layout must be one of {', '.join(LAYOUTS)} (got {layout!r})")
    if size not in SIZES:
        raise PetctError(f"--size must be one of {', '.join(SIZES)} (got {size!r})")
    if workers < 1:
        raise PetctError(f"--workers must be >= 1 (got {workers})")
    out = Path(out)
    _prepare_output(out, overwrite)
    header = {
        "generator": "petct-jax phantoms",
        "format_version": 1,
        "status": "incomplete",        # marks the folder as ours, so --overwrite works after a crash
        "seed": seed, "size": size, "layout": layout,
    }
    write_json_atomic(out / SIDECAR, {**header, "studies": []})
    t0 = time.perf_counter()
    table = case_table(seed, cases)
    jobs = [(seed, size, i, p, s, str(out), layout, preview) for i, (p, s) in enumerate(table)]
    from tqdm import tqdm
    bar = tqdm(total=len(jobs), desc="phantoms", unit="case", file=sys.stderr, disable=not progress)
    records: list[dict] = []
    if workers == 1 or len(jobs) == 1:
        for job in jobs:
            records.append(_make_case(job))
            bar.update()
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=mp.get_context("spawn")) as ex:
            for rec in ex.map(_make_case, jobs):
                records.append(rec)
                bar.update()
    bar.close()
    # studies per patient within this cohort (the last patient may be cut short)
    counts: dict[str, int] = {}
    for rec in records:
        counts[rec["patient_id"]] = counts.get(rec["patient_id"], 0) + 1
    for rec in records:
        rec["patient_studies"] = counts[rec["patient_id"]]
    if len({(r["patient_id"], r["study_number"]) for r in records}) != len(records):
        raise PetctError("patient id collision; use another --seed")  # pragma: no cover
    if layout == "nnunet":
        write_dataset_json(out, len(records))
    sidecar = {
        **header,
        "status": "complete",
        "cases": len(records), "patients": len(counts),
        "coordinates": "world millimetres, RAS+ (NIfTI/nibabel): +x = patient's right, "
                       "+y = anterior, +z = superior; affines map voxel indices to these",
        "suv": "SUV = PET [Bq/mL] * suv_factor (body-weight SUV, decay-corrected to scan start)",
        "seg": "lesion mask (0/1) on the PET grid",
        "centres": {c.name: {"description": c.description, "axcodes": c.axcodes,
                             "pet_fwhm_mm": c.pet_fwhm} for c in CENTRES},
        "seconds": round(time.perf_counter() - t0, 2),
        "studies": records,
    }
    write_json_atomic(out / SIDECAR, sidecar)
    return records
