"""Harmonization of one scan: world-coordinate geometry, resampling, statistics, labels."""

from __future__ import annotations

import os
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

import nifti_scenes as ns
from petct_jax.preprocessing import harmonize as hz
from petct_jax.preprocessing.readers import CaseSpec

SPACING = (3.0, 2.0, 2.0)
HALF_VOXEL_RAS = np.array(SPACING[::-1]) / 2  # tolerance per world axis (R, A, S)


def _spec(paths: dict, case_id: str = "case") -> CaseSpec:
    return CaseSpec(id=case_id, patient_id=case_id, cohort="test", pet=paths["pet"],
                    ct=paths["ct"], seg=paths.get("seg"))


GEOMETRIES = {
    # name: (pet spacing, pet axes, pet shape, ct spacing, ct axes, ct shape, int16 CT)
    "ras": ((3.0, 3.0, 3.0), "RAS", (36, 28, 44), None, None, None, False),
    "lps": ((3.0, 3.0, 3.0), "LPS", (36, 28, 44), None, None, None, False),
    "flipped": ((3.0, 3.0, 3.0), "RPI", (36, 28, 44), None, None, None, False),
    "permuted": ((3.5, 2.5, 3.0), "SRA", (44, 40, 30), None, None, None, False),
    "anisotropic": ((2.5, 3.7, 4.1), "LAI", (44, 20, 36), None, None, None, False),
    "fine_ct": ((3.0, 3.0, 3.0), "LPS", (36, 28, 44), (1.3, 1.1, 1.7), "PSL", (64, 120, 70), False),
    "int16_ct": ((2.04, 2.04, 3.0), "LPS", (52, 40, 44), (1.5, 1.5, 2.0), "RAS", (76, 52, 68), True),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_features_land_at_their_world_positions(tmp_path, name):
    pet_sp, pet_axes, pet_shape, ct_sp, ct_axes, ct_shape, int16 = GEOMETRIES[name]
    pet_aff = ns.affine(pet_sp, pet_axes, pet_shape, center=(1.3, -2.1, 0.7))
    ct_aff = ns.affine(ct_sp, ct_axes, ct_shape, center=(-0.4, 0.9, 1.6)) if ct_sp else None
    paths = ns.write_scan(str(tmp_path), pet_affine=pet_aff, pet_shape=pet_shape,
                          ct_affine=ct_aff, ct_shape=ct_shape, ct_int16_scaled=int16)
    if int16:
        img = nib.load(paths["ct"])
        assert img.get_data_dtype() == np.int16 and img.dataobj.slope == 0.5
    arrays, rec = hz.harmonize(_spec(paths), SPACING)

    a = np.asarray(rec["affine_zyx"])
    assert np.allclose(np.abs(a[:3, :3]), [[0, 0, 2], [0, 2, 0], [3, 0, 0]])  # axis-aligned zyx
    assert (a[:3, :3] >= 0).all()  # z -> S, y -> A, x -> R: all increasing
    assert arrays["pet"].dtype == np.float16 and arrays["ct"].dtype == np.int16
    assert arrays["seg"].dtype == np.uint8 and set(np.unique(arrays["seg"])) == {0, 1}
    for arr in arrays.values():
        assert list(arr.shape) == rec["shape_zyx"]

    pet_pos = ns.weighted_centroid_world(arrays["pet"], a, 1.5)
    seg_pos = ns.weighted_centroid_world(arrays["seg"], a, 0.0)
    ct_pos = ns.weighted_centroid_world(arrays["ct"], a, 300.0)
    assert np.all(np.abs(pet_pos - ns.LESION) <= HALF_VOXEL_RAS), pet_pos
    assert np.all(np.abs(seg_pos - ns.LESION) <= HALF_VOXEL_RAS), seg_pos
    assert np.all(np.abs(ct_pos - ns.MARKER) <= HALF_VOXEL_RAS), ct_pos
    # The lesion index agrees with the stored mask, and in world space with the lesion.
    (lesion,) = rec["lesions"]
    assert lesion["voxels"] == int(arrays["seg"].sum())
    centroid_world = (a @ np.append(lesion["centroid_zyx"], 1.0))[:3]
    assert np.allclose(centroid_world, seg_pos)
    # Body values survive: SUV 1 and 40 HU away from the features.
    body = (arrays["ct"] > 0) & (arrays["ct"] < 100) & (arrays["pet"] < 1.05) & (arrays["pet"] > 0.95)
    assert body.sum() > 0.3 * (arrays["ct"] > -500).sum()
    # Crop box: world box of the stored voxels, containing the whole body ellipsoid.
    lo, hi = np.array(rec["crop_box_world_mm"]["lo"]), np.array(rec["crop_box_world_mm"]["hi"])
    assert np.allclose(hi - lo, np.array(rec["shape_zyx"][::-1]) * np.array(SPACING[::-1]))
    assert np.all(lo < ns.BODY_CENTER - ns.BODY_AXES) and np.all(hi > ns.BODY_CENTER + ns.BODY_AXES)


def test_oblique_affine_uses_the_full_matrix(tmp_path):
    shape = (36, 30, 44)
    aff = ns.affine((3.0, 3.0, 3.0), "RAS", shape)
    t = np.deg2rad(12)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    aff[:3, :3] = rot @ aff[:3, :3]
    paths = ns.write_scan(str(tmp_path), pet_affine=aff, pet_shape=shape)
    m = np.linalg.inv(aff) @ hz.target_grid(hz.open_image(paths["pet"], "PET", "x"), SPACING)[0]
    assert hz._axis_aligned_plan(m, shape, (40, 40, 40)) is None
    arrays, rec = hz.harmonize(_spec(paths), SPACING)
    a = rec["affine_zyx"]
    assert np.all(np.abs(ns.weighted_centroid_world(arrays["pet"], a, 1.5) - ns.LESION) <= HALF_VOXEL_RAS)
    assert np.all(np.abs(ns.weighted_centroid_world(arrays["seg"], a, 0) - ns.LESION) <= HALF_VOXEL_RAS)
    assert np.all(np.abs(ns.weighted_centroid_world(arrays["ct"], a, 300) - ns.MARKER) <= HALF_VOXEL_RAS)


def test_fast_path_equals_full_matrix_and_fills_outside(tmp_path):
    """The reordered 1-D path gives scipy's full-matrix result; outside the CT is -1024."""
    shape = (30, 26, 20)
    src_aff = ns.affine((1.7, 2.3, 2.9), "LPI", shape, center=(3.0, -2.0, 5.0))
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 4000, size=shape).astype(np.int16)
    path = ns.save(str(tmp_path / "ct.nii.gz"), raw, src_aff, slope=0.5, inter=-1024.0)
    img = hz.open_image(path, "CT", "x")
    dst_aff = np.array([[0, 0, 2.0, -40], [0, 2.0, 0, -38], [3.0, 0, 0, -45], [0, 0, 0, 1]])
    dst_shape = (32, 40, 42)  # larger than the CT field of view on every side
    out = hz.resample(img, img.read(), dst_aff, dst_shape, order=1, fill=-1024.0)
    m = np.linalg.inv(src_aff) @ dst_aff
    ref = ndi.affine_transform(raw.astype(np.float64), m[:3, :3], m[:3, 3], output_shape=dst_shape,
                               order=1, mode="constant", cval=np.nan) * 0.5 - 1024.0
    inside = np.isfinite(ref)
    assert inside.sum() > 1000
    assert np.abs(out[inside] - ref[inside]).max() < 1e-2
    # Target voxels whose centre lies outside every source voxel are fill.
    zyx = np.stack(np.meshgrid(*[np.arange(n) for n in dst_shape], indexing="ij"), -1)
    ijk = zyx @ m[:3, :3].T + m[:3, 3]
    outside = np.any((ijk < -0.5) | (ijk > np.array(shape) - 0.5), axis=-1)
    assert outside.sum() > 1000 and np.all(out[outside] == -1024.0)
    assert out.dtype == np.float32


def test_resampling_stays_in_small_dtypes(tmp_path):
    """An int16 CT is interpolated without a float64 copy of itself."""
    shape = (128, 128, 96)
    aff = ns.affine((1.0, 1.0, 1.5), "LPS", shape)
    raw = np.zeros(shape, np.int16)
    path = ns.save(str(tmp_path / "ct.nii.gz"), raw, aff, slope=1.0, inter=-1024.0)
    img = hz.open_image(path, "CT", "x")
    data = img.read()
    dst_aff, dst_shape = hz.target_grid(img, SPACING)
    tracemalloc.start()
    out = hz.resample(img, data, dst_aff, dst_shape, order=1, fill=-1024.0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # A float64 copy of the source alone would be 4x its int16 bytes; the separable
    # passes need about one float32 intermediate (here half the voxels) plus small slabs.
    assert peak < 3 * data.nbytes, (peak, out.nbytes, data.nbytes)


def test_statistics_match_numpy(tmp_path):
    paths = ns.write_scan(str(tmp_path), pet_affine=ns.affine((3, 3, 3), "LPS", (36, 28, 44)))
    arrays, rec = hz.harmonize(_spec(paths), SPACING)
    pet = arrays["pet"].astype(np.float64)
    ct = arrays["ct"].astype(np.float64)
    seg = arrays["seg"] > 0
    labels, _ = ndi.label(ct > hz.BODY_THRESHOLD_HU)
    body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    for key, values in (("pet", pet.ravel()), ("ct", ct.ravel()), ("ct_foreground", ct[seg]),
                        ("ct_body", ct[body])):
        s = rec["stats"][key]
        assert s["n"] == values.size
        assert np.isclose(s["mean"], values.mean(), rtol=1e-9, atol=1e-9)
        assert np.isclose(s["std"], values.std(), rtol=1e-9, atol=1e-9)
        assert (s["min"], s["max"]) == (values.min(), values.max())
        assert np.isclose(s["p00_5"], np.percentile(values, 0.5))
        assert np.isclose(s["p99_5"], np.percentile(values, 99.5))
    sample = rec["stats"]["ct_body"]["sample"]
    assert len(sample) == 256 and sample == sorted(sample)
    assert sample[0] == ct[body].min() and sample[-1] == ct[body].max()
    # The crop: body bounding box padded by 3 voxels (the body does not touch the FOV edge).
    found = ndi.find_objects(body.astype(np.uint8))[0]
    assert [sl.start for sl in found] == [3, 3, 3]
    assert [n - sl.stop for sl, n in zip(found, body.shape)] == [3, 3, 3]
    assert rec["lesion_volume_ml"] == pytest.approx(seg.sum() * 12 / 1000)


def test_lesion_index_uses_18_connectivity():
    seg = np.zeros((10, 10, 10), np.uint8)
    seg[2, 2, 2] = seg[3, 3, 2] = 1  # share an edge: one lesion (18-connected)
    seg[6, 6, 6] = seg[7, 7, 7] = 1  # share a corner only: two lesions
    lesions = hz.lesion_index(seg)
    assert sorted(les["voxels"] for les in lesions) == [1, 1, 2]
    pair = next(les for les in lesions if les["voxels"] == 2)
    assert pair["bbox_lo"] == [2, 2, 2] and pair["bbox_hi"] == [4, 4, 3]
    assert pair["centroid_zyx"] == [2.5, 2.5, 2.0]


@pytest.mark.parametrize("shift", [(0.0, 0.0, 0.0), (0.37, -0.81, 1.29), (-0.9, 0.55, -1.4)])
def test_single_voxel_lesions_survive(tmp_path, shift):
    """On AutoPET's PET grid (2.04 x 2.04 x 3 mm), nearest-neighbour keeps every 1-voxel lesion."""
    shape = (52, 40, 44)

    def dots(seg):
        out = np.zeros_like(seg)
        out[14:40:5, 12:30:6, 10:36:7] = 1  # isolated single voxels inside the body
        return out

    aff = ns.affine((2.04, 2.04, 3.0), "LPS", shape, center=shift)
    paths = ns.write_scan(str(tmp_path), pet_affine=aff, pet_shape=shape, seg_transform=dots)
    arrays, rec = hz.harmonize(_spec(paths), SPACING)
    n_source = int(dots(np.zeros(shape, np.uint8)).sum())
    assert rec["lesion_count_source"] == n_source
    assert rec["lesion_count"] == n_source and not rec["warnings"]


def test_label_values(tmp_path):
    shape = (36, 28, 44)
    paths = ns.write_scan(str(tmp_path / "two"), pet_shape=shape, seg_transform=lambda s: s * 2)
    arrays, rec = hz.harmonize(_spec(paths), SPACING)
    assert arrays["seg"].max() == 1 and rec["lesion_count"] == 1
    assert any("binarized" in w for w in rec["warnings"])
    for name, transform, message in (
            ("frac", lambda s: s.astype(np.float32) * 0.5, "fractional"),
            ("neg", lambda s: s.astype(np.int16) - 1, "negative")):
        paths = ns.write_scan(str(tmp_path / name), pet_shape=shape, seg_transform=transform)
        with pytest.raises(hz.CaseError, match=message) as err:
            hz.harmonize(_spec(paths), SPACING)
        assert err.value.file == paths["seg"]


def test_singleton_fourth_dimension_is_squeezed(tmp_path):
    paths = ns.write_scan(str(tmp_path), pet_transform=lambda p: p[..., None])
    assert len(nib.load(paths["pet"]).shape) == 4
    arrays, rec = hz.harmonize(_spec(paths), SPACING)
    assert rec["lesion_count"] == 1


def test_case_errors_name_case_and_file(tmp_path):
    paths = ns.write_scan(str(tmp_path), pet_transform=lambda p: np.stack([p, p], -1))
    with pytest.raises(hz.CaseError, match=r"^case: PET is 4D .*: " + str(tmp_path)):
        hz.harmonize(_spec(paths), SPACING)
    assert not os.path.exists(tmp_path / "cases")


def _lying_header(path: str, shape=(512, 512, 3000)) -> str:
    """A NIfTI (.nii or .nii.gz by the name) with a valid header claiming `shape` int16 but
    no voxel data: 348 header bytes + 4 extension bytes + nothing (148 bytes as gzip)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = 352
    hdr.set_qform(np.eye(4), code=1)
    raw = hdr.binaryblock + b"\0" * 4
    if path.endswith(".gz"):
        import gzip
        raw = gzip.compress(raw, mtime=0)
    with open(path, "wb") as f:
        f.write(raw)
    return path


@pytest.mark.parametrize("name", ["PET.nii", "PET.nii.gz"])
def test_a_header_claiming_more_than_the_file_holds_fails_before_allocating(tmp_path, name):
    path = _lying_header(str(tmp_path / name))
    size = os.path.getsize(path)
    tracemalloc.start()
    with pytest.raises(hz.CaseError) as err:
        hz.open_image(path, "PET", "case")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6, peak
    assert err.value.file == path
    assert f"PET header claims 512x512x3000 int16 (1.5 GiB) but the file holds {size} bytes" \
        in err.value.problem, err.value.problem


def test_a_gzip_whose_trailer_is_short_of_the_claim_is_refused(tmp_path):
    """A plausible compression ratio, but ISIZE (the uncompressed size) is below the claim."""
    import gzip
    img = nib.Nifti1Image(np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32),
                          np.eye(4))
    img.header.set_data_shape((40, 40, 80))  # claims twice the voxels it stores
    img.header["vox_offset"] = 352
    raw = img.header.binaryblock + b"\0" * 4 + img.get_fdata(dtype=np.float32).tobytes("F")
    path = str(tmp_path / "CT.nii.gz")
    with open(path, "wb") as f:
        f.write(gzip.compress(raw))
    with pytest.raises(hz.CaseError, match=rf"CT header claims 40x40x80 float32 \(500.0 KiB\) but "
                                           rf"the file holds \d+ bytes of gzip that uncompress to "
                                           rf"{len(raw)} bytes"):
        hz.open_image(path, "CT", "case")
    # An honest header of the same data opens, also written as two gzip members (the
    # trailer then counts only the second: the stream itself is measured).
    ns.save(str(tmp_path / "ok.nii.gz"), np.zeros((40, 40, 80), np.float32), np.eye(4))
    assert hz.open_image(str(tmp_path / "ok.nii.gz"), "CT", "case").shape == (40, 40, 80)
    honest = nib.Nifti1Image(np.ones((40, 40, 80), np.float32), np.eye(4))
    honest.header["vox_offset"] = 352
    block = honest.header.binaryblock + b"\0" * 4
    with open(tmp_path / "two.nii.gz", "wb") as f:
        f.write(gzip.compress(block) + gzip.compress(np.ones(128000, np.float32).tobytes()))
    img = hz.open_image(str(tmp_path / "two.nii.gz"), "CT", "case")
    assert img.read().min() == 1.0


def test_the_voxel_limit(tmp_path):
    path = ns.save(str(tmp_path / "PET.nii.gz"), np.zeros((20, 20, 20), np.float32), np.eye(4))
    assert hz.open_image(path, "PET", "case", max_voxels=8000).shape == (20, 20, 20)
    with pytest.raises(hz.CaseError, match=r"PET header claims 20x20x20 float32 \(31.2 KiB\), more "
                                           r"than the limit of 7,999 voxels \(--max-voxels\)"):
        hz.open_image(path, "PET", "case", max_voxels=7999)
