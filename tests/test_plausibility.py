"""Plausibility checks (preprocessing/plausibility.py): each named check on a crafted case,
levels and overrides, the duplicate check in the preprocess parent, phantoms pass clean."""

from __future__ import annotations

import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import nifti_scenes as ns
from petct_jax import cli, store
from petct_jax.errors import PetctError
from petct_jax.preprocessing import harmonize as hz
from petct_jax.preprocessing import plausibility as checks
from petct_jax.preprocessing.preprocess import preprocess
from petct_jax.preprocessing.readers import CaseSpec

SPACING = (3.0, 2.0, 2.0)


def _spec(paths: dict, case_id: str = "case") -> CaseSpec:
    return CaseSpec(id=case_id, patient_id=case_id, cohort="test", pet=paths["pet"],
                    ct=paths["ct"], seg=paths.get("seg"))


def _levels(text: str) -> dict[str, str]:
    return checks.parse_levels(text)


def _refused(paths: dict, role_file: str, *names: str, levels: str = "error") -> str:
    """Harmonize; assert a CaseError naming `role_file` and exactly the checks `names`."""
    with pytest.raises(hz.CaseError) as err:
        hz.harmonize(_spec(paths), SPACING, plausibility=_levels(levels))
    problem = err.value.problem
    assert err.value.file == role_file, (err.value.file, problem)
    assert "fails plausibility" in problem and "\n" not in problem
    assert sorted(c for c in checks.CHECKS if f"[{c}]" in problem) == sorted(names), problem
    return problem


def test_pet_and_ct_swapped(tmp_path):
    paths = ns.write_scan(str(tmp_path))
    swapped = dict(paths, pet=paths["ct"], ct=paths["pet"])
    problem = _refused(swapped, paths["pet"], "ct_range")  # the CT role holds the PET
    assert problem.startswith("CT fails plausibility: [ct_range] CT min 0") and "swapped" in problem
    # With the CT check off, the PET check names the other file.
    problem = _refused(swapped, paths["ct"], "pet_range", levels="ct_range=off")
    assert problem.startswith("PET fails plausibility: [pet_range] PET min -1000")


def test_pet_given_as_ct(tmp_path):
    paths = ns.write_scan(str(tmp_path))
    shutil.copy(paths["pet"], tmp_path / "copy.nii.gz")
    _refused(dict(paths, ct=str(tmp_path / "copy.nii.gz")), str(tmp_path / "copy.nii.gz"), "ct_range")


def test_ct_without_its_offset(tmp_path):
    paths = ns.write_scan(str(tmp_path), ct_transform=lambda c: c + 1024.0)
    problem = _refused(paths, paths["ct"], "ct_offset", "ct_range")
    assert "-1024 HU offset (scl_inter) looks missing" in problem
    assert "body median 1064 HU" in problem
    # As warnings, the case goes through and its record names them.
    _, rec = hz.harmonize(_spec(paths), SPACING, plausibility=_levels("warn"))
    named = [w for w in rec["warnings"] if w.startswith("plausibility warning [")]
    assert [w.split("]")[0] for w in named] == ["plausibility warning [ct_range",
                                                "plausibility warning [ct_offset"]


def test_ct_clipped_by_its_slope(tmp_path):
    """HU = stored * 0.02 - 1024 cannot reach above -369 HU in int16: the body is clipped."""
    paths = ns.write_scan(str(tmp_path))
    img = nib.load(paths["ct"])
    hu = np.asarray(img.dataobj, dtype=np.float64)
    raw = np.clip(np.round((hu + 1024.0) / 0.02), -32768, 32767).astype(np.int16)
    ns.save(paths["ct"], raw, img.affine, slope=0.02, inter=-1024.0)
    assert (raw == 32767).mean() > 0.2
    problem = _refused(paths, paths["ct"], "ct_saturated")
    assert "sit at -368.66 HU (stored 32767, the limit of int16)" in problem
    # Clipped from below: the minimum means -327 HU, not air (ct_range also sees no air).
    raw = np.clip(np.round(hu / 0.01), -32768, 32767).astype(np.int16)
    ns.save(paths["ct"], raw, img.affine, slope=0.01, inter=0.0)
    problem = _refused(paths, paths["ct"], "ct_saturated", "ct_range")
    assert "sit at -327.68 HU (stored -32768" in problem


def test_air_stored_at_the_type_minimum_is_not_clipping(tmp_path):
    """uint16 with intercept -1024: stored 0 is air, the commonest voxel of a CT."""
    paths = ns.write_scan(str(tmp_path))
    img = nib.load(paths["ct"])
    hu = np.asarray(img.dataobj, dtype=np.float64)
    raw = np.clip(np.round(hu + 1024.0), 0, None).astype(np.uint16)
    raw[hu < -999] = 0  # air at exactly -1024
    ns.save(paths["ct"], raw, img.affine, slope=1.0, inter=-1024.0)
    _, rec = hz.harmonize(_spec(paths), SPACING, plausibility=checks.default_levels())
    assert rec["warnings"] == []


def test_micrometre_affine(tmp_path):
    shape = (36, 28, 44)
    aff = ns.affine((3.0, 3.0, 3.0), "LPS", shape)
    aff[:3, :3] /= 1000.0  # the same grid, in metres-as-mm: 3 micrometre voxels
    paths = ns.write_scan(str(tmp_path), pet_affine=aff, pet_shape=shape)
    problem = _refused(paths, paths["pet"], "voxel_size")
    assert "voxel size [0.003, 0.003, 0.003] mm is outside 0.3-10 mm" in problem
    # Through preprocess: the case fails alone; nothing is committed for it.
    raw, out = str(tmp_path / "raw"), str(tmp_path / "store")
    ns.write_scan(os.path.join(raw, "PETCT_um", "s"), pet_affine=aff, pet_shape=shape)
    ns.write_scan(os.path.join(raw, "PETCT_ok", "s"))
    summary = preprocess(raw, out, workers=1, progress=False)
    assert summary.committed == ["PETCT_ok_s"] and [f["id"] for f in summary.failures] == ["PETCT_um_s"]
    assert "[voxel_size]" in summary.failures[0]["error"]
    assert sorted(os.listdir(os.path.join(out, "cases"))) == ["PETCT_ok_s"]


def _distinct(folder: str, n: int) -> dict:
    return ns.write_scan(folder, pet_affine=ns.affine(center=(0.1 * n, 0.0, 0.0)))


def test_the_same_scan_twice_under_two_ids(tmp_path, capsys):
    raw, out = tmp_path / "raw", str(tmp_path / "store")
    _distinct(str(raw / "PETCT_a" / "s"), 0)
    _distinct(str(raw / "PETCT_b" / "s"), 1)
    os.symlink(raw / "PETCT_a", raw / "PETCT_c")  # another patient id, the same files
    summary = preprocess(str(raw), out, workers=1, progress=False)
    assert summary.committed == ["PETCT_a_s", "PETCT_b_s"]
    (failure,) = summary.failures
    assert failure["id"] == "PETCT_c_s" and failure["file"] == str(raw / "PETCT_c" / "s" / "SUV.nii.gz")
    assert "[duplicate] PET has the same content" in failure["error"]
    assert "as case 'PETCT_a_s' (earlier in this run)" in failure["error"]
    assert store.read_failures(out)[-1]["id"] == "PETCT_c_s"

    # A later run: against the store; a copied folder too; and --overwrite redoes a
    # committed case without calling it a duplicate of itself.
    shutil.copytree(raw / "PETCT_b", raw / "PETCT_d")
    summary = preprocess(str(raw), out, workers=2, progress=False, overwrite=True)
    assert sorted(summary.committed) == ["PETCT_a_s", "PETCT_b_s"]
    errors = {f["id"]: f["error"] for f in summary.failures}
    assert sorted(errors) == ["PETCT_c_s", "PETCT_d_s"]
    assert "as case 'PETCT_a_s' (already in the store)" in errors["PETCT_c_s"]
    assert "as case 'PETCT_b_s' (already in the store)" in errors["PETCT_d_s"]
    assert sorted(r["id"] for r in store.read_manifest(out)) == ["PETCT_a_s", "PETCT_b_s"]

    # Lowered to a warning: committed, printed by name and kept in the record.
    capsys.readouterr()
    assert cli.main(["preprocess", "--input", str(raw), "--out", out, "--workers", "1",
                     "--plausibility", "duplicate=warn"]) == 0
    err = capsys.readouterr().err
    assert "plausibility warning [duplicate] case PETCT_d_s: PET has the same content" in err
    rec = store.Store(out).record("PETCT_d_s")
    assert any(w.startswith("plausibility warning [duplicate]") for w in rec["warnings"])


def test_levels_and_cli_settings(tmp_path, capsys):
    assert _levels("error") == checks.default_levels()
    assert _levels("off") == {c: "off" for c in checks.CHECKS}
    assert _levels("warn,ct_range=off") == dict({c: "warn" for c in checks.CHECKS}, ct_range="off")
    assert _levels("ct_offset=warn") == dict(checks.default_levels(), ct_offset="warn")
    for bad in ("loud", "warn,ct_rnge=off", "warn,ct_range=maybe", "ct_range=off,warn"):
        with pytest.raises(PetctError, match=r"^--plausibility"):
            _levels(bad)
    raw = str(tmp_path / "raw")
    ns.write_scan(os.path.join(raw, "PETCT_a", "s"), ct_transform=lambda c: c + 1024.0)
    out = str(tmp_path / "store")
    base = ["preprocess", "--input", raw, "--out", out, "--workers", "1"]
    assert cli.main(base + ["--plausibility", "warn,ct_range=maybe"]) == 2
    assert "--plausibility 'warn,ct_range=maybe'" in capsys.readouterr().err
    assert cli.main(base + ["--max-voxels", "lots"]) == 2
    assert "--max-voxels 'lots'" in capsys.readouterr().err
    assert cli.main(base) == 1  # the default: errors
    assert "[ct_offset]" in capsys.readouterr().out
    assert cli.main(base + ["--plausibility", "warn,ct_range=off"]) == 0
    err = capsys.readouterr().err
    assert "plausibility warning [ct_offset] case PETCT_a_s: CT min 24 HU" in err
    assert "[ct_range]" not in err
    rec = store.Store(out).record("PETCT_a_s")
    assert [w for w in rec["warnings"] if "plausibility" in w] == [
        w for w in rec["warnings"] if w.startswith("plausibility warning [ct_offset]: CT min 24")]


def test_max_voxels_reaches_the_workers(tmp_path, capsys):
    raw, out = str(tmp_path / "raw"), str(tmp_path / "store")
    _distinct(os.path.join(raw, "PETCT_a", "s"), 0)
    _distinct(os.path.join(raw, "PETCT_b", "s"), 1)
    voxels = 36 * 28 * 44
    assert cli.main(["preprocess", "--input", raw, "--out", out, "--workers", "2",
                     "--max-voxels", str(voxels - 1)]) == 1
    printed = capsys.readouterr().out
    assert "PET header claims 36x28x44 float32 (173.2 KiB), more than the limit of 44,351 " \
           "voxels (--max-voxels)" in printed
    assert store.read_manifest(out) == []
    assert cli.main(["preprocess", "--input", raw, "--out", out, "--workers", "1",
                     "--max-voxels", f"{voxels:.6g}"]) == 0


def test_phantoms_pass_every_check_without_a_warning(tmp_path):
    phantoms = pytest.importorskip("petct_jax.phantoms.cohort")
    raw = str(tmp_path / "raw")
    sidecar = phantoms.generate_cohort(raw, 4, seed=3, size="tiny", progress=False)
    for study in sidecar:
        files = {k: os.path.join(raw, v) for k, v in study["paths"].items()}
        for ct_name in ("CT", "CTres"):
            ct = hz.open_image(files[ct_name], "CT", "p")
            assert checks.voxel_size(ct) == []
            assert checks.ct_values(ct, ct.read(), None) == [], files[ct_name]
        for pet_name in ("SUV", "PET"):  # the Bq/mL image is no CT either
            pet = hz.open_image(files[pet_name], "PET", "p")
            assert checks.voxel_size(pet) == [] and checks.pet_values(pet, pet.read(), None) == []
        _, rec = hz.harmonize(CaseSpec(id="p", patient_id="p", cohort="c", pet=files["SUV"],
                                       ct=files["CTres"], seg=files["SEG"]), SPACING,
                                 plausibility=checks.default_levels())
        assert rec["warnings"] == []
    summary = preprocess(raw, str(tmp_path / "store"), workers=1, progress=False)
    assert summary.ok and len(summary.committed) == 4
