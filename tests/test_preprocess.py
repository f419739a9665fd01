"""`petct preprocess`, `petct export`, `petct store-info`: layouts, bad input, resuming."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

import nifti_scenes as ns
from process_helpers import HAS_PROC, alive, kill_all, spawned_workers, wait_for
from petct_jax import cli, store
from petct_jax.errors import PetctError
from petct_jax.preprocessing import plausibility as checks
from petct_jax.preprocessing import readers
from petct_jax.preprocessing.export import export_case
from petct_jax.preprocessing.preprocess import preprocess
from petct_jax.preprocessing.store_info import store_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HALF_VOXEL_RAS = np.array([1.0, 1.0, 1.5])


def _autopet_cohort(root: str) -> None:
    """Three studies of two patients; one unlabelled with the authors' renamed files."""
    ns.write_scan(os.path.join(root, "PETCT_a1", "01-01-2000-NA-PET-CT Ganzkoerper-1"),
                  pet_affine=ns.affine((3, 3, 3), "LPS", (36, 28, 44)))
    ns.write_scan(os.path.join(root, "PETCT_a1", "02-02-2001-NA-PET-CT-2"),
                  pet_affine=ns.affine((3, 3, 3), "RAS", (36, 28, 44), center=(2, -1, 3)),
                  ct_affine=ns.affine((1.5, 1.5, 2.0), "LPS", (70, 56, 66)), ct_shape=(70, 56, 66),
                  ct_int16_scaled=True)
    ns.write_scan(os.path.join(root, "PETCT_b2", "03-03-2002-NA-PET-CT-3"), seg=False,
                  names=("PET", "CT_resample", "tumorSeg"))


def _run(argv: list[str]) -> int:
    return cli.main(argv)


def test_autopet_layout_preprocess_info_and_export(tmp_path, capsys):
    raw, out = str(tmp_path / "autopet"), str(tmp_path / "store")
    _autopet_cohort(raw)
    assert _run(["preprocess", "--input", raw, "--out", out, "--workers", "1"]) == 0
    records = {r["id"]: r for r in store.read_manifest(out)}
    assert sorted(records) == ["PETCT_a1_01-01-2000-NA-PET-CT_Ganzkoerper-1",
                               "PETCT_a1_02-02-2001-NA-PET-CT-2", "PETCT_b2_03-03-2002-NA-PET-CT-3"]
    rec = records["PETCT_a1_01-01-2000-NA-PET-CT_Ganzkoerper-1"]
    assert rec["patient_id"] == "PETCT_a1" and rec["cohort"] == "autopet"
    assert rec["arrays"] == ["pet", "ct", "seg"] and rec["has_label"] and rec["lesion_count"] == 1
    assert rec["sources"]["pet"].endswith("SUV.nii.gz") and rec["sources"]["ct"].endswith("CTres.nii.gz")
    assert rec["source_sha256"]["seg"] and rec["bytes"] == store.case_bytes(out, rec["id"]) > 0
    assert rec["source_geometry"]["pet"]["axcodes"] == "LPS"
    assert rec["preprocessing_version"] and rec["stats"]["ct_foreground"]["n"] == rec["lesions"][0]["voxels"]
    unlabelled = records["PETCT_b2_03-03-2002-NA-PET-CT-3"]
    assert unlabelled["arrays"] == ["pet", "ct"] and not unlabelled["has_label"]
    assert unlabelled["stats"]["ct_foreground"] is None and unlabelled["lesions"] == []
    assert unlabelled["sources"]["pet"].endswith("PET.nii.gz") and unlabelled["sources"]["seg"] is None
    assert any("as SUV" in w for w in unlabelled["warnings"])

    summary = store_summary(out)
    assert (summary["cases"], summary["patients"], summary["labelled"], summary["lesions"]) == (3, 2, 2, 2)
    assert summary["cohorts"]["autopet"]["cases"] == 3 and summary["failures"] == []
    capsys.readouterr()
    assert _run(["store-info", out]) == 0
    text = capsys.readouterr().out
    assert "3 cases, 2 patients, 1 cohorts, 2 labelled, 2 lesions" in text and "0 failures" in text

    # Export: NIfTI files whose own affines put the lesion and the marker back in place.
    for case_id in ("PETCT_a1_02-02-2001-NA-PET-CT-2", "PETCT_b2_03-03-2002-NA-PET-CT-3"):
        folder = str(tmp_path / "export" / case_id)
        assert _run(["export", "--store", out, "--case", case_id, "--out", folder]) == 0
        pet, ct = nib.load(os.path.join(folder, "pet.nii.gz")), nib.load(os.path.join(folder, "ct.nii.gz"))
        assert pet.get_data_dtype() == np.float32 and ct.get_data_dtype() == np.int16
        assert int(pet.header["qform_code"]) == int(pet.header["sform_code"]) == 1
        for img, where, threshold in ((pet, ns.LESION, 1.5), (ct, ns.MARKER, 300.0)):
            pos = _world_centroid(np.asarray(img.dataobj), img.affine, threshold)
            assert np.all(np.abs(pos - where) <= HALF_VOXEL_RAS), (case_id, pos, where)
        stored = store.Store(out).read(case_id, ["pet"])["pet"]
        assert np.array_equal(np.asarray(pet.dataobj), stored.transpose(2, 1, 0).astype(np.float32))
    assert os.path.exists(tmp_path / "export" / "PETCT_a1_02-02-2001-NA-PET-CT-2" / "seg.nii.gz")
    assert not os.path.exists(tmp_path / "export" / "PETCT_b2_03-03-2002-NA-PET-CT-3" / "seg.nii.gz")
    with pytest.raises(PetctError, match="no case 'missing'"):
        export_case(out, "missing", str(tmp_path / "x"))


def _world_centroid(data: np.ndarray, affine: np.ndarray, threshold: float) -> np.ndarray:
    w = np.clip(data.astype(np.float64) - threshold, 0, None)
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1)
    c = (ijk * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    return (affine @ np.append(c, 1.0))[:3]


def test_readers_choose_files_and_detect_layouts(tmp_path):
    study = tmp_path / "ap" / "PETCT_x" / "s1"
    for name in ("PET", "SUV", "CT", "CTres", "SEG"):
        ns.save(str(study / f"{name}.nii.gz"), np.zeros((2, 2, 2), np.float32), np.eye(4))
    (case,) = readers.list_cases(str(tmp_path / "ap"))
    assert os.path.basename(case.pet) == "SUV.nii.gz" and os.path.basename(case.ct) == "CTres.nii.gz"
    assert case.id == "PETCT_x_s1" and case.cohort == "ap" and not case.warnings
    assert readers.detect_layout(str(tmp_path / "ap")) == "autopet"

    nn = tmp_path / "Dataset001_PETCT"
    os.makedirs(nn / "imagesTr")
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"},
                                                 "labels": {"background": 0, "tumor": 1},
                                                 "file_ending": ".nii.gz"}))
    for case_name in ("pat7_0", "pat7_1", "other"):
        for ch in ("0000", "0001"):
            (nn / "imagesTr" / f"{case_name}_{ch}.nii.gz").write_bytes(b"")
    (nn / "imagesTr" / "lonely_0000.nii.gz").write_bytes(b"")
    assert readers.detect_layout(str(nn)) == "nnunet"
    cases = {c.id: c for c in readers.list_cases(str(nn))}
    assert cases["pat7_1"].patient_id == "pat7" and cases["other"].patient_id == "other"
    assert cases["pat7_0"].pet.endswith("pat7_0_0001.nii.gz") and cases["pat7_0"].seg is None
    assert "missing PET" in cases["lonely"].error
    custom = readers.list_cases(str(nn), patient_regex=r"^(pat)")
    assert {c.patient_id for c in custom if c.id.startswith("pat")} == {"pat"}
    with pytest.raises(PetctError, match="no PET channel"):
        readers.channel_roles({"0": "CT", "1": "MR"})

    os.makedirs(tmp_path / "empty" / "sub")
    with pytest.raises(PetctError, match="cannot tell the layout"):
        readers.detect_layout(str(tmp_path / "empty"))


def test_nnunet_and_csv_layouts(tmp_path):
    # nnU-Net raw: CT = 0000, PET = 0001, labels for the training cases only.
    nn = tmp_path / "Dataset002_Tiny"
    scans = {"pA_0": "imagesTr", "pA_1": "imagesTr", "pB_0": "imagesTs"}
    for n, (case_name, images) in enumerate(scans.items()):
        paths = ns.write_scan(str(tmp_path / "tmp" / case_name), seg=images == "imagesTr",
                              pet_affine=_shifted(n))
        os.makedirs(nn / images, exist_ok=True)
        shutil.copy(paths["ct"], nn / images / f"{case_name}_0000.nii.gz")
        shutil.copy(paths["pet"], nn / images / f"{case_name}_0001.nii.gz")
        if "seg" in paths:
            os.makedirs(nn / "labelsTr", exist_ok=True)
            shutil.copy(paths["seg"], nn / "labelsTr" / f"{case_name}.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT", "1": "PET"},
                                                 "file_ending": ".nii.gz"}))
    out = str(tmp_path / "store")
    summary = preprocess(str(nn), out, workers=1, progress=False)
    assert summary.ok and sorted(summary.committed) == ["pA_0", "pA_1", "pB_0"]
    recs = {r["id"]: r for r in store.read_manifest(out)}
    assert recs["pA_1"]["patient_id"] == "pA" and recs["pA_1"]["has_label"]
    assert not recs["pB_0"]["has_label"] and recs["pB_0"]["cohort"] == "Dataset002_Tiny"
    assert recs["pA_0"]["sources"]["pet"].endswith("pA_0_0001.nii.gz")

    # A CSV list (the reference split's columns) appended as a second cohort.
    ns.write_scan(str(tmp_path / "tmp" / "c1"), pet_affine=_shifted(3))
    ns.write_scan(str(tmp_path / "tmp" / "c2"), pet_affine=_shifted(4), seg=False)
    rows = [("0", "PETCT_c", "s1", "tmp/c1/SUV.nii.gz", "tmp/c1/CTres.nii.gz",
             "tmp/c1/SEG.nii.gz", "train"),
            ("1", "PETCT_c", "s2", "tmp/c2/SUV.nii.gz", "tmp/c2/CTres.nii.gz", "", "test")]
    with open(tmp_path / "split.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "subject_id", "scan_id", "pet_path", "ct_path", "seg_path", "split"])
        w.writerows(rows)
    summary = preprocess(str(tmp_path / "split.csv"), out, workers=1, progress=False)
    assert summary.ok and summary.committed == ["PETCT_c_s1", "PETCT_c_s2"]
    recs = {r["id"]: r for r in store.read_manifest(out)}
    assert recs["PETCT_c_s1"]["cohort"] == "split" and recs["PETCT_c_s1"]["has_label"]
    assert recs["PETCT_c_s1"]["sources"]["pet"] == str(tmp_path / "tmp" / "c1" / "SUV.nii.gz")
    assert not recs["PETCT_c_s2"]["has_label"]
    assert store_summary(out)["cohorts"]["split"]["patients"] == 1

    # The same nnU-Net case names from another cohort collide unless prefixed.
    other = tmp_path / "Dataset003_Copy"
    shutil.copytree(nn, other)
    summary = preprocess(str(other), out, workers=1, progress=False)
    assert not summary.committed and len(summary.failures) == 3
    assert summary.failures[0]["id"] == "pA_0"
    assert "duplicate case id: already in the store from cohort 'Dataset002_Tiny'" in summary.failures[0]["error"]
    # Prefixed, they are the same scans under new ids: refused as duplicates (a split
    # could put one scan on both sides), unless the check is lowered to a warning.
    summary = preprocess(str(other), out, workers=1, progress=False, id_prefix="copy_")
    assert not summary.committed and len(summary.failures) == 3
    for f in summary.failures:
        original = f["id"][len("copy_"):]
        assert "[duplicate] PET has the same content" in f["error"], f
        assert f"as case {original!r} (already in the store)" in f["error"], f
        assert f["file"].endswith(f"{original}_0001.nii.gz")
    levels = dict(checks.default_levels(), duplicate="warn")
    summary = preprocess(str(other), out, workers=1, progress=False, id_prefix="copy_",
                         plausibility=levels)
    assert summary.ok and sorted(summary.committed) == ["copy_pA_0", "copy_pA_1", "copy_pB_0"]
    recs = {r["id"]: r for r in store.read_manifest(out)}
    assert any(w.startswith("plausibility warning [duplicate]: PET has the same content")
               and "'pA_1'" in w for w in recs["copy_pA_1"]["warnings"])


def _shifted(n: int):
    """A PET (and CT) grid moved by n x 0.1 mm: a scan whose files differ from the n-th
    one's (identical files under two ids are refused as duplicates)."""
    return ns.affine(center=(0.1 * n, 0.0, 0.0))


def _bad_cohort(root: str) -> dict[str, tuple[str, str]]:
    """Good and bad studies; returns {case id: (error substring, offending file name)}."""
    count = iter(range(1, 100))

    def study(name, **kw):  # each its own scan: the default one is the first cohort's
        return ns.write_scan(os.path.join(root, "PETCT_z", name), pet_affine=_shifted(next(count)),
                             **kw)

    study("good")
    study("label2", seg_transform=lambda s: s * 2)  # binarized with a warning
    study("frame1", pet_transform=lambda p: p[..., None])  # singleton 4th dim: squeezed
    p = study("nopet")
    os.remove(p["pet"])
    p = study("truncated")
    data = gzip.decompress(open(p["pet"], "rb").read())
    with open(p["pet"], "wb") as f:
        f.write(gzip.compress(data)[: len(gzip.compress(data)) // 2])
    p = study("garbage")
    open(p["ct"], "wb").write(os.urandom(3000))
    study("frames", pet_transform=lambda x: np.stack([x, x], -1))
    study("apart", ct_affine=ns.affine(center=(0.0, 0.0, 5000.0)))
    study("nan", pet_transform=lambda x: np.where(np.arange(x.size).reshape(x.shape) == 77, np.nan, x))
    study("inf", ct_transform=lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x))
    study("air", ct_transform=lambda x: np.full_like(x, -1000.0))
    study("fraclabel", seg_transform=lambda s: s.astype(np.float32) * 0.5)
    study("seggrid", seg_transform=lambda s: s[:-2])
    study("dup 1")
    study("dup_1")
    # The same scan twice: a symlinked folder (after the original in listing order) and a
    # copy of the first cohort's scan under this patient.
    os.symlink(os.path.join(root, "PETCT_z", "good"), os.path.join(root, "PETCT_z", "relink"))
    ns.write_scan(os.path.join(root, "PETCT_z", "again"))
    return {
        "PETCT_z_nopet": ("missing PET", "nopet"),
        "PETCT_z_truncated": ("PET has unreadable voxel data", "truncated/SUV.nii.gz"),
        "PETCT_z_garbage": ("CT is not a readable NIfTI", "garbage/CTres.nii.gz"),
        "PETCT_z_frames": ("PET is 4D", "frames/SUV.nii.gz"),
        "PETCT_z_apart": ("does not overlap the PET in world space", "apart/CTres.nii.gz"),
        "PETCT_z_nan": ("PET has 1 NaN/Inf voxels", "nan/SUV.nii.gz"),
        "PETCT_z_inf": ("CT has 1 NaN/Inf voxels", "inf/CTres.nii.gz"),
        "PETCT_z_air": ("empty body mask", "air/CTres.nii.gz"),
        "PETCT_z_fraclabel": ("fractional label values", "fraclabel/SEG.nii.gz"),
        "PETCT_z_seggrid": ("does not match the PET grid", "seggrid/SEG.nii.gz"),
        "PETCT_z_dup_1": ("duplicate case id", "SUV.nii.gz"),
        "PETCT_z_relink": ("[duplicate] PET has the same content", "relink/SUV.nii.gz"),
        "PETCT_z_again": ("[duplicate] PET has the same content", "again/SUV.nii.gz"),
    }


def test_bad_inputs_fail_alone_and_leave_the_store_intact(tmp_path, capsys):
    out = str(tmp_path / "store")
    good = str(tmp_path / "good")
    ns.write_scan(os.path.join(good, "PETCT_g", "s"))
    assert _run(["preprocess", "--input", good, "--out", out, "--workers", "1"]) == 0
    manifest_before = open(os.path.join(out, "manifest.jsonl")).read()
    pet_before = store.Store(out).read("PETCT_g_s", ["pet"])["pet"]

    raw = str(tmp_path / "bad")
    expected = _bad_cohort(raw)
    capsys.readouterr()
    assert _run(["preprocess", "--input", raw, "--out", out, "--workers", "1"]) == 1
    printed = capsys.readouterr()
    failures = store.read_failures(out)
    by_id: dict[str, list[dict]] = {}
    for f in failures:
        by_id.setdefault(f["id"], []).append(f)
    assert set(by_id) == set(expected)
    assert len(by_id["PETCT_z_dup_1"]) == 2 and all(len(v) == 1 for k, v in by_id.items()
                                                    if k != "PETCT_z_dup_1")
    for case_id, (message, file_part) in expected.items():
        f = by_id[case_id][0]
        assert message in f["error"] and file_part in (f["file"] or ""), f
        line = f"{case_id}: {f['error']}"
        assert line in printed.out and "\n" not in f["error"]
    assert "as case 'PETCT_z_good' (earlier in this run)" in by_id["PETCT_z_relink"][0]["error"]
    assert "as case 'PETCT_g_s' (already in the store)" in by_id["PETCT_z_again"][0]["error"]
    assert f"{len(expected) + 1} failed" in printed.out
    # The good ones of the bad cohort went in; the earlier cohort is untouched.
    ids = [r["id"] for r in store.read_manifest(out)]
    assert ids == ["PETCT_g_s", "PETCT_z_frame1", "PETCT_z_good", "PETCT_z_label2"]
    assert open(os.path.join(out, "manifest.jsonl")).read().startswith(manifest_before)
    assert np.array_equal(store.Store(out).read("PETCT_g_s", ["pet"])["pet"], pet_before)
    label2 = store.Store(out).record("PETCT_z_label2")
    assert any("binarized" in w for w in label2["warnings"]) and label2["lesion_count"] == 1
    assert sorted(os.listdir(os.path.join(out, "cases"))) == sorted(ids)  # nothing half-written
    info = store_summary(out)
    assert len(info["failures"]) == len(expected) + 1  # both studies behind the duplicate id
    assert info["uncommitted"] == []


def test_rerun_skips_and_overwrite_redoes(tmp_path):
    raw, out = str(tmp_path / "autopet"), str(tmp_path / "store")
    _autopet_cohort(raw)
    first = preprocess(raw, out, workers=1, progress=False)
    assert len(first.committed) == 3
    again = preprocess(raw, out, workers=1, progress=False)
    assert again.committed == [] and len(again.skipped) == 3 and again.ok
    redo = preprocess(raw, out, workers=1, progress=False, overwrite=True)
    assert len(redo.committed) == 3
    lines = open(os.path.join(out, "manifest.jsonl")).read().splitlines()
    assert len(lines) == 6 and len(store.read_manifest(out)) == 3
    with pytest.raises(PetctError, match="differs"):
        preprocess(raw, out, workers=1, progress=False, spacing_zyx=(2.0, 2.0, 2.0))


def _committed_lines(out: str) -> list[str]:
    ids = []
    for line in open(os.path.join(out, "manifest.jsonl")).read().splitlines():
        try:
            ids.append(json.loads(line)["id"])
        except json.JSONDecodeError:
            pass
    return ids


def test_resume_after_an_interrupted_run(tmp_path):
    raw, out = str(tmp_path / "autopet"), str(tmp_path / "store")
    _autopet_cohort(raw)
    reference = preprocess(raw, out, workers=1, progress=False)
    expected = {r["id"]: r for r in store.read_manifest(out)}
    # Pretend the run died: only the first case committed, the second half-appended
    # (torn line), its arrays complete but uncommitted, the third mid-write.
    path = os.path.join(out, "manifest.jsonl")
    lines = open(path).read().splitlines()
    with open(path, "w") as f:
        f.write(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    third = reference.committed[2]
    os.rename(os.path.join(out, "cases", third), os.path.join(out, "cases", f".{third}.partial"))
    assert store_summary(out)["uncommitted"] == [f".{third}.partial", reference.committed[1]]
    resumed = preprocess(raw, out, workers=1, progress=False)
    assert resumed.skipped == [reference.committed[0]] and sorted(resumed.committed) == sorted(
        reference.committed[1:])
    assert sorted(_committed_lines(out)) == sorted(expected)  # each case exactly once
    s = store.Store(out)
    for case_id, rec in expected.items():
        assert s.record(case_id)["stats"] == rec["stats"]
        assert s.read(case_id, ["ct"])["ct"].shape == tuple(rec["shape_zyx"])
    assert sorted(os.listdir(os.path.join(out, "cases"))) == sorted(expected)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="finds the workers in /proc")
@pytest.mark.parametrize("kill", ["group", "parent"])
def test_resume_after_killing_a_parallel_run(tmp_path, kill):
    """Killed with its workers, or alone (e.g. by the OOM killer): then its workers exit by
    themselves (`petct_jax.parent_watch`) instead of waiting for work for ever. The resumed
    run commits every case exactly once."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "store")
    shape = (72, 56, 88)
    for n in range(8):
        ns.write_scan(os.path.join(raw, f"PETCT_{n}", "s"), pet_shape=shape,
                      pet_affine=ns.affine((1.5, 1.5, 1.5), "LPS", shape, center=(0.1 * n, 0, 0)))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "petct_jax.cli", "preprocess", "--input", raw,
                             "--out", out, "--workers", "2"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    manifest = os.path.join(out, "manifest.jsonl")
    wait_for(lambda: proc.poll() is not None or (
        os.path.exists(manifest) and open(manifest).read().count("\n") >= 1), timeout=120, interval=0.01)
    workers = spawned_workers(proc.pid)
    assert len(workers) == 2
    # "group": the parent and its workers at once; not its resource tracker, which then
    # unlinks the run's semaphores (killed too, it would leave them in /dev/shm).
    kill_all([proc.pid, *workers] if kill == "group" else [proc.pid])
    proc.wait()
    wait_for(lambda: not any(map(alive, workers)), timeout=30)
    survivors = [w for w in workers if alive(w)]
    kill_all(survivors)
    assert survivors == [], "workers outlived their parent"
    killed_after = len(_committed_lines(out))
    assert 1 <= killed_after < 8, killed_after
    resumed = preprocess(raw, out, workers=1, progress=False)
    assert resumed.ok and len(resumed.skipped) == killed_after
    ids = _committed_lines(out)
    assert sorted(ids) == sorted(f"PETCT_{n}_s" for n in range(8))  # each exactly once
    assert sorted(os.listdir(os.path.join(out, "cases"))) == sorted(ids)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_PROC, reason="finds the workers in /proc")
def test_workers_of_a_parent_killed_while_they_start_exit_and_write_nothing(tmp_path):
    """The parent dies while its workers are still importing: they must not read init's pid
    as their parent's and live on (they did, and wrote cases outside the store's lock)."""
    raw, out = str(tmp_path / "raw"), str(tmp_path / "store")
    for n in range(4):
        ns.write_scan(os.path.join(raw, f"PETCT_{n}", "s"), pet_affine=_shifted(n))
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "petct_jax.cli", "preprocess", "--input", raw,
                             "--out", out, "--workers", "2"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    assert wait_for(lambda: proc.poll() is not None or len(spawned_workers(proc.pid)) == 2,
                    timeout=120, interval=0.005)
    workers = spawned_workers(proc.pid)
    kill_all([proc.pid])
    proc.wait()
    cases = os.path.join(out, "cases")
    written = lambda: sorted(os.listdir(cases)) if os.path.isdir(cases) else []
    at_death = written()
    wait_for(lambda: not any(map(alive, workers)), timeout=60)
    survivors = [w for w in workers if alive(w)]
    kill_all(survivors)
    assert len(workers) == 2 and survivors == [], "workers outlived their parent"
    assert written() == at_death  # nothing written once the parent was gone


def test_a_worker_whose_parent_is_already_gone_exits_at_once():
    code = ("import os, sys\nfrom petct_jax.parent_watch import exit_with_parent\n"
            "exit_with_parent(int(sys.argv[1]))\nprint('alive')")
    gone = subprocess.run([sys.executable, "-c", code, "1"], capture_output=True, text=True, timeout=60)
    assert (gone.returncode, gone.stdout) == (1, "")
    here = subprocess.run([sys.executable, "-c", code, str(os.getpid())], capture_output=True,
                          text=True, timeout=60)
    assert (here.returncode, here.stdout) == (0, "alive\n")


def test_cli_rejects_bad_settings(tmp_path, capsys):
    assert _run(["preprocess", "--input", str(tmp_path / "none"), "--out", str(tmp_path / "s")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    ns.write_scan(str(tmp_path / "raw" / "PETCT_a" / "s"))
    assert _run(["preprocess", "--input", str(tmp_path / "raw"), "--out", str(tmp_path / "s"),
                 "--spacing", "3,2"]) == 2
    assert "--spacing '3,2'" in capsys.readouterr().err


def _components_world(seg: np.ndarray, affine: np.ndarray) -> list[np.ndarray]:
    """World centroids of the 18-connected components of a mask, via its own affine."""
    from scipy import ndimage as ndi
    labels, n = ndi.label(seg > 0, structure=ndi.generate_binary_structure(3, 2))
    centroids = ndi.center_of_mass(seg > 0, labels, range(1, n + 1))
    return [(affine @ np.append(c, 1.0))[:3] for c in centroids]


@pytest.mark.parametrize("layout", ["autopet", "nnunet"])
def test_phantom_cohorts_round_trip(tmp_path, layout):
    phantoms = pytest.importorskip("petct_jax.phantoms")
    raw, out = str(tmp_path / "raw"), str(tmp_path / "store")
    sidecar = phantoms.generate_cohort(raw, 3, seed=1, layout=layout, size="tiny", progress=False)
    summary = preprocess(raw, out, workers=1, progress=False)
    assert summary.ok and len(summary.committed) == 3
    s = store.Store(out)
    half = np.array(s.info["spacing_zyx"][::-1]) / 2
    for study in sidecar:
        (rec,) = [r for r in s.records if r["patient_id"] == study["patient_id"]
                  and r["sources"]["seg"].endswith(os.path.basename(study["paths"]["SEG"]))]
        assert rec["sources"]["pet"].endswith(os.path.basename(study["paths"]["SUV"]))
        assert rec["lesion_count"] == rec["lesion_count_source"] and not rec["warnings"]
        src = nib.load(os.path.join(raw, study["paths"]["SEG"]))
        expected = _components_world(np.asarray(src.dataobj), src.affine)
        a = np.asarray(rec["affine_zyx"])
        got = [(a @ np.append(les["centroid_zyx"], 1.0))[:3] for les in rec["lesions"]]
        assert len(got) == len(expected)
        for e in expected:  # every source lesion is where it was, within half a target voxel
            assert any(np.all(np.abs(g - e) <= half) for g in got), (e, got)
        for lesion in study["lesions"]:  # the phantom's own world centres lie inside a lesion box
            if lesion["seg_voxels"]:
                c = np.linalg.inv(a) @ np.append(lesion["centre_mm"], 1.0)
                assert any(np.all(c[:3] >= np.array(les["bbox_lo"]) - 1.5)
                           and np.all(c[:3] <= np.array(les["bbox_hi"]) + 0.5)
                           for les in rec["lesions"]), lesion["id"]
        # Export: the written seg puts every lesion back at its source world position.
        folder = str(tmp_path / "export" / rec["id"])
        export_case(out, rec["id"], folder)
        exported = nib.load(os.path.join(folder, "seg.nii.gz"))
        back = _components_world(np.asarray(exported.dataobj), exported.affine)
        assert len(back) == len(expected)
        for e in expected:
            assert any(np.all(np.abs(b - e) <= half) for b in back), (e, back)
