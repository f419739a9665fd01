"""`petct store-info STORE`: what a harmonized store holds, per cohort.

Prints cases, patients, labelled cases, lesions, bytes and spacing per cohort, the
failures not since fixed (no committed case of that id and cohort), and case folders without a manifest
line (interrupted writes, rewritten by the next `petct preprocess`). `--json` prints
the same as one JSON object.

Every committed array is opened and checked against the manifest (its data file exists,
dtype and shape as recorded); `--verify` also reads every chunk (each carries a crc32c)
and compares each array's content with the sha256 digest recorded when it was written.
Each damaged case and array is named, and the exit status is 1 if any is.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

from petct_jax import store
from petct_jax.errors import PetctError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="harmonized store (path or URL)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead")
    parser.add_argument("--verify", action="store_true",
                        help="read every chunk and check every array's content digest")


def _totals(records: list[dict]) -> dict:
    return {
        "cases": len(records),
        "patients": len({r["patient_id"] for r in records}),
        "labelled": sum(bool(r.get("has_label")) for r in records),
        "lesions": sum(int(r.get("lesion_count", 0)) for r in records),
        "lesion_volume_ml": round(sum(float(r.get("lesion_volume_ml", 0.0)) for r in records), 3),
        "bytes": sum(int(r.get("bytes", 0)) for r in records),
        "with_warnings": sum(bool(r.get("warnings")) for r in records),
    }


def check_arrays(root: str, full: bool) -> dict[str, list[str]]:
    """{case id: its problems} for the damaged cases: opened and checked against the manifest,
    with `full` every chunk read and every digest compared (`Store.verify`)."""
    s = store.Store(root)
    damaged = {}
    for case_id in s.ids:
        if full:
            problems = s.verify(case_id)
        else:
            problems = []
            for name in s.record(case_id).get("arrays", store.ARRAY_DTYPES):
                try:
                    s.array(case_id, name)
                except PetctError as e:
                    problems.append(str(e))
        unchecked = [p for p in problems if "no digest in the manifest" in p]
        if len(unchecked) < len(problems):
            damaged[case_id] = problems
    return damaged


def store_summary(root: str, verify: bool = False) -> dict:
    info = store.read_info(root)
    records = store.read_manifest(root)
    committed = {r["id"] for r in records}
    committed_from = {(r["id"], r.get("cohort")) for r in records}
    by_cohort: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_cohort[r["cohort"]].append(r)
    outstanding = {}
    for f in store.read_failures(root):  # fixed once the same case of the same cohort is in
        if (f.get("id"), f.get("cohort")) not in committed_from:
            outstanding[(f.get("id"), f.get("cohort"), f.get("file"))] = f  # latest per case
    uncommitted = []
    cases_dir = os.path.join(root, "cases")
    if not store.is_url(root) and os.path.isdir(cases_dir):
        uncommitted = sorted(d for d in os.listdir(cases_dir) if d not in committed)
    return {
        "store": root,
        "format_version": info.get("format_version"),
        "spacing_zyx": info.get("spacing_zyx"),
        "chunk_zyx": info.get("chunk_zyx"),
        **_totals(records),
        "cohorts": {name: _totals(recs) for name, recs in sorted(by_cohort.items())},
        "failures": list(outstanding.values()),
        "uncommitted": uncommitted,
        "verified": "content" if verify else "structure",
        "damaged": check_arrays(root, full=verify),
    }


def _bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def run(args: argparse.Namespace) -> int:
    s = store_summary(args.store, verify=args.verify)
    status = 1 if s["damaged"] else 0
    if args.json:
        print(json.dumps(s, sort_keys=True))
        return status
    spacing = " x ".join(f"{v:g}" for v in s["spacing_zyx"])
    print(f"store {s['store']}: format {s['format_version']}, spacing {spacing} mm (z, y, x), "
          f"chunks {'x'.join(str(c) for c in s['chunk_zyx'])}")
    print(f"{s['cases']} cases, {s['patients']} patients, {len(s['cohorts'])} cohorts, "
          f"{s['labelled']} labelled, {s['lesions']} lesions ({s['lesion_volume_ml']:.1f} mL), "
          f"{_bytes(s['bytes'])}")
    if s["cohorts"]:
        print(f"  {'cohort':<24} {'cases':>7} {'patients':>8} {'labelled':>8} {'lesions':>8} "
              f"{'bytes':>10}")
        for name, c in s["cohorts"].items():
            print(f"  {name:<24} {c['cases']:>7} {c['patients']:>8} {c['labelled']:>8} "
                  f"{c['lesions']:>8} {_bytes(c['bytes']):>10}")
    if s["with_warnings"]:
        print(f"{s['with_warnings']} cases carry warnings (see 'warnings' in their manifest records)")
    print(f"{len(s['failures'])} failures" + (":" if s["failures"] else ""))
    for f in s["failures"]:
        print(f"  {f.get('id')}: {f.get('error')}" + (f": {f['file']}" if f.get("file") else ""))
    if s["uncommitted"]:
        print(f"{len(s['uncommitted'])} case folders without a manifest line (interrupted writes; "
              f"the next `petct preprocess` rewrites them): {', '.join(s['uncommitted'][:5])}"
              + (" ..." if len(s["uncommitted"]) > 5 else ""))
    checked = ("every chunk read and every digest compared" if s["verified"] == "content"
               else "arrays opened and checked against the manifest; --verify reads every chunk")
    if s["damaged"]:
        print(f"{len(s['damaged'])} damaged cases ({checked}):")
        for case_id, problems in s["damaged"].items():
            for problem in problems:
                print(f"  {problem}")
    else:
        print(f"no damaged case ({checked})")
    return status
