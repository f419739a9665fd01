"""Patient-level subsets and split files (petct_jax.data.splits)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from petct_jax.data import splits
from petct_jax.errors import PetctError


def _records(n_patients=40, seed=0):
    """Patients with 1-3 scans, about half of the scans with lesions."""
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        for s in range(int(rng.choice([1, 1, 1, 2, 3]))):
            lesions = int(rng.integers(0, 3))
            out.append({"id": f"p{p:03d}_s{s}", "patient_id": f"p{p:03d}", "has_label": True,
                        "lesion_count": lesions, "lesions": [{}] * lesions})
    return out


RECORDS = _records()
PATIENT = {r["id"]: r["patient_id"] for r in RECORDS}


def _whole_patients(ids, records=RECORDS):
    chosen = {PATIENT[i] for i in ids}
    return sorted(ids) == sorted(r["id"] for r in records if r["patient_id"] in chosen)


def test_label_fractions_take_whole_patients_nested_and_deterministic():
    total = len(RECORDS)
    subsets = {f: splits.label_fraction(RECORDS, f, seed=3) for f in (0.1, 0.3, 1.0)}
    for f, ids in subsets.items():
        target = int(f * total)
        assert target <= len(ids) < target + 3 and _whole_patients(ids)
    assert set(subsets[0.1]) <= set(subsets[0.3]) <= set(subsets[1.0]) == {r["id"] for r in RECORDS}
    shuffled = list(reversed(RECORDS))
    assert splits.label_fraction(shuffled, 0.3, seed=3) == subsets[0.3]  # order independent
    assert splits.label_fraction(RECORDS, 0.3, seed=4) != subsets[0.3]
    assert len(splits.label_fraction(RECORDS, n_scans=5, seed=0)) in (5, 6, 7)


def test_k_shot_takes_k_patients_with_lesions():
    ids = splits.k_shot(RECORDS, 5, seed=1)
    by_id = {r["id"]: r for r in RECORDS}
    assert len(ids) == 5 and len({PATIENT[i] for i in ids}) == 5
    assert all(by_id[i]["lesion_count"] > 0 for i in ids)
    assert splits.k_shot(RECORDS, 5, seed=1) == ids
    every = splits.k_shot(RECORDS, 5, seed=1, all_scans=True)
    assert set(ids) <= set(every) and _whole_patients(every)
    with pytest.raises(PetctError, match="patients with lesions"):
        splits.k_shot(RECORDS, 1000)


def test_kfold_and_train_val_test_never_split_a_patient():
    folds = splits.kfold(RECORDS, 5, seed=2)
    vals = [set(f["val"]) for f in folds]
    assert set().union(*vals) == {r["id"] for r in RECORDS} and sum(map(len, vals)) == len(RECORDS)
    assert max(map(len, vals)) - min(map(len, vals)) <= 3
    for fold in folds:
        splits.check_no_leakage(fold, RECORDS)
        assert _whole_patients(fold["val"])
    tvt = splits.train_val_test(RECORDS, val=0.1, test=0.2, seed=0)
    splits.check_no_leakage(tvt, RECORDS)
    assert abs(len(tvt["test"]) - 0.2 * len(RECORDS)) <= 3 and len(tvt["val"]) >= 0.1 * len(RECORDS)
    assert sum(map(len, tvt.values())) == len(RECORDS)


def test_leakage_names_the_patient():
    multi = next(p for p in {r["patient_id"] for r in RECORDS}
                 if sum(r["patient_id"] == p for r in RECORDS) > 1)
    scans = [r["id"] for r in RECORDS if r["patient_id"] == multi]
    with pytest.raises(PetctError, match=f"patient '{multi}'"):
        splits.check_no_leakage({"train": scans[:1], "test": scans[1:]}, RECORDS)
    with pytest.raises(PetctError, match="no case"):
        splits.check_no_leakage({"train": ["ghost"]}, RECORDS)


def test_split_json_round_trip_and_check(tmp_path):
    tvt = splits.train_val_test(RECORDS, seed=1)
    path = str(tmp_path / "split.json")
    splits.write_split_json(path, tvt)
    assert splits.read_splits(path, RECORDS) == tvt
    bad = dict(tvt, test=tvt["test"] + tvt["train"][:1])
    with open(path, "w") as f:
        json.dump(bad, f)
    with pytest.raises(PetctError, match="patient"):
        splits.read_split_json(path, RECORDS)
    with open(path, "w") as f:
        f.write('{"train": "case00"}')
    with pytest.raises(PetctError, match="expected"):
        splits.read_split_json(path)


# The reference CSV names AutoPET scans fdg_<hash>_<study> (single-scan patients) or
# fdg_<hash>_2scans/<study>; the store's records keep the release's PETCT_<hash>/<study>/ paths.
STUDIES = {"p1": ["03-23-2003-NA-PET-CT Ganzkoerper  primaer mit KM-10445"],
           "p2": ["08-22-2003-NA-PET-CT Ganzkoerper  primaer mit KM-20805",
                  "11-07-2002-NA-PET-CT Ganzkoerper  primaer mit KM-75415"],
           "p3": ["05-14-2006-NA-PET-CT Ganzkoerper  primaer mit KM-20980"],
           "p4": ["09-13-2001-NA-PET-CT Ganzkoerper  primaer mit KM-68547"]}
HASHES = {"p1": "0011f3deaf", "p2": "0410759456", "p3": "36870de2f2", "p4": "0117d7f11f"}
HEADER = "index,subject_id,scan_id,scan_rel_path,pet_path,ct_path,seg_path,split,is_val,is_test"


def _store_records():
    out = []
    for p, studies in STUDIES.items():
        for i, study in enumerate(studies):
            src = f"/data/autopet/PETCT_{HASHES[p]}/{study}"
            out.append({"id": f"autopet_{p}_{i}", "patient_id": f"PETCT_{HASHES[p]}",
                        "sources": {"pet": f"{src}/SUV.nii.gz", "ct": f"{src}/CTres.nii.gz",
                                    "seg": f"{src}/SEG.nii.gz"}})
    return out


def _rows(splits_by_patient):
    rows = []
    for p, studies in STUDIES.items():
        h = HASHES[p]
        split, is_val, is_test = splits_by_patient[p]
        for study in studies:
            subject = f"fdg_{h}_{len(studies)}scans" if len(studies) > 1 else f"fdg_{h}_{study}"
            rel = f"{subject}/{study}" if len(studies) > 1 else subject
            base = f"./01.Dataset_AutoPET2025_FDG/{rel}"
            rows.append([str(len(rows) + 1), subject, subject, rel, f"{base}/PET.nii.gz",
                         f"{base}/CT_resample.nii.gz", f"{base}/tumorSeg.nii.gz", split, is_val, is_test])
    return rows


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header.split(","))
        w.writerows(rows)


def test_reference_split_csv_maps_rows_to_store_ids(tmp_path):
    records = _store_records()
    path = str(tmp_path / "autopet_seg_split_10pct.csv")
    _write_csv(path, HEADER, _rows({"p1": ("train", "no", "no"), "p2": ("train", "no", "no"),
                                    "p3": ("val_test", "yes", "yes"), "p4": ("unused", "no", "no")}))
    got = splits.read_splits(path, records)
    assert got == {"train": ["autopet_p1_0", "autopet_p2_0", "autopet_p2_1"], "val": [],
                   "test": ["autopet_p3_0"], "unused": ["autopet_p4_0"]}
    # The reference's test list has no split columns: every row is a test scan.
    header = "test_index,subject_id,scan_id,scan_rel_path,pet_path,ct_path,seg_path"
    rows = [r[:7] for r in _rows({p: ("", "", "") for p in STUDIES}) if "p3" in r[1] or HASHES["p3"] in r[1]]
    _write_csv(path, header, rows)
    assert splits.read_split_csv(path, records)["test"] == ["autopet_p3_0"]


def test_reference_split_csv_refuses_leaks_and_unknown_scans(tmp_path):
    records = _store_records()
    path = str(tmp_path / "split.csv")
    rows = _rows({"p1": ("train", "no", "no"), "p2": ("train", "no", "no"),
                  "p3": ("val_test", "yes", "yes"), "p4": ("unused", "no", "no")})
    rows[2][7:] = ["val_test", "yes", "yes"]  # the second scan of p2 on the test side
    _write_csv(path, HEADER, rows)
    with pytest.raises(PetctError, match=f"patient 'PETCT_{HASHES['p2']}'"):
        splits.read_split_csv(path, records)
    rows = _rows({p: ("train", "no", "no") for p in STUDIES})
    _write_csv(path, HEADER, rows)
    with pytest.raises(PetctError, match="match no case"):
        splits.read_split_csv(path, records[:-1])
    assert len(splits.read_split_csv(path, records[:-1], strict=False)["train"]) == 4
