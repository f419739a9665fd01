"""Patient-level subsets of a store's scans: label fractions, k-shot, k-fold, train/val/test,
and the reference's split CSV and JSON split files.

Every function takes manifest records (`store.records`, or those of a pool) and works on
whole patients (`record["patient_id"]`): a patient's scans always land on the same side.
Selections are deterministic for a seed and independent of the records' order
(patients are sorted by id before the seeded permutation).

Conventions (documented choices):
* label fraction: the target is a number of SCANS (the paper: 10% = 70 of 700 scans);
  whole patients are taken in a seeded order until the count reaches the target, as the
  reference does. The count may overshoot by a multi-scan patient's extra scans; in
  exchange, subsets of one seed are nested (10% within 30% within 100%).
* k-shot: k PATIENTS with at least one lesion, one lesion-bearing scan each (drawn with
  the seed); `all_scans=True` takes all their scans instead.
* k-fold and train/val/test: patients are dealt so that scan counts balance.
* a split file that already encodes a label fraction (`encoded_label_fraction`): the
  reference's `autopet_seg_split_<N>pct.csv` with N < 100 (its N% subset of the 700-scan
  pool: 70 scans for 10%, 210 for 30%), or a JSON split written by a fraction run
  (`W/split.json` with a non-empty "unused"). Its training scans ARE the labelled subset:
  read it with label fraction 1, never a fraction of it. The reference's 100% file with a
  fraction below 1 draws this project's own subset, which is not the reference's (10%: 4 of
  70 scans in common with its 10% file).
"""

from __future__ import annotations

import csv
import json
import os
import re
from typing import Iterable, Mapping, Sequence

import numpy as np

from petct_jax.errors import PetctError

SPLIT_NAMES = ("train", "val", "test")


def patients(records: Iterable[Mapping]) -> dict[str, list[str]]:
    """patient_id -> that patient's scan ids (sorted), patients sorted."""
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(str(r["patient_id"]), []).append(r["id"])
    return {p: sorted(out[p]) for p in sorted(out)}


def _shuffled_patients(records: Iterable[Mapping], seed: int) -> list[tuple[str, list[str]]]:
    by_patient = list(patients(records).items())
    order = np.random.default_rng(seed).permutation(len(by_patient))
    return [by_patient[i] for i in order]


def check_no_leakage(splits: Mapping[str, Iterable[str]], records: Iterable[Mapping],
                     ignore: Sequence[str] = ("unused",)) -> None:
    """Raise PetctError if a scan is unknown or a patient appears in two splits."""
    patient_of = {r["id"]: str(r["patient_id"]) for r in records}
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        if name in ignore:
            continue
        for case_id in ids:
            if case_id not in patient_of:
                raise PetctError(f"split {name!r}: no case {case_id!r} in the store")
            patient = patient_of[case_id]
            other = seen.setdefault(patient, name)
            if other != name:
                raise PetctError(f"patient {patient!r} is in both the {other!r} and the {name!r} split "
                                 f"(case {case_id!r})")


def label_fraction(records: Iterable[Mapping], fraction: float | None = None, *,
                   n_scans: int | None = None, seed: int = 0) -> list[str]:
    """Scans of whole patients, `fraction` of the pool's scans (or `n_scans`).

    A fraction rounds down (10% of 700 = 70, as in the paper) but never below one scan.
    """
    records = list(records)
    if (fraction is None) == (n_scans is None):
        raise PetctError("label_fraction: give exactly one of fraction or n_scans")
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise PetctError(f"label fraction {fraction}: must lie in (0, 1]")
        n_scans = max(int(fraction * len(records) + 1e-9), 1)
    if not 0 < n_scans <= len(records):
        raise PetctError(f"label_fraction: {n_scans} scans requested from a pool of {len(records)}")
    chosen: list[str] = []
    for _, scans in _shuffled_patients(records, seed):
        if len(chosen) >= n_scans:
            break
        chosen.extend(scans)
    return sorted(chosen)


def _has_lesion(record: Mapping) -> bool:
    return bool(record.get("has_label", True)) and (
        int(record.get("lesion_count") or 0) > 0 or bool(record.get("lesions")))


def k_shot(records: Iterable[Mapping], k: int, *, seed: int = 0, all_scans: bool = False) -> list[str]:
    """k patients with lesions; one lesion-bearing scan each (or all their scans)."""
    records = list(records)
    lesion_scans = {r["id"] for r in records if _has_lesion(r)}
    rng = np.random.default_rng([seed, k])
    chosen: list[str] = []
    taken = 0
    for _, scans in _shuffled_patients(records, seed):
        with_lesion = [s for s in scans if s in lesion_scans]
        if not with_lesion:
            continue
        chosen.extend(scans if all_scans else [with_lesion[int(rng.integers(len(with_lesion)))]])
        taken += 1
        if taken == k:
            return sorted(chosen)
    raise PetctError(f"{k}-shot: only {taken} patients with lesions among {len(records)} scans")


def _deal(records: Sequence[Mapping], n_groups: int, seed: int) -> list[list[str]]:
    """Deal patients (largest first, seeded order among equals) to the group with fewest scans."""
    groups: list[list[str]] = [[] for _ in range(n_groups)]
    shuffled = _shuffled_patients(records, seed)
    for _, scans in sorted(shuffled, key=lambda item: -len(item[1])):  # stable: seeded ties
        target = min(range(n_groups), key=lambda g: (len(groups[g]), g))
        groups[target].extend(scans)
    return [sorted(g) for g in groups]


def kfold(records: Iterable[Mapping], k: int = 5, *, seed: int = 0) -> list[dict[str, list[str]]]:
    """Patient-level k-fold: [{"train": ids, "val": ids}] for each fold."""
    records = list(records)
    if not 2 <= k <= len(patients(records)):
        raise PetctError(f"{k}-fold: need 2 <= k <= number of patients ({len(patients(records))})")
    folds = _deal(records, k, seed)
    return [{"train": sorted(i for j, f in enumerate(folds) if j != n for i in f), "val": fold}
            for n, fold in enumerate(folds)]


def train_val_test(records: Iterable[Mapping], *, val: float = 0.1, test: float = 0.2,
                   seed: int = 0) -> dict[str, list[str]]:
    """Patient-level split; `val` and `test` are shares of the scans (0 leaves one empty)."""
    records = list(records)
    if val < 0 or test < 0 or val + test >= 1:
        raise PetctError(f"train_val_test: val={val}, test={test} must be >= 0 and sum below 1")
    targets = {"test": int(round(test * len(records))), "val": int(round(val * len(records)))}
    out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for _, scans in _shuffled_patients(records, seed):
        name = next((n for n in ("test", "val") if len(out[n]) < targets[n]), "train")
        out[name].extend(scans)
    return {n: sorted(v) for n, v in out.items()}


# ---------------------------------------------------------------------------
# Split files.

def read_split_json(path: str, records: Iterable[Mapping] | None = None) -> dict[str, list[str]]:
    """{"train": [ids], "val": [...], "test": [...]} (other keys kept); checked against
    `records` when given (known ids, no patient in two splits)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PetctError(f"{path}: cannot read split JSON ({e})") from None
    if not isinstance(data, dict) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in data.values()):
        raise PetctError(f'{path}: expected {{"train": [ids], "val": [ids], "test": [ids]}}')
    if records is not None:
        check_no_leakage(data, records)
    return {k: list(v) for k, v in data.items()}


def write_split_json(path: str, splits: Mapping[str, Iterable[str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump({k: sorted(v) for k, v in splits.items()}, f, indent=1)
        f.write("\n")


_PATIENT_TOKEN = re.compile(r"(?:PETCT|fdg)_([0-9a-fA-F]{6,})")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _dir_parts(path: str) -> list[str]:
    return [p for p in str(path).replace("\\", "/").split("/") if p not in ("", ".")]


def _study_key(patient_hint: str, study_dir: str) -> tuple | None:
    """AutoPET scans named two ways: PETCT_<hash>/<study>/ (the release) and
    fdg_<hash>_<study>/ or fdg_<hash>_Nscans/<study>/ (the reference's renaming)."""
    m = _PATIENT_TOKEN.search(patient_hint) or _PATIENT_TOKEN.search(study_dir)
    if not m:
        return None
    study = re.sub(r"^(?:PETCT|fdg)_[0-9a-fA-F]+_", "", study_dir)
    return ("study", m.group(1).lower(), _norm(study))


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, Mapping):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


def _record_keys(record: Mapping) -> set[tuple]:
    keys = {("id", _norm(record["id"]))}
    for path in _strings(record.get("sources")):
        parts = _dir_parts(path)[:-1]  # the scan's directory
        if not parts:
            continue
        keys.add(("dir", _norm(parts[-1])))
        keys.add(("dir2", _norm("/".join(parts[-2:]))))
        key = _study_key(str(record.get("patient_id", "")) + " " + "/".join(parts[-2:]), parts[-1])
        if key:
            keys.add(key)
    return keys


def _row_keys(row: Mapping[str, str]) -> list[tuple]:
    rel = _dir_parts(row.get("scan_rel_path") or "")
    if not rel and row.get("pet_path"):
        rel = _dir_parts(row["pet_path"])[:-1]
    keys: list[tuple] = []
    if len(rel) >= 2:
        keys.append(("dir2", _norm("/".join(rel[-2:]))))
    if rel:
        study = _study_key(row.get("subject_id", "") + " " + "/".join(rel), rel[-1])
        if study:
            keys.append(study)
        keys.append(("dir", _norm(rel[-1])))
        keys.append(("id", _norm("/".join(rel))))
        keys.append(("id", _norm(rel[-1])))
    for col in ("scan_id", "subject_id"):
        if row.get(col):
            keys.append(("id", _norm(row[col])))
    return keys


def _yes(value: str | None) -> bool:
    return str(value or "").strip().lower() in ("yes", "y", "true", "1")


def _row_split(row: Mapping[str, str], default: str) -> str:
    if _yes(row.get("is_test")):
        return "test"  # the reference's "val_test" rows: kept out of validation
    if _yes(row.get("is_val")):
        return "val"
    split = str(row.get("split") or "").strip().lower()
    return {"train": "train", "val": "val", "validation": "val", "test": "test"}.get(
        split, "unused" if split else default)


def read_split_csv(path: str, records: Iterable[Mapping], *, default_split: str = "test",
                   strict: bool = True) -> dict[str, list[str]]:
    """The reference's split CSV (`index,subject_id,scan_id,scan_rel_path,pet_path,ct_path,
    seg_path,split,is_val,is_test`) as store ids: {"train", "val", "test", "unused"}.

    Rows map to records through the records' `sources` paths (scan directory, or the
    AutoPET patient hash + study directory, which match both the original release and the
    reference's renamed folders), else through ids equal to `scan_id` or the scan's
    folder. Rows with is_test = yes go to "test" (the reference's "val_test" rows; they are
    not also used for validation), is_val = yes to "val", split = train to "train", other
    split values to "unused"; files without split columns (the reference's test list)
    put every row in `default_split`. Unmatched rows raise PetctError when `strict`.
    """
    records = list(records)
    index: dict[tuple, set[str]] = {}
    for r in records:
        for key in _record_keys(r):
            index.setdefault(key, set()).add(r["id"])
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise PetctError(f"{path}: cannot read split CSV ({e})") from None
    if rows and not ({"scan_rel_path", "scan_id", "pet_path"} & set(rows[0])):
        raise PetctError(f"{path}: not a split CSV (no scan_rel_path / scan_id / pet_path column)")
    out: dict[str, list[str]] = {"train": [], "val": [], "test": [], "unused": []}
    unmatched = []
    for n, row in enumerate(rows, 2):
        match = next((index[k] for k in _row_keys(row) if len(index.get(k, ())) == 1), None)
        if match is None:
            unmatched.append((n, row.get("scan_rel_path") or row.get("scan_id")))
            continue
        out[_row_split(row, default_split)].append(next(iter(match)))
    if unmatched and strict:
        line, name = unmatched[0]
        raise PetctError(f"{path}: {len(unmatched)} of {len(rows)} rows match no case of the store "
                         f"(first: line {line}, {name!r})")
    check_no_leakage(out, records)
    return {k: sorted(set(v)) for k, v in out.items()}


_PERCENT_IN_NAME = re.compile(r"(?<![0-9])([0-9]{1,3})pct", re.IGNORECASE)


def encoded_label_fraction(path: str, splits: Mapping[str, Sequence[str]]) -> float | None:
    """The label fraction split file `path` (read as `splits`) already applies, or None.

    A CSV named like the reference's `..._<N>pct.csv` encodes N% when N < 100; a JSON split
    with a non-empty "unused" list (pool scans a fraction run left out) encodes
    train / (train + unused). Anything else encodes none.
    """
    name = os.path.basename(path)
    if name.lower().endswith(".csv"):
        m = _PERCENT_IN_NAME.search(name)
        return int(m.group(1)) / 100 if m and 0 < int(m.group(1)) < 100 else None
    if name.lower().endswith(".json") and splits.get("unused"):
        n_train = len(splits.get("train", ()))
        return n_train / (n_train + len(splits["unused"]))
    return None


def read_splits(path: str, records: Iterable[Mapping]) -> dict[str, list[str]]:
    """A split file by extension: .json or .csv."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".json":
        return read_split_json(path, records)
    if ext == ".csv":
        return read_split_csv(path, records)
    raise PetctError(f"{path}: split files are .json or .csv")
