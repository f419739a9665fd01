"""Generating a whole cohort: output folder checks, the per-case loop, cohort sidecar."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from petct_jax.errors import PetctError
from petct_jax.output_paths import remove_recorded
from petct_jax.phantoms.centres import CENTRES, SIZES
from petct_jax.phantoms.study import case_table, plan_study, render_study
from petct_jax.phantoms.writers import (LAYOUTS, study_paths, study_record, write_dataset_json,
                                            write_json_atomic, write_preview, write_study)

SIDECAR = "phantoms.json"
# The sidecar's own temporary name (writers.write_json_atomic): ours too.
_SIDECAR_TMP = Path(SIDECAR).with_suffix(".json.tmp").name


def planned_outputs(seed: int, size: str, layout: str, preview: bool, table: list[tuple[int, int]]) -> list[str]:
    """Every file a cohort writes, relative to its folder, from the study plans alone (no rendering)."""
    names = [SIDECAR]
    if layout == "nnunet":
        names.append("dataset.json")
    for i, (p, s) in enumerate(table):
        names.extend(study_paths(plan_study(seed, SIZES[size], i, p, s), layout, preview).values())
    return names


def previous_outputs(out: Path) -> list[str]:
    """The files the phantom cohort in `out` wrote, from its sidecar: the `outputs` list it
    records before writing anything (so also after a crash), or for a complete sidecar of an
    older petct without that list, its studies' paths and previews."""
    path = out / SIDECAR
    try:
        side = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PetctError(f"refusing to overwrite {out}: {path} is unreadable ({type(e).__name__}: {e}), "
                         "so what the cohort wrote is unknown") from None
    if not isinstance(side, dict):
        raise PetctError(f"refusing to overwrite {out}: {path} is not a phantom cohort sidecar")
    if isinstance(side.get("outputs"), list):
        names = [n for n in side["outputs"] if isinstance(n, str)]
    elif side.get("status") == "complete" and isinstance(side.get("studies"), list):
        names = [SIDECAR] + (["dataset.json"] if side.get("layout") == "nnunet" else [])
        for rec in side["studies"]:
            names.extend(v for v in dict(rec.get("paths") or {}).values() if isinstance(v, str))
            if isinstance(rec.get("preview"), str):
                names.append(rec["preview"])
    else:
        raise PetctError(f"refusing to overwrite {out}: its {SIDECAR} is of an unfinished cohort that "
                         "does not list its files (an older petct); delete the folder by hand")
    return names + [SIDECAR, _SIDECAR_TMP]


def _prepare_output(out: Path, overwrite: bool, outputs: list[str]) -> None:
    """Make `out` ready for a cohort writing `outputs`. --overwrite removes only the files the
    previous cohort's sidecar lists (and the folders that leaves empty): a user's own files in
    the folder stay, and a cohort never writes over one."""
    if out.exists() and not out.is_dir():
        raise PetctError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PetctError(f"output directory {out} is not empty; pass --overwrite to replace a "
                             "previous phantom cohort")
        if not (out / SIDECAR).is_file():
            raise PetctError(f"refusing to overwrite {out}: it holds no {SIDECAR}, so it is not a "
                             "phantom cohort")
        previous = previous_outputs(out)
        ours = set(previous)
        for name in outputs:  # checked before removing anything: a refusal leaves the folder as it was
            if name not in ours and os.path.lexists(out / name):
                raise PetctError(f"refusing to overwrite {out / name}: the previous phantom cohort in "
                                 f"{out} did not write it")
        remove_recorded(out, previous)
    out.mkdir(parents=True, exist_ok=True)


def _make_case(job: tuple) -> dict:
    seed, size, index, patient, study, out, layout, preview = job
    plan = plan_study(seed, SIZES[size], index, patient, study)
    rendered = render_study(plan)
    paths = write_study(Path(out), plan, rendered, layout)
    pv = None
    if preview:
        (Path(out) / "previews").mkdir(exist_ok=True)
        pv = study_paths(plan, layout, preview=True)["preview"]  # as planned_outputs listed it
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
    table = case_table(seed, cases)
    outputs = planned_outputs(seed, size, layout, preview, table)
    _prepare_output(out, overwrite, outputs)
    header = {
        "generator": "petct-jax phantoms",
        "format_version": 1,
        "status": "incomplete",        # marks the folder as ours, so --overwrite works after a crash
        "seed": seed, "size": size, "layout": layout,
        # Every file this cohort writes, listed before the first is written: a later --overwrite
        # (also after a crash) removes exactly these, never a user's file in the same folder.
        "outputs": outputs,
    }
    write_json_atomic(out / SIDECAR, {**header, "studies": []})
    t0 = time.perf_counter()
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
