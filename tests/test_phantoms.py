"""Tests of `petct phantoms`, the digital whole-body FDG PET/CT cohort generator.

One tiny AutoPET-layout cohort and one tiny nnU-Net cohort (same seed) are generated once
per module; the seed is chosen so that the 4 studies cover three centres (LPS, z-first SPL
with CT scl_inter, feet-first RPI with CT scl_slope 0.5 and int16 PET), a tumour-free
control, a patient with two studies, and lesions in lung, liver, bone and next to the bladder.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from petct_jax.cli import main
from petct_jax.errors import PetctError
from petct_jax.phantoms import generate_cohort
from petct_jax.phantoms.anatomy import T, tissue_tables
from petct_jax.phantoms.centres import SIZES
from petct_jax.phantoms.grids import Grid, resample_linear
from petct_jax.phantoms.study import case_table, plan_patient, plan_study, render_study
from petct_jax.phantoms.writers import save_nifti

SEED = 386
N_CASES = 4
STUDY_RE = re.compile(r"^\d{2}-\d{2}-\d{4}-NA-PET-CT Ganzkoerper  primaer mit KM-\d{5}$")
CASE_RE = re.compile(r"^PETCT_[0-9a-f]{10}_\d{2}$")


@pytest.fixture(scope="module")
def autopet(tmp_path_factory):
    out = tmp_path_factory.mktemp("autopet") / "cohort"
    records = generate_cohort(out, N_CASES, seed=SEED, layout="autopet", size="tiny", preview=True,
                              progress=False)
    return out, records


@pytest.fixture(scope="module")
def nnunet(tmp_path_factory):
    out = tmp_path_factory.mktemp("nnunet") / "cohort"
    records = generate_cohort(out, N_CASES, seed=SEED, layout="nnunet", size="tiny", progress=False)
    return out, records


def _load(root: Path, rel: str):
    return nib.load(str(root / rel))


def _vox(img, world) -> tuple[int, int, int]:
    ijk = nib.affines.apply_affine(np.linalg.inv(img.affine), world)
    return tuple(int(v) for v in np.round(ijk))


def _neighbourhood(data, ijk, n=1):
    return data[tuple(slice(max(i - n, 0), i + n + 1) for i in ijk)]


# ---------------------------------------------------------------------------- layout
def test_autopet_layout_and_dtypes(autopet):
    root, records = autopet
    assert len(records) == N_CASES
    side = json.loads((root / "phantoms.json").read_text())
    assert side["cases"] == N_CASES and side["layout"] == "autopet" and side["seed"] == SEED
    assert side["status"] == "complete" and side["patients"] == 3
    assert [r["case"] for r in side["studies"]] == [r["case"] for r in records]
    for rec in records:
        assert CASE_RE.match(rec["case"]) and rec["case"].startswith(rec["patient_id"] + "_")
        assert STUDY_RE.match(rec["study_id"])
        study = root / rec["patient_id"] / rec["study_id"]
        assert sorted(p.name for p in study.iterdir()) == sorted(
            f"{k}.nii.gz" for k in ("CT", "CTres", "PET", "SUV", "SEG"))
        assert rec["paths"]["SEG"] == f"{rec['patient_id']}/{rec['study_id']}/SEG.nii.gz"
        dtypes = {k: _load(root, p).get_data_dtype() for k, p in rec["paths"].items()}
        assert dtypes["CT"] == np.int16 and dtypes["SEG"] == np.uint8
        assert dtypes["CTres"] == np.float32 and dtypes["SUV"] == np.float32
        assert dtypes["PET"] == np.dtype(rec["pet_storage"]["dtype"])
        assert (root / rec["preview"]).stat().st_size > 5000
        assert (root / rec["preview"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the seed was picked for this coverage; if the generator changes, pick another seed
    assert {r["centre"] for r in records} == {"A", "C", "D"}
    assert any(r["tumour_free"] for r in records) and sum(r["n_lesions"] for r in records) >= 8


def test_nnunet_layout(nnunet, autopet):
    root, records = nnunet
    ds = json.loads((root / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "CT", "1": "PET"}
    assert ds["labels"] == {"background": 0, "lesion": 1}
    assert ds["numTraining"] == N_CASES and ds["file_ending"] == ".nii.gz"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == sorted(
        f"{r['case']}_{c}.nii.gz" for r in records for c in ("0000", "0001"))
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == sorted(f"{r['case']}.nii.gz" for r in records)
    aroot, arecs = autopet
    for rec, arec in zip(records, arecs):
        assert rec["case"] == arec["case"] and CASE_RE.match(rec["case"])
        ct, pet = _load(root, f"imagesTr/{rec['case']}_0000.nii.gz"), _load(root, f"imagesTr/{rec['case']}_0001.nii.gz")
        lab = _load(root, f"labelsTr/{rec['case']}.nii.gz")
        assert ct.shape == pet.shape == lab.shape
        assert np.allclose(ct.affine, pet.affine) and np.allclose(ct.affine, lab.affine)
        assert lab.get_data_dtype() == np.uint8 and set(np.unique(np.asarray(lab.dataobj))) <= {0, 1}
        # the same study whatever the layout: _0000 = CTres, _0001 = SUV, label = SEG
        for nn, key in ((ct, "CTres"), (pet, "SUV"), (lab, "SEG")):
            ref = _load(aroot, arec["paths"][key])
            assert np.array_equal(np.asarray(nn.dataobj), np.asarray(ref.dataobj)), key
            assert np.allclose(nn.affine, ref.affine)


# ---------------------------------------------------------------------------- geometry
def test_pet_grid_files_share_the_pet_affine(autopet):
    root, records = autopet
    for rec in records:
        imgs = {k: _load(root, rec["paths"][k]) for k in ("CTres", "PET", "SUV", "SEG")}
        aff = np.array(rec["pet_grid"]["affine"])
        for k, img in imgs.items():
            assert img.shape == tuple(rec["pet_grid"]["shape"]), k
            assert np.allclose(img.affine, aff, atol=1e-4), k
            assert "".join(nib.aff2axcodes(img.affine)) == rec["pet_grid"]["axcodes"]
            assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
            assert np.allclose(img.header.get_qform(), img.header.get_sform(), atol=1e-4)
        ct = _load(root, rec["paths"]["CT"])
        assert np.allclose(ct.affine, np.array(rec["ct_grid"]["affine"]), atol=1e-4)
        assert ct.shape == tuple(rec["ct_grid"]["shape"])
        in_plane = [np.abs(img.affine[:2, :3]).max(axis=1) for img in (ct, imgs["SUV"])]   # world x, y
        assert np.all(in_plane[0] < in_plane[1])                          # CT on a finer grid
    axcodes = {r["centre"]: r["pet_grid"]["axcodes"] for r in records}
    assert axcodes == {"A": "LPS", "C": "SPL", "D": "RPI"}


def test_ctres_is_ct_resampled_through_the_affines(autopet):
    """CTres = trilinear CT at the PET voxel centres, computed here independently with
    scipy.ndimage.map_coordinates through the two affines; body centroids agree in world."""
    root, records = autopet
    for rec in records:
        ct, ctres = _load(root, rec["paths"]["CT"]), _load(root, rec["paths"]["CTres"])
        C, R = ct.get_fdata(), ctres.get_fdata()
        ijk = np.indices(R.shape).reshape(3, -1).T
        src = nib.affines.apply_affine(np.linalg.inv(ct.affine) @ ctres.affine, ijk)
        inside = np.all((src >= 0) & (src <= np.array(C.shape) - 1), axis=1)
        ref = ndi.map_coordinates(C, src[inside].T, order=1)
        diff = np.abs(R.reshape(-1)[inside] - ref)
        assert inside.mean() > 0.5 and diff.max() <= 0.51, rec["case"]
        assert np.all(R.reshape(-1)[~np.all((src >= -0.5) & (src <= np.array(C.shape) - 0.5), axis=1)] == -1024)

        # world centroid of the body (CT > -500) inside the box both grids cover
        lo = np.maximum(_bounds(ct)[0], _bounds(ctres)[0])
        hi = np.minimum(_bounds(ct)[1], _bounds(ctres)[1])
        cents = []
        for img, D in ((ct, C), (ctres, R)):
            pts = nib.affines.apply_affine(img.affine, np.argwhere(D > -500))
            keep = np.all((pts >= lo + 8) & (pts <= hi - 8), axis=1)
            cents.append(pts[keep].mean(0))
        assert np.abs(cents[0] - cents[1]).max() < 3.0, (rec["case"], cents)


def _bounds(img):
    corners = np.array([[i, j, k] for i in (-0.5, img.shape[0] - 0.5) for j in (-0.5, img.shape[1] - 0.5)
                        for k in (-0.5, img.shape[2] - 0.5)])
    w = nib.affines.apply_affine(img.affine, corners)
    return w.min(0), w.max(0)


def test_ct_and_pet_overlap_in_world(autopet):
    root, records = autopet
    for rec in records:
        R = _load(root, rec["paths"]["CTres"]).get_fdata()
        S = _load(root, rec["paths"]["SUV"]).get_fdata()
        lab, n = ndi.label(R > -500)
        body_ct = lab == np.argmax(np.bincount(lab.ravel())[1:]) + 1    # drops the table
        body_pet = S > 0.2
        dice = 2 * (body_ct & body_pet).sum() / (body_ct.sum() + body_pet.sum())
        assert dice > 0.75, (rec["case"], dice)
        # the table is in CT only, below (posterior to) the body
        assert n >= 2


def test_lesions_sit_on_pet_hot_spots_in_world(autopet):
    root, records = autopet
    n_checked = 0
    for rec in records:
        suv, seg = _load(root, rec["paths"]["SUV"]), _load(root, rec["paths"]["SEG"])
        ct = _load(root, rec["paths"]["CT"])
        S, G, C = suv.get_fdata(), np.asarray(seg.dataobj), ct.get_fdata()
        assert (G.sum() > 0) == (rec["n_lesions"] > 0) and G.sum() == rec["lesion_voxels"]
        comps, _ = ndi.label(G)
        for les in rec["lesions"]:
            ijk = _vox(seg, les["centre_mm"])
            assert G[ijk] == 1, (rec["case"], les["id"])          # sidecar centre maps into SEG
            comp = comps == comps[ijk]
            shell = ndi.binary_dilation(comp, iterations=2) & (G == 0)
            assert S[comp].mean() > 1.1 * np.median(S[shell]), (rec["case"], les["id"], les["site"])
            assert les["seg_voxels"] >= 1 and 2.5 <= les["suv"] <= 20 and les["site"]
            assert len(les["radii_mm"]) == 3 and min(les["radii_mm"]) > 0
            # CT signature at the same world point
            c_ijk = _vox(ct, les["centre_mm"])
            if les["site"] == "bone":           # lytic or sclerotic
                assert (C[c_ijk] < 400) == (les["ct_hu"] < 400), (rec["case"], les["id"], C[c_ijk], les["ct_hu"])
            else:
                assert abs(C[c_ijk] - les["ct_hu"]) < 150, (rec["case"], les["id"], C[c_ijk], les["ct_hu"])
            if les["site"] == "lung":
                assert C[c_ijk] > -300          # soft tissue where the lung is at -850
            n_checked += 1
    assert n_checked >= 8
    sites = {les["site"] for rec in records for les in rec["lesions"]}
    assert {"lung", "liver", "bone"} <= sites


# ---------------------------------------------------------------------------- values
def test_value_ranges_and_units(autopet):
    root, records = autopet
    for rec in records:
        ct, suv, pet = (_load(root, rec["paths"][k]) for k in ("CT", "SUV", "PET"))
        C, S, P = ct.get_fdata(), suv.get_fdata(), pet.get_fdata()
        lm = rec["landmarks_mm"]
        assert C.min() == -1024 and C.max() <= 3071 and C.max() >= 500
        assert S.min() >= 0 and 0.3 < np.median(S[S > 0.1]) < 1.2        # background 0.5-1
        # SUV = PET [Bq/mL] * suv_factor (SUV stored on a 1/4096 grid)
        assert np.abs(S - P * rec["suv_factor"]).max() < 2.5e-4
        assert 1e-4 < rec["suv_factor"] < 1e-3 and rec["pet_units"] == "Bq/mL"

        def med(img, data, key, f=np.median, n=1):
            return float(f(_neighbourhood(data, _vox(img, lm[key]), n)))

        for lung in ("lung_r", "lung_l"):
            assert -950 < med(ct, C, lung) < -700 and med(suv, S, lung) < 0.9
        assert 30 < med(ct, C, "liver") < 140 and 1.5 < med(suv, S, "liver") < 3.6
        assert 10 < med(ct, C, "brain_white_matter") < 60
        assert med(suv, S, "brain_white_matter", np.max, 2) > 4.0     # grey matter nearby
        assert -20 < med(ct, C, "bladder") < 40 and med(suv, S, "bladder", np.max, 2) > 3.0
        assert med(ct, C, "vertebra_L3", np.max) > 400


def test_organ_values_on_the_default_size():
    """Organ SUV / HU at the default `small` size (in memory; one study)."""
    plan = plan_study(SEED, SIZES["small"], 0, *case_table(SEED, 1)[0])
    r = render_study(plan)
    ct_hu = r.ct_hu

    def at(data, grid, key, f=np.median, n=1):
        ijk = np.round(grid.world_to_voxel(plan.to_world(plan.anatomy.landmarks[key]))).astype(int)
        return float(f(_neighbourhood(data, ijk, n)))

    pg, cg = plan.pet_grid, plan.ct_grid
    assert 1.7 < at(r.suv, pg, "liver") < 3.3 and 40 < at(ct_hu, cg, "liver") < 130
    assert at(r.suv, pg, "brain_white_matter", np.max, 3) > 5.0
    assert at(r.suv, pg, "bladder", np.max) > 4.0
    assert at(r.suv, pg, "lung_r") < 0.7 and -920 < at(ct_hu, cg, "lung_r") < -780
    assert 150 < at(ct_hu, cg, "vertebra_L3") < 350 and at(ct_hu, cg, "vertebra_L3", np.max, 8) > 600  # marrow, cortex
    assert 0.4 < np.median(r.suv[(r.suv > 0.1)]) < 1.2


def test_tissue_tables_follow_the_spec():
    rng = np.random.default_rng(0)
    for contrast in (False, True):
        for _ in range(50):
            hu, suv = tissue_tables(rng, contrast)
            assert hu[T["air"]] == -1000 and -900 <= hu[T["lung"]] <= -800
            assert -120 <= hu[T["fat"]] <= -80 and 30 <= hu[T["muscle"]] <= 60
            assert 400 <= hu[T["cortical_bone"]] <= 1200
            assert 6 <= suv[T["grey_matter"]] <= 10 and 1 <= suv[T["myocardium"]] <= 8
            assert 2 <= suv[T["liver"]] <= 3 and suv[T["bladder"]] >= 5 and suv[T["renal_pelvis"]] >= 5
            assert 0.5 <= suv[T["muscle"]] <= 1.0 and suv[T["blood"]] > suv[T["muscle"]]
            if not contrast:
                assert 40 <= hu[T["liver"]] <= 70 and 30 <= hu[T["blood"]] <= 50


def test_int16_ct_scaling_reads_back_hu(autopet, tmp_path):
    root, records = autopet
    scaled = [r for r in records if r["ct_storage"]["scl_inter"] != 0 or r["ct_storage"]["scl_slope"] != 1]
    assert {r["centre"] for r in scaled} == {"C", "D"}
    for rec in scaled:
        img = _load(root, rec["paths"]["CT"])
        raw = np.asarray(img.dataobj.get_unscaled())
        slope, inter = rec["ct_storage"]["scl_slope"], rec["ct_storage"]["scl_inter"]
        assert raw.dtype == np.int16 and raw.min() >= 0                      # stored shifted
        assert (float(img.dataobj.slope), float(img.dataobj.inter)) == (slope, inter)
        hu = img.get_fdata()
        assert np.allclose(hu, raw * slope + inter) and hu.min() == -1024
    # the writer on its own: a known HU volume through slope 0.5 / inter -1024
    hu = np.array([-1024.0, -1000.0, -99.5, 0.0, 1200.5]).reshape(5, 1, 1)
    raw = np.round((hu + 1024) / 0.5).astype(np.int16)
    save_nifti(tmp_path / "ct.nii.gz", raw, Grid((5, 1, 1), np.diag([0.5, 0.5, 2.0, 1.0])), (0.5, -1024.0))
    back = nib.load(str(tmp_path / "ct.nii.gz"))
    assert back.get_data_dtype() == np.int16 and np.array_equal(back.get_fdata(), hu)
    # int16 PET of centre D comes back in Bq/mL consistent with its SUV
    d = next(r for r in records if r["centre"] == "D")
    assert d["pet_storage"]["dtype"] == "int16"


# ---------------------------------------------------------------------------- cohort
def test_patients_and_studies(autopet):
    root, records = autopet
    by_patient: dict[str, list[dict]] = {}
    for r in records:
        by_patient.setdefault(r["patient_id"], []).append(r)
    twice = [v for v in by_patient.values() if len(v) == 2]
    assert len(by_patient) == 3 and len(twice) == 1
    a, b = twice[0]
    assert (a["study_number"], b["study_number"]) == (1, 2) and b["case"].endswith("_02")
    assert b["study_date"] > a["study_date"] and a["study_id"] != b["study_id"]
    assert a["weight_kg"] == b["weight_kg"]
    # lesions evolve: ids persist, sizes change
    ids_a = {les["id"]: les for les in a["lesions"]}
    common = [les for les in b["lesions"] if les["id"] in ids_a]
    assert common and any(les["radii_mm"] != ids_a[les["id"]]["radii_mm"] for les in common)
    assert all(les["site"] == ids_a[les["id"]]["site"] for les in common)
    assert all(r["patient_studies"] == len(by_patient[r["patient_id"]]) for r in records)


def test_cohort_statistics_follow_autopet():
    """Study structure for a big cohort (planning only, no rendering)."""
    table = case_table(7, 1000)
    patients = sorted({p for p, _ in table})
    studies_per_patient = len(table) / len(patients)
    assert 1.07 < studies_per_patient < 1.2                    # AutoPET: 1014 / 900 = 1.13
    controls = np.mean([plan_patient(7, p).control for p in patients])
    assert 0.42 < controls < 0.48
    assert table[:50] == case_table(7, 50)                       # a prefix of any longer cohort
    ids = [plan_patient(7, p).patient_id for p in patients]
    assert len(set(ids)) == len(ids) and all(re.match(r"^PETCT_[0-9a-f]{10}$", i) for i in ids)


def test_deterministic_and_independent_of_cohort_size(autopet, tmp_path):
    root, records = autopet
    # two cases, two worker processes: byte-identical to the first two of the 4-case cohort
    again = generate_cohort(tmp_path / "again", 2, seed=SEED, size="tiny", workers=2, progress=False)
    for r1, r2 in zip(records[:2], again):
        assert r1["case"] == r2["case"] and r1["lesions"] == r2["lesions"]
        for key, rel in r1["paths"].items():
            assert (root / rel).read_bytes() == (tmp_path / "again" / r2["paths"][key]).read_bytes(), key
    other = generate_cohort(tmp_path / "other", 1, seed=SEED + 1, size="tiny", progress=False)
    assert other[0]["patient_id"] != records[0]["patient_id"]
    a = _load(root, records[0]["paths"]["SUV"]).get_fdata()
    b = _load(tmp_path / "other", other[0]["paths"]["SUV"]).get_fdata()
    assert a.shape != b.shape or not np.array_equal(a, b)


# ---------------------------------------------------------------------------- grids
@pytest.mark.parametrize("codes", ["RAS", "LPS", "SPL", "RPI", "IAL"])
def test_grid_affines_and_resampling(codes):
    g = Grid.from_box(codes, (2.0, 3.0, 4.0), (-20, -30, -40), (20, 30, 40))
    assert "".join(nib.aff2axcodes(g.affine)) == codes
    lo, hi = g.bounds()
    assert np.allclose(lo, [-20, -30, -40]) and np.allclose(hi, [20, 30, 40])
    X, Y, Z = g.coords()
    ijk = np.indices(g.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(g.affine, ijk)
    assert np.allclose(np.broadcast_to(X, g.shape).reshape(-1), world[:, 0])
    assert np.allclose(np.broadcast_to(Z, g.shape).reshape(-1), world[:, 2])
    # resampling a linear function of world position is exact wherever the target is inside
    fine = Grid.from_box("LPS", (1.0, 1.5, 2.0), (-25, -35, -45), (25, 35, 45))
    Xf, Yf, Zf = fine.coords()
    vol = np.broadcast_to(3 * Xf - 2 * Yf + Zf, fine.shape).astype(np.float32)
    out = resample_linear(vol, fine, g, fill=-7.0)
    assert np.allclose(out, np.broadcast_to(3 * X - 2 * Y + Z, g.shape), atol=1e-3)
    small = Grid.from_box("RAS", (1.0, 1.0, 1.0), (-5, -5, -5), (5, 5, 5))
    Xs, Ys, Zs = small.coords()
    out = resample_linear(np.broadcast_to(Xs + 0 * Ys + 0 * Zs, small.shape).astype(np.float32), small, g, -7.0)
    # inside the outer voxel edges (+-5); the half voxel beyond the outer centres takes the edge value
    inside = np.broadcast_to((np.abs(X) <= 5) & (np.abs(Y) <= 5) & (np.abs(Z) <= 5), g.shape)
    expect = np.broadcast_to(np.clip(X, -4.5, 4.5), g.shape)
    assert inside.sum() > 20 and np.all(out[~inside] == -7.0) and np.allclose(out[inside], expect[inside])


# ---------------------------------------------------------------------------- CLI
def test_cli_writes_a_cohort(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["phantoms", "--help"])
    assert exc.value.code == 0 and "--size {tiny,small,standard}" in capsys.readouterr().out
    out = tmp_path / "cli"
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--seed", "3", "--size", "tiny",
               "--layout", "nnunet", "--quiet"])
    assert rc == 0
    assert "wrote 1 studies" in capsys.readouterr().out
    side = json.loads((out / "phantoms.json").read_text())
    assert side["cases"] == 1 and side["layout"] == "nnunet" and (out / "dataset.json").is_file()
    # a previous phantom cohort may be replaced with --overwrite
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--seed", "4", "--size", "tiny", "--quiet",
               "--overwrite"])
    assert rc == 0 and json.loads((out / "phantoms.json").read_text())["seed"] == 4
    assert not (out / "dataset.json").exists()        # the old nnU-Net cohort is gone


@pytest.mark.parametrize("argv, message", [
    (["--cases", "0"], "--cases must be a positive integer"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--workers", "0"], "--workers must be >= 1"),
])
def test_cli_bad_arguments(tmp_path, capsys, argv, message):
    rc = main(["phantoms", "--out", str(tmp_path / "x"), "--size", "tiny", "--quiet", *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "phantoms.json").exists()


def test_cli_refuses_non_empty_output(tmp_path, capsys):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--size", "tiny", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "is not empty" in err and "--overwrite" in err
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--size", "tiny", "--quiet", "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a phantom cohort" in err
    assert (out / "notes.txt").read_text() == "mine"               # nothing was deleted
    (tmp_path / "file").write_text("x")
    with pytest.raises(PetctError, match="not a directory"):
        generate_cohort(tmp_path / "file", 1, size="tiny", progress=False)
    with pytest.raises(PetctError, match="--size"):
        generate_cohort(tmp_path / "y", 1, size="huge", progress=False)
    with pytest.raises(PetctError, match="--layout"):
        generate_cohort(tmp_path / "y", 1, layout="bids", progress=False)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def test_overwrite_removes_only_the_cohort_s_own_files(tmp_path, capsys):
    """--overwrite replaces the files phantoms.json lists and nothing else: a user's files at
    the top, inside a generated folder, and a folder of their own all survive."""
    out = tmp_path / "cohort"
    generate_cohort(out, 2, seed=3, size="tiny", layout="nnunet", preview=True, progress=False)
    side = json.loads((out / "phantoms.json").read_text())
    assert set(side["outputs"]) == _tree(out)  # every file written was listed
    (out / "notes.txt").write_text("mine")
    (out / "imagesTr" / "extra_0000.nii.gz").write_bytes(b"my own scan")
    (out / "mine").mkdir()
    (out / "mine" / "a.txt").write_text("mine too")
    rc = main(["phantoms", "--out", str(out), "--cases", "1", "--seed", "4", "--size", "tiny", "--quiet",
               "--overwrite"])
    assert rc == 0, capsys.readouterr().err
    new = json.loads((out / "phantoms.json").read_text())
    assert new["seed"] == 4 and new["layout"] == "autopet"
    user = {"notes.txt", "imagesTr/extra_0000.nii.gz", "mine/a.txt"}
    assert _tree(out) == set(new["outputs"]) | user  # old cohort gone, user's files kept
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "imagesTr" / "extra_0000.nii.gz").read_bytes() == b"my own scan"
    assert not (out / "labelsTr").exists() and not (out / "previews").exists()  # emptied: removed
    # A second normal run with --overwrite still works, and still keeps the user's files.
    generate_cohort(out, 1, seed=4, size="tiny", overwrite=True, progress=False)
    assert _tree(out) == set(new["outputs"]) | user


def test_overwrite_after_a_crash_and_of_an_older_sidecar(tmp_path):
    out = tmp_path / "cohort"
    generate_cohort(out, 1, seed=0, size="tiny", progress=False)
    side = json.loads((out / "phantoms.json").read_text())
    (out / "notes.txt").write_text("mine")
    # A crash leaves the incomplete sidecar, which lists the files before any is written.
    (out / "phantoms.json").write_text(json.dumps({**side, "status": "incomplete", "studies": []}))
    generate_cohort(out, 1, seed=1, size="tiny", layout="nnunet", overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith("PETCT_") for p in out.iterdir())  # the seed-0 study is gone
    # A complete sidecar of an older petct (no "outputs") is read through its studies' paths.
    side = json.loads((out / "phantoms.json").read_text())
    del side["outputs"]
    (out / "phantoms.json").write_text(json.dumps(side))
    generate_cohort(out, 1, seed=0, size="tiny", overwrite=True, progress=False)
    assert not (out / "imagesTr").exists() and not (out / "dataset.json").exists()
    assert (out / "notes.txt").read_text() == "mine"
    # An unfinished one of an older petct cannot say what it wrote: refused, nothing removed.
    side = json.loads((out / "phantoms.json").read_text())
    del side["outputs"]
    (out / "phantoms.json").write_text(json.dumps({**side, "status": "incomplete", "studies": []}))
    before = _tree(out)
    with pytest.raises(PetctError, match="does not list its files"):
        generate_cohort(out, 1, seed=2, size="tiny", overwrite=True, progress=False)
    assert _tree(out) == before


def test_overwrite_never_writes_over_a_user_file(tmp_path):
    """A user's file where the new cohort would write one (not the old cohort's) is refused
    before anything is removed."""
    out = tmp_path / "cohort"
    generate_cohort(out, 1, seed=0, size="tiny", progress=False)
    before = _tree(out)
    (out / "dataset.json").write_text('{"mine": true}')  # the nnU-Net cohort would write this
    with pytest.raises(PetctError, match=r"refusing to overwrite .*dataset.json.*did not write it"):
        generate_cohort(out, 1, seed=0, size="tiny", layout="nnunet", overwrite=True, progress=False)
    assert _tree(out) == before | {"dataset.json"}
    assert json.loads((out / "dataset.json").read_text()) == {"mine": True}
