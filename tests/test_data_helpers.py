"""Tiny synthetic stores for the data-pipeline tests (and a check of the records they hold)."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import scipy.ndimage as ndi

from petct_jax import store as store_lib

SPACING = (3.0, 2.0, 2.0)


def _summary(x: np.ndarray) -> dict:
    x = x.astype(np.float64)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
            "max": float(x.max()), "p00_5": float(np.percentile(x, 0.5)),
            "p99_5": float(np.percentile(x, 99.5))}


def _sampled(values: np.ndarray, rng: np.random.Generator) -> dict | None:
    if values.size == 0:
        return None
    v = values.astype(np.float64)
    sample = rng.choice(values, size=min(256, values.size), replace=False)
    return {"n": int(values.size), "mean": float(v.mean()), "std": float(v.std()),
            "p00_5": float(np.percentile(v, 0.5)), "p99_5": float(np.percentile(v, 99.5)),
            "sample": [int(s) for s in sample]}


def make_case(shape, rng: np.random.Generator, n_lesions: int) -> dict[str, np.ndarray]:
    small = [max(s // 6, 2) for s in shape]
    smooth = ndi.zoom(rng.normal(size=small), [s / m for s, m in zip(shape, small)], order=1)
    smooth = smooth[: shape[0], : shape[1], : shape[2]]
    ct = (smooth * 300 - 100 + rng.normal(0, 20, shape)).round().clip(-1024, 3000).astype(np.int16)
    pet = np.abs(smooth + 1.5 + rng.normal(0, 0.1, shape)).astype(np.float16)
    seg = np.zeros(shape, np.uint8)
    for _ in range(n_lesions):
        c = [int(rng.integers(2, s - 2)) for s in shape]
        seg[c[0] - 1:c[0] + 2, c[1] - 1:c[1] + 1, c[2]:c[2] + 2] = 1
    pet[seg > 0] += np.float16(5.0)
    return {"pet": pet, "ct": ct, "seg": seg}


def make_record(case_id: str, patient_id: str, arrays: dict, rng: np.random.Generator,
                labelled: bool, sources: dict | None = None) -> dict:
    ct, seg = arrays["ct"], arrays["seg"]
    labels, _ = ndi.label(seg)
    lesions = []
    for i, box in enumerate(ndi.find_objects(labels), 1):
        voxels = int((labels[box] == i).sum())
        lesions.append({"bbox_lo": [s.start for s in box], "bbox_hi": [s.stop for s in box],
                        "voxels": voxels,
                        "centroid_zyx": [float(c) for c in ndi.center_of_mass(labels == i)]})
    voxel_ml = float(np.prod(SPACING)) / 1000
    return {
        "id": case_id, "patient_id": patient_id, "cohort": "synthetic",
        "shape_zyx": list(ct.shape), "spacing_zyx": list(SPACING),
        "affine_zyx": np.diag([*SPACING, 1.0]).tolist(),
        "arrays": ["pet", "ct", "seg"] if labelled else ["pet", "ct"],
        "has_label": labelled,
        "stats": {"pet": _summary(arrays["pet"]), "ct": _summary(ct),
                  "ct_foreground": _sampled(ct[seg > 0], rng) if labelled else None,
                  "ct_body": _sampled(ct[ct > -500], rng)},
        "lesions": lesions if labelled else [],
        "lesion_count": len(lesions) if labelled else 0,
        "lesion_volume_ml": float(seg.sum()) * voxel_ml if labelled else 0.0,
        **({"sources": sources} if sources else {}),
    }


def make_store(root: str, shapes, *, patients=None, lesions=None, labelled=True, seed=0,
               chunk=(8, 16, 16)) -> store_lib.Store:
    """Write one case per shape; `patients[i]` / `lesions[i]` give patient ids / lesion counts."""
    rng = np.random.default_rng(seed)
    store_lib.create(root, spacing_zyx=SPACING, chunk_zyx=chunk)
    for i, shape in enumerate(shapes):
        case_id = f"case{i:02d}"
        patient = patients[i] if patients else f"pat{i:02d}"
        arrays = make_case(tuple(shape), rng, lesions[i] if lesions else 2)
        hash_ = hashlib.md5(patient.encode()).hexdigest()[:10]
        sources = {k: f"/raw/PETCT_{hash_}/01-0{i % 9 + 1}-2003-NA-PET-CT Ganzkoerper-{i:05d}/{f}"
                   for k, f in (("pet", "SUV.nii.gz"), ("ct", "CTres.nii.gz"))}
        record = make_record(case_id, patient, arrays, rng, labelled, sources)
        if not labelled:
            arrays = {k: v for k, v in arrays.items() if k != "seg"}
        store_lib.write_case(root, case_id, arrays, chunk)
        store_lib.commit_case(root, record)
    return store_lib.Store(root)


def read_all(store: store_lib.Store, case_id: str) -> dict[str, np.ndarray]:
    record = store.record(case_id)
    return store.read(case_id, record["arrays"])


def test_synthetic_store_roundtrip(tmp_path):
    store = make_store(os.path.join(tmp_path, "s"), [(20, 24, 28), (16, 18, 20)], lesions=[2, 0])
    assert store.ids == ["case00", "case01"]
    arrays = read_all(store, "case00")
    assert arrays["pet"].dtype == np.float16 and arrays["ct"].dtype == np.int16
    assert arrays["pet"].shape == (20, 24, 28)
    rec = store.record("case00")
    assert abs(rec["stats"]["ct"]["mean"] - arrays["ct"].astype(np.float64).mean()) < 1e-6
    assert rec["lesion_count"] >= 1 and rec["stats"]["ct_foreground"]["n"] == int(arrays["seg"].sum())
    assert store.record("case01")["lesions"] == []
