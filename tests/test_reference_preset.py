"""`--preset reference`: the authors' executed harmonization (rounded voxel sizes, SimpleITK's
array order, scipy zoom, the CT resized to the PET's shape, the body crop), checked against
an independent implementation of that procedure with SimpleITK on scans stored RAS, LAS and
LPS at AutoPET's non-round 2.0364 mm voxels; the store and runs record the preset."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

import nifti_scenes as ns
from petct_jax.preprocessing.harmonize import CaseError, harmonize
from petct_jax.preprocessing.readers import CaseSpec

sitk = pytest.importorskip("SimpleITK")

TARGET_ZYX = (3.0, 2.0, 2.0)
SHAPE = (50, 40, 36)  # i, j, k


def authors_procedure(pet_path: str, ct_path: str, seg_path: str):
    """The reference's steps as its notebooks run them, written out independently."""
    pet_img, ct_img, seg_img = (sitk.ReadImage(p) for p in (pet_path, ct_path, seg_path))
    spacing_zyx = np.round(pet_img.GetSpacing()).astype(float)[::-1]
    pet = sitk.GetArrayFromImage(pet_img).astype(np.float32)
    ct = sitk.GetArrayFromImage(ct_img).astype(np.float32)
    seg = (sitk.GetArrayFromImage(seg_img) > 0).astype(np.uint8)
    pet_z = ndi.zoom(pet, spacing_zyx / np.array(TARGET_ZYX), order=1)
    to_pet = np.array(pet_z.shape) / np.array(ct.shape)
    ct_z = ndi.zoom(ct, to_pet, order=1)
    seg_z = ndi.zoom(seg, to_pet, order=0)
    labels, _ = ndi.label(ct_z > -500)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    idx = np.nonzero(labels == sizes.argmax())
    box = tuple(slice(max(0, i.min() - 3), min(n, i.max() + 4)) for i, n in zip(idx, pet_z.shape))
    return pet_z[box], ct_z[box], seg_z[box]


@pytest.mark.parametrize("axes,int16_ct", [("RAS", False), ("LAS", True), ("LPS", False)])
def test_reference_preset_equals_the_authors_procedure(tmp_path, axes, int16_ct):
    aff = ns.affine((2.0364201, 2.0364201, 3.0), axes, SHAPE, center=(3.0, -4.0, 2.0))
    paths = ns.write_scan(str(tmp_path), pet_affine=aff, pet_shape=SHAPE, ct_int16_scaled=int16_ct)
    spec = CaseSpec(id="c", patient_id="c", cohort="t", pet=paths["pet"], ct=paths["ct"], seg=paths["seg"])
    arrays, record = harmonize(spec, TARGET_ZYX, preset="reference")
    pet, ct, seg = authors_procedure(paths["pet"], paths["ct"], paths["seg"])

    assert record["preset"] == "reference" and list(arrays["pet"].shape) == list(pet.shape)
    np.testing.assert_allclose(arrays["pet"].astype(np.float32), pet, rtol=1e-3, atol=1e-3)  # float16 store
    assert np.abs(arrays["ct"].astype(np.float32) - ct).max() <= 0.5 + 1e-3  # int16 store: rounded HU
    np.testing.assert_array_equal(arrays["seg"], seg)
    # The grid is the zoomed array's, not the canonical one: for LAS the x axis runs leftwards
    # (the reference does not reorient); the record's affine says where the voxels really are.
    x_col = np.asarray(record["affine_zyx"])[:3, 2]
    assert np.sign(x_col[0]) == (-1 if axes[0] == "L" else 1)
    lesion = np.argwhere(arrays["seg"] > 0).mean(axis=0)
    world = np.asarray(record["affine_zyx"]) @ np.array([*lesion, 1.0])
    assert np.linalg.norm(world[:3] - ns.LESION) < 2.0  # mm


def test_reference_preset_needs_the_ct_on_the_pet_grid(tmp_path):
    aff = ns.affine((2.0364201, 2.0364201, 3.0), "RAS", SHAPE)
    ct_shape = (40, 32, 30)
    paths = ns.write_scan(str(tmp_path), pet_affine=aff, pet_shape=SHAPE,
                          ct_affine=ns.affine((2.5, 2.5, 3.6), "RAS", ct_shape), ct_shape=ct_shape)
    spec = CaseSpec(id="c", patient_id="c", cohort="t", pet=paths["pet"], ct=paths["ct"], seg=paths["seg"])
    with pytest.raises(CaseError, match="not on the PET grid"):
        harmonize(spec, TARGET_ZYX, preset="reference")
    _, record = harmonize(spec, TARGET_ZYX)  # the canonical preset resamples through the affines
    assert record["preset"] == "canonical"
