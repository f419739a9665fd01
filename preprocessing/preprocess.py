"""`petct preprocess`: harmonize raw PET/CT cohorts into a TensorStore zarr3 store.

    petct preprocess --input RAW --out STORE [--layout auto|autopet|nnunet|csv]
                     [--spacing 3,2,2] [--workers N] [--cohort NAME] [--overwrite]
                     [--patient-regex REGEX] [--id-prefix TEXT] [--max-voxels N]
                     [--plausibility error|warn|off[,CHECK=LEVEL...]]

Cases run in parallel in worker processes started by 'spawn' (TensorStore is not
fork-safe). A worker reads, harmonizes (preprocessing/harmonize.py) and writes the
arrays of one case; the parent alone appends manifest and failure lines, so a case
becomes visible only once completely written. Several cohorts can be appended to one
store (the cohort name defaults to the input folder's name); re-running skips cases
already committed (`--overwrite` redoes them) and retries failed ones. A case that
cannot be harmonized is reported on one line naming the case and the file, recorded in
STORE/failures.jsonl, and the rest of the cohort goes on; the exit status is 1 when any
case failed.

Before anything is read, each image's header is checked against its file's size and
`--max-voxels` (harmonize.check_claimed_size); scans that are not what they claim to be
(PET/CT swapped, CT without its offset, same scan under two ids...) are refused by the
checks of preprocessing/plausibility.py, whose levels `--plausibility` sets.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import os
import sys
import time
import traceback
from typing import Sequence

from tqdm import tqdm

from petct_jax import store
from petct_jax.errors import PetctError
from petct_jax.folder_lock import folder_lock
from petct_jax.parent_watch import exit_with_parent, orphaned
from petct_jax.preprocessing import plausibility as checks
from petct_jax.preprocessing.harmonize import (DEFAULT_MAX_VOXELS, DEFAULT_SPACING_ZYX, PRESETS,
                                               CaseError, harmonize, sha256)
from petct_jax.preprocessing.readers import LAYOUTS, CaseSpec, list_cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True,
                        help="raw cohort: AutoPET folder, nnU-Net raw folder, or a CSV case list")
    parser.add_argument("--out", required=True, help="store to create or append to (path or URL)")
    parser.add_argument("--layout", default="auto", choices=("auto", *LAYOUTS),
                        help="input layout (default: detected)")
    parser.add_argument("--spacing", default=",".join(f"{s:g}" for s in DEFAULT_SPACING_ZYX),
                        help="target voxel size z,y,x in mm (default %(default)s)")
    parser.add_argument("--preset", default="canonical", choices=PRESETS,
                        help="harmonization: canonical (through the affines, physically exact; "
                             "default) or reference (the authors' code: rounded voxel sizes, their "
                             "array order and zoom; for their released weights); recorded in "
                             "store.json, one preset per store")
    parser.add_argument("--workers", type=int, default=None,
                        help="parallel processes (default: CPU count, at most 8; each needs "
                             "about 1 GB for a whole-body scan with a 512x512 CT)")
    parser.add_argument("--cohort", default=None,
                        help="cohort name recorded per case (default: the input folder's name)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo cases already in the store (default: skip them)")
    parser.add_argument("--patient-regex", default=None,
                        help="nnU-Net layout: regex on the case name whose group 'patient' (or "
                             "group 1) is the patient id (default: drop a trailing _<digits>)")
    parser.add_argument("--id-prefix", default="",
                        help="prefix for case ids (to merge cohorts whose case names collide)")
    parser.add_argument("--max-voxels", default=f"{DEFAULT_MAX_VOXELS:g}",
                        help="refuse an image whose header claims more voxels (default "
                             "%(default)s: checked before any voxel is read)")
    checks.add_argument(parser, checks.CHECKS, "warn,ct_range=off")


def parse_max_voxels(text: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise PetctError(f"--max-voxels {text!r}: expected a positive whole number (e.g. 1.5e9)")
    return int(value)


def parse_spacing(text: str) -> tuple[float, float, float]:
    try:
        values = [float(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if len(values) == 1:
        values *= 3
    if len(values) != 3 or not all(v > 0 for v in values):
        raise PetctError(f"--spacing {text!r}: expected three positive numbers z,y,x in mm")
    return tuple(values)


@dataclasses.dataclass
class Summary:
    committed: list[str]
    skipped: list[str]
    failures: list[dict]
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failures and not self.interrupted


def process_case(spec: CaseSpec, root: str, spacing_zyx: Sequence[float],
                 chunk_zyx: Sequence[int], max_voxels: int,
                 plausibility: dict[str, str], preset: str = "canonical") -> tuple[str, dict]:
    """Harmonize and write one case (runs in a worker): ("ok", record) or ("failed", failure).

    Failures come back as plain dicts: an exception would have to survive pickling.
    """
    start = time.perf_counter()
    try:
        arrays, record = harmonize(spec, spacing_zyx, max_voxels=max_voxels,
                                   plausibility=plausibility, preset=preset)
        if orphaned():  # the run is over: another may hold the store's lock by now
            os._exit(1)
        record["bytes"] = store.write_case(root, spec.id, arrays, chunk_zyx)
        record["seconds"] = round(time.perf_counter() - start, 3)
        return "ok", record
    except CaseError as e:
        return "failed", _failure(spec, e.problem, e.file)
    except PetctError as e:
        return "failed", _failure(spec, str(e), spec.pet)
    except Exception as e:  # a bug or resource problem must not stop the cohort
        where = traceback.extract_tb(e.__traceback__)[-1]
        return "failed", _failure(spec, f"internal error {type(e).__name__}: {e} "
                                        f"(at {os.path.basename(where.filename)}:{where.lineno})",
                                  spec.pet)


def _failure(spec: CaseSpec, problem: str, file: str | None) -> dict:
    return {"id": spec.id, "cohort": spec.cohort, "error": problem, "file": file,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def failure_line(f: dict) -> str:
    return f"{f['id']}: {f['error']}" + (f": {f['file']}" if f.get("file") else "")


def preprocess(input_path: str, root: str, *, layout: str = "auto",
               spacing_zyx: Sequence[float] = DEFAULT_SPACING_ZYX, workers: int | None = None,
               cohort: str | None = None, overwrite: bool = False,
               patient_regex: str | None = None, id_prefix: str = "",
               max_voxels: int = DEFAULT_MAX_VOXELS, plausibility: dict[str, str] | None = None,
               preset: str = "canonical", progress: bool = True) -> Summary:
    """Harmonize every case of one raw cohort into the store at `root` (one run at a time
    per store: a second is refused while the first runs). `plausibility`: the level of
    each check (plausibility.parse_levels; None: all errors)."""
    if preset not in PRESETS:
        raise PetctError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
    specs = list_cases(input_path, layout, cohort, patient_regex, id_prefix)
    levels = plausibility or checks.default_levels()
    # Refuse a folder that is not a store of this kind before the lock file goes into it;
    # store.create checks again under the lock.
    store.check_target(root, spacing_zyx=spacing_zyx, harmonization={"preset": preset})
    with folder_lock(root, "petct preprocess"):
        return _preprocess(specs, root, spacing_zyx, workers, overwrite, progress, max_voxels, levels,
                           preset)


def _preprocess(specs: list[CaseSpec], root: str, spacing_zyx: Sequence[float], workers: int | None,
                overwrite: bool, progress: bool, max_voxels: int, levels: dict[str, str],
                preset: str) -> Summary:
    info = store.create(root, spacing_zyx=spacing_zyx, harmonization={"preset": preset})
    committed_before = {r["id"]: r for r in store.read_manifest(root)}

    summary = Summary(committed=[], skipped=[], failures=[])
    todo: list[CaseSpec] = []
    for spec in specs:
        prior = committed_before.get(spec.id)
        if spec.error is None and prior is not None and not overwrite:
            if prior.get("cohort") == spec.cohort:
                summary.skipped.append(spec.id)
                continue
            spec = dataclasses.replace(
                spec, error=f"duplicate case id: already in the store from cohort "
                            f"{prior.get('cohort')!r} (use --id-prefix)", error_file=spec.pet)
        if spec.error is not None:
            _record(root, summary, _failure(spec, spec.error, spec.error_file), None)
            continue
        todo.append(spec)
    if levels["duplicate"] != "off":
        todo = _drop_duplicates(todo, committed_before.values(), levels["duplicate"], root, summary)

    bar = tqdm(total=len(todo), unit="scan", desc=specs[0].cohort, disable=not progress,
               file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # logs get a line per 30 s
    args = (root, tuple(spacing_zyx), tuple(info["chunk_zyx"]), max_voxels, dict(levels), preset)
    workers = max(1, min(workers or min(os.cpu_count() or 1, 8), len(todo) or 1))
    try:
        if workers == 1:
            for spec in todo:
                _finish(root, summary, *process_case(spec, *args), bar)
        else:
            _run_pool(todo, args, workers, root, summary, bar)
    except KeyboardInterrupt:
        summary.interrupted = True
        bar.write("petct preprocess: interrupted; committed cases are kept, re-run to continue")
    finally:
        bar.close()
    return summary


def _drop_duplicates(todo: list[CaseSpec], committed, level: str, root: str,
                     summary: Summary) -> list[CaseSpec]:
    """The duplicate check, here in the parent before any case is dispatched: workers hash
    their sources in parallel (no one of them sees the others), and `--overwrite` replaces
    a committed case whose hash would then be gone. Errors fail the case; warnings go
    into its record."""
    found = checks.duplicates(todo, committed, sha256)
    kept = []
    for spec in todo:
        if spec.id not in found:
            kept.append(spec)
            continue
        message, file = found[spec.id]
        if level == "error":
            _record(root, summary, _failure(spec, f"PET fails plausibility: [duplicate] {message} "
                                                  f"(--plausibility duplicate=warn|off to accept)",
                                            file), None)
        else:
            warning = f"plausibility warning [duplicate]: {message}"
            print(_warning_line(spec.id, warning), file=sys.stderr)
            kept.append(dataclasses.replace(spec, warnings=spec.warnings + (warning,)))
    return kept


def _warning_line(case_id: str, warning: str) -> str:
    """"plausibility warning [CHECK]: text" -> "plausibility warning [CHECK] case ID: text"."""
    return warning.replace("]: ", f"] case {case_id}: ", 1)


def _run_pool(todo: list[CaseSpec], args: tuple, workers: int, root: str, summary: Summary,
              bar: tqdm) -> None:
    # Workers end with this process: killed outright, it would leave them running a case
    # that the next run redoes.
    pool = cf.ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent,
                                  initargs=(os.getpid(),), mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = {pool.submit(process_case, spec, *args): spec for spec in todo}
        for future in cf.as_completed(futures):
            try:
                status, result = future.result()
            except cf.process.BrokenProcessPool:
                summary.interrupted = True
                bar.write("petct preprocess: a worker process died (killed, or out of memory?); "
                          "committed cases are kept; re-run, perhaps with fewer --workers")
                break
            _finish(root, summary, status, result, bar)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(root: str, summary: Summary, status: str, result: dict, bar: tqdm) -> None:
    if status == "ok":
        store.commit_case(root, result)  # the commit point: the case is now visible
        summary.committed.append(result["id"])
        for w in result.get("warnings", []):
            # duplicate warnings were printed by the parent before dispatch
            if w.startswith("plausibility warning [") and "[duplicate]" not in w:
                bar.write(_warning_line(result["id"], w), file=sys.stderr)
    else:
        _record(root, summary, result, bar)
    bar.update(1)
    bar.set_postfix(failed=len(summary.failures), refresh=False)


def _record(root: str, summary: Summary, failure: dict, bar: tqdm | None) -> None:
    store.record_failure(root, failure)
    summary.failures.append(failure)
    message = "FAILED " + failure_line(failure)
    if bar is not None:
        bar.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    summary = preprocess(
        args.input, args.out, layout=args.layout, spacing_zyx=parse_spacing(args.spacing),
        workers=args.workers, cohort=args.cohort, overwrite=args.overwrite,
        patient_regex=args.patient_regex, id_prefix=args.id_prefix,
        max_voxels=parse_max_voxels(args.max_voxels),
        plausibility=checks.parse_levels(args.plausibility), preset=args.preset)
    print(f"petct preprocess: {len(summary.committed)} committed, {len(summary.skipped)} already "
          f"in the store, {len(summary.failures)} failed -> {args.out}")
    if summary.failures:
        print(f"failures (also in {args.out}/failures.jsonl):")
        for f in summary.failures:
            print(f"  {failure_line(f)}")
    if summary.interrupted:
        return 130
    return 1 if summary.failures else 0
