"""Tiny synthetic PET/CT scans for the preprocessing tests, defined in world millimetres.

A scene is a function of RAS+ world coordinates (a body ellipsoid, a hot lesion, a
dense CT marker); each image samples it on its own grid (any affine), so a correct
harmonization must put every feature back at the same world position.
"""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np

BODY_CENTER = np.array([0.0, 0.0, 0.0])
BODY_AXES = np.array([46.0, 30.0, 58.0])  # semi-axes (R, A, S) in mm
LESION = np.array([14.3, -6.7, 17.9])  # hot PET sphere / SEG, world mm
LESION_RADIUS = 9.0
MARKER = np.array([-21.4, 9.2, -24.6])  # dense CT sphere, world mm
MARKER_RADIUS = 8.0


def affine(spacing=(3.0, 3.0, 3.0), axes="RAS", shape=(36, 28, 44), center=(0.0, 0.0, 0.0)):
    """An (i, j, k) -> RAS affine whose array axes point along `axes` (e.g. "LPS", "SRA"),
    with voxel sizes `spacing` (per array axis) and the volume centred on `center`."""
    unit = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
    a = np.zeros((4, 4))
    for col, (letter, sp) in enumerate(zip(axes, spacing)):
        row, sign = unit[letter]
        a[row, col] = sign * sp
    a[3, 3] = 1.0
    a[:3, 3] = np.asarray(center) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2)
    return a


def world_coords(aff: np.ndarray, shape) -> np.ndarray:
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    return ijk @ aff[:3, :3].T + aff[:3, 3]


def _inside(world: np.ndarray, center, radius) -> np.ndarray:
    return np.linalg.norm(world - center, axis=-1) <= radius


def body(world):
    return (((world - BODY_CENTER) / BODY_AXES) ** 2).sum(-1) <= 1


def pet_values(world):
    """SUV: 1 in the body, a smooth hot blob (peak 10) around the lesion centre."""
    blob = 9.0 * np.exp(-(np.linalg.norm(world - LESION, axis=-1) ** 2) / (2 * 5.0 ** 2))
    return (body(world) * 1.0 + blob).astype(np.float32)


def ct_values(world):
    """HU: -1000 air, 40 body, a smooth dense marker (peak 1040) around MARKER."""
    marker = 1000.0 * np.exp(-(np.linalg.norm(world - MARKER, axis=-1) ** 2) / (2 * 4.0 ** 2))
    return np.where(body(world), 40.0, -1000.0) + marker


def seg_values(world):
    return _inside(world, LESION, LESION_RADIUS).astype(np.uint8)


def save(path: str, data: np.ndarray, aff: np.ndarray, *, slope=None, inter=None) -> str:
    img = nib.Nifti1Image(data, aff)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    nib.save(img, path)
    return path


def write_scan(folder: str, *, pet_affine=None, pet_shape=(36, 28, 44), ct_affine=None,
               ct_shape=None, seg=True, ct_int16_scaled=False, names=("SUV", "CTres", "SEG"),
               pet_transform=None, ct_transform=None, seg_transform=None) -> dict[str, str]:
    """Write one scan (PET, CT[, SEG]) into `folder`; returns {role: path}.

    `*_transform(array) -> array` lets a test corrupt one image (NaN, 4D, ...).
    """
    pet_affine = affine(shape=pet_shape) if pet_affine is None else pet_affine
    ct_affine = pet_affine if ct_affine is None else ct_affine
    ct_shape = pet_shape if ct_shape is None else ct_shape
    pet = pet_values(world_coords(pet_affine, pet_shape))
    ct = ct_values(world_coords(ct_affine, ct_shape))
    paths = {}
    pet = pet_transform(pet) if pet_transform else pet
    paths["pet"] = save(os.path.join(folder, f"{names[0]}.nii.gz"), pet, pet_affine)
    if ct_int16_scaled:  # stored = (HU + 1024) * 2, so HU = stored * 0.5 - 1024
        raw = np.round((ct + 1024.0) * 2.0).astype(np.int16)
        raw = ct_transform(raw) if ct_transform else raw
        paths["ct"] = save(os.path.join(folder, f"{names[1]}.nii.gz"), raw, ct_affine,
                           slope=0.5, inter=-1024.0)
    else:
        ct = ct.astype(np.float32)
        ct = ct_transform(ct) if ct_transform else ct
        paths["ct"] = save(os.path.join(folder, f"{names[1]}.nii.gz"), ct, ct_affine)
    if seg:
        s = seg_values(world_coords(pet_affine, pet_shape))
        s = seg_transform(s) if seg_transform else s
        paths["seg"] = save(os.path.join(folder, f"{names[2]}.nii.gz"), s, pet_affine)
    return paths


def weighted_centroid_world(volume: np.ndarray, affine_zyx, threshold: float) -> np.ndarray:
    """RAS+ world position of the intensity-weighted centroid of voxels above threshold
    (the weight is the excess over the threshold, so the body floor does not count)."""
    w = np.clip(volume.astype(np.float64) - threshold, 0, None)
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1)
    c = (idx * w[..., None]).reshape(-1, 3).sum(0) / w.sum()
    return (np.asarray(affine_zyx) @ np.append(c, 1.0))[:3]
