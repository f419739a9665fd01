"""Patch geometry, RandZoom, rotation, foreground sampling and augmentation (petct_jax.data.patches)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import scipy.ndimage as ndi

from petct_jax.data import augment as aug
from petct_jax.data.normalize import make_normalizer
from petct_jax.data.patches import Geometry, PatchConfig, draw_geometry, sample_patch, zoomed_size
from petct_jax.errors import PetctError
from test_data_helpers import make_store, read_all

P = (16, 16, 16)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("patches") / "store")
    # case02 is smaller than the patch along z and x.
    return make_store(root, [(30, 26, 40), (24, 32, 28), (12, 20, 14)], lesions=[3, 2, 1])


class SpyStore:
    """Records the boxes read."""

    def __init__(self, store):
        self.store, self.boxes = store, []

    def read(self, case_id, names, lo=None, hi=None, fill=0, dtypes=None):
        self.boxes.append((tuple(lo), tuple(hi)))
        return self.store.read(case_id, names, lo, hi, fill, dtypes)


def _zscore(store, case_id):
    rec, arrays = store.record(case_id), read_all(store, case_id)
    return [(arrays[c].astype(np.float64) - rec["stats"][c]["mean"]) / rec["stats"][c]["std"]
            for c in ("pet", "ct")]


@pytest.mark.parametrize("scale", [0.9, 0.93, 1.0, 1.07, 1.1])
def test_zoomed_window_equals_zooming_the_whole_volume(scale):
    """Reading patch/scale and resampling it = the reference's whole-volume trilinear zoom then crop."""
    rng = np.random.default_rng(0)
    shape = (30, 26, 40)
    x = rng.normal(size=shape).astype(np.float32)
    nz = [zoomed_size(n, scale) for n in shape]
    # scipy's grid_mode zoom is torch's trilinear with align_corners=False (clamped at the edges).
    whole = ndi.zoom(x.astype(np.float64), [z / n for z, n in zip(nz, shape)], order=1,
                     grid_mode=True, mode="nearest")
    assert list(whole.shape) == nz
    for _ in range(4):
        starts = [int(rng.integers(0, z - p + 1)) for z, p in zip(nz, P)]
        geom = Geometry(shape, P, scale, starts)
        region = x[tuple(slice(a, b) for a, b in zip(geom.lo, geom.hi))]
        got = geom.apply(region)
        want = whole[tuple(slice(s, s + p) for s, p in zip(starts, P))]
        np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("scale", [0.9, 1.1])
def test_randzoom_reads_only_the_region_it_needs(scale):
    shape, patch = (300, 200, 200), (96, 128, 128)
    nz = [zoomed_size(n, scale) for n in shape]
    geom = Geometry(shape, patch, scale, [z - p for z, p in zip(nz, patch)])  # last window: edge case
    for lo, hi, p in zip(geom.lo, geom.hi, patch):
        assert math.floor(p / scale) - 1 <= hi - lo <= math.ceil(p / scale) + 2
    geom = Geometry(shape, patch, 1.0, [10, 20, 30])
    assert geom.lo == (10, 20, 30) and geom.hi == (106, 148, 158)


def test_sample_patch_reads_one_box_and_pads_after_normalization(store):
    cfg = PatchConfig.for_task("mae", patch=P, zoom_prob=0.0)
    spy = SpyStore(store)
    rec = store.record("case02")  # 12 x 20 x 14: padded along z and x
    out = sample_patch(spy, rec, cfg, make_normalizer("zscore"), np.random.default_rng(3))
    image = out["image"]
    assert image.shape == (*P, 2) and image.dtype == np.float32
    (lo, hi), = spy.boxes
    assert lo[0] == 0 and hi[0] == 12 and lo[2] == 0 and hi[2] == 14 and hi[1] - lo[1] == 16
    # SpatialPadd's symmetric padding: 2 before / 2 after along z, 1 / 1 along x.
    pet, ct = _zscore(store, "case02")
    inside = (slice(2, 14), slice(None), slice(1, 15))
    np.testing.assert_allclose(image[inside + (0,)], pet[:, lo[1]:hi[1]], atol=1e-4)
    np.testing.assert_allclose(image[inside + (1,)], ct[:, lo[1]:hi[1]], atol=1e-4)
    pad = np.ones(P, bool)
    pad[inside] = False
    assert np.all(image[pad] == 0)


def test_sample_patch_with_zoom_reads_a_smaller_or_larger_box(store):
    rec = store.record("case00")
    for zoom, compare in ((0.9, lambda n: n >= 17), (1.1, lambda n: n <= 16)):
        cfg = PatchConfig.for_task("mae", patch=P, zoom_prob=1.0, zoom_range=(zoom, zoom))
        spy = SpyStore(store)
        out = sample_patch(spy, rec, cfg, make_normalizer("zscore"), np.random.default_rng(0))
        (lo, hi), = spy.boxes
        assert all(compare(b - a) for a, b in zip(lo, hi)), (zoom, lo, hi)
        assert np.abs(out["image"]).max() > 0


def _rotated_reference(x, scale, angle, starts, spacing):
    """Every output voxel's source point, then 3D trilinear over the whole volume."""
    shape = x.shape
    nz = [zoomed_size(n, scale) for n in shape]
    ratio = [n / z for n, z in zip(shape, nz)]
    centre = [(s + (p - 1) / 2 + 0.5) * r - 0.5 for s, p, r in zip(starts, P, ratio)]
    jz, jy, jx = np.meshgrid(*[(np.arange(p) - (p - 1) / 2) * r for p, r in zip(P, ratio)], indexing="ij")
    ymm, xmm = jy * spacing[1], jx * spacing[2]
    z = centre[0] + jz
    y = centre[1] + (math.cos(angle) * ymm - math.sin(angle) * xmm) / spacing[1]
    xx = centre[2] + (math.sin(angle) * ymm + math.cos(angle) * xmm) / spacing[2]
    want = ndi.map_coordinates(x, [z, y, xx], order=1, mode="nearest")
    zi = np.arange(P[0]) + starts[0]
    inside = (y >= -0.5) & (y <= shape[1] - 0.5) & (xx >= -0.5) & (xx <= shape[2] - 0.5) \
        & ((zi >= 0) & (zi < nz[0]))[:, None, None]
    return want, inside


@pytest.mark.parametrize("scale,degrees,starts", [(1.1, 12.0, [5, 0, 0]), (0.9, -15.0, [2, 7, 10]),
                                                   (1.0, 45.0, [0, 10, 24]), (1.2, 30.0, [20, 15, 0])])
def test_rotation_about_z_matches_full_volume_resampling(scale, degrees, starts):
    shape, spacing = (30, 26, 40), (3.0, 2.0, 2.5)
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    geom = Geometry(shape, P, scale, starts, math.radians(degrees), spacing)
    got = geom.apply(x[tuple(slice(a, b) for a, b in zip(geom.lo, geom.hi))])
    want, inside = _rotated_reference(x, scale, math.radians(degrees), starts, spacing)
    np.testing.assert_allclose(got[inside], want[inside], atol=1e-5)
    assert np.all(got[~inside] == 0) and inside.sum() < inside.size  # some padding was pulled in
    assert np.array_equal(geom.where, inside)


def test_random_geometries_match_the_full_volume_reference():
    """Fuzz: volumes smaller and larger than the patch, any window, angle and scale."""
    rng = np.random.default_rng(11)
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(4, 36, size=3))
        spacing = (3.0, 2.0, float(rng.choice([2.0, 2.5])))
        scale = float(rng.uniform(0.7, 1.4))
        angle = math.radians(float(rng.uniform(-60, 60))) if rng.random() < 0.7 else 0.0
        nz = [zoomed_size(n, scale) for n in shape]
        starts = [int(rng.integers(0, z - p + 1)) if z > p else -((p - z) // 2) for z, p in zip(nz, P)]
        x = rng.normal(size=shape).astype(np.float32)
        geom = Geometry(shape, P, scale, starts, angle, spacing)
        got = geom.apply(x[tuple(slice(a, b) for a, b in zip(geom.lo, geom.hi))])
        want, inside = _rotated_reference(x, scale, angle, starts, spacing)
        if angle == 0.0:  # the separable path's own validity: inside the zoomed volume
            inside = np.zeros(P, bool)
            inside[geom.where] = True
        np.testing.assert_allclose(got[inside], want[inside], atol=1e-4)
        assert np.all(got[~inside] == 0)


def test_rotation_by_90_degrees_is_rot90():
    x = np.random.default_rng(2).normal(size=(20, 30, 30)).astype(np.float32)
    starts = [2, 7, 5]
    plain = Geometry(x.shape, P, 1.0, starts)
    crop = plain.apply(x[tuple(slice(a, b) for a, b in zip(plain.lo, plain.hi))])
    rot = Geometry(x.shape, P, 1.0, starts, math.pi / 2, (3.0, 2.0, 2.0))
    got = rot.apply(x[tuple(slice(a, b) for a, b in zip(rot.lo, rot.hi))])
    np.testing.assert_allclose(got, np.rot90(crop, -1, axes=(1, 2)), atol=1e-5)
    labels = (x > 0).astype(np.uint8)
    got_l = rot.apply(labels[tuple(slice(a, b) for a, b in zip(rot.lo, rot.hi))], linear=False)
    want_l = np.rot90(plain.apply(labels[tuple(slice(a, b) for a, b in zip(plain.lo, plain.hi))],
                                  linear=False), -1, axes=(1, 2))
    assert got_l.dtype == np.uint8 and np.array_equal(got_l, want_l)


def test_forced_foreground_patches_contain_a_lesion(store):
    cfg = PatchConfig.for_task("seg", patch=(8, 8, 8), augment=aug.AugmentConfig())
    norm = make_normalizer("zscore")
    for case_id in ("case00", "case01"):
        rec = store.record(case_id)
        for seed in range(12):
            out = sample_patch(store, rec, cfg, norm, np.random.default_rng(seed), force_foreground=True)
            assert out["label"].dtype == np.uint8 and out["label"].shape == (8, 8, 8)
            assert out["label"].sum() > 0, (case_id, seed)


def test_forced_window_keeps_the_lesion_voxel_inside():
    record = {"shape_zyx": [40, 40, 40], "spacing_zyx": [3, 2, 2],
              "lesions": [{"bbox_lo": [39, 0, 20], "bbox_hi": [40, 1, 21]}]}
    cfg = PatchConfig.for_task("seg", patch=P, augment=aug.AugmentConfig())
    geom = draw_geometry(record, cfg, np.random.default_rng(0), force_foreground=True)
    assert geom.lo[0] <= 39 < geom.hi[0] and geom.lo[1] == 0 and geom.lo[2] <= 20 < geom.hi[2]


def test_augmentation_is_deterministic_and_keeps_padding_zero(store):
    strong = aug.AugmentConfig(rotate_prob=1.0, scale_prob=1.0, noise_prob=1.0, brightness_prob=1.0,
                               contrast_prob=1.0, gamma_prob=1.0)
    cfg = PatchConfig.for_task("seg", patch=P, augment=strong)
    rec, norm = store.record("case02"), make_normalizer("zscore")
    a = sample_patch(store, rec, cfg, norm, np.random.default_rng(5))
    b = sample_patch(store, rec, cfg, norm, np.random.default_rng(5))
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    plain = dataclasses.replace(cfg, augment=dataclasses.replace(
        strong, noise_prob=0.0, brightness_prob=0.0, contrast_prob=0.0, gamma_prob=0.0))
    geom = draw_geometry(rec, plain, np.random.default_rng(5))
    outside = np.ones(P, bool)
    outside[geom.where] = False
    assert outside.any() and np.all(a["image"][outside] == 0) and np.all(a["label"][outside] == 0)
    assert not np.array_equal(a["image"], sample_patch(store, rec, plain, norm,
                                                       np.random.default_rng(5))["image"])


def test_flips_mirror_the_unflipped_patch(store):
    rec, norm = store.record("case00"), make_normalizer("zscore")
    base = PatchConfig.for_task("seg", patch=P, augment=aug.AugmentConfig())
    flipped = dataclasses.replace(base, augment=aug.AugmentConfig(flip_prob=(1.0, 0.0, 1.0)))
    a = sample_patch(store, rec, base, norm, np.random.default_rng(7))
    b = sample_patch(store, rec, flipped, norm, np.random.default_rng(7))
    assert np.array_equal(b["image"], np.flip(a["image"], (0, 2)))
    assert np.array_equal(b["label"], np.flip(a["label"], (0, 2)))


def test_single_modality_channels(store):
    rec, norm = store.record("case01"), make_normalizer("zscore")
    joint = sample_patch(store, rec, PatchConfig(patch=P), norm, np.random.default_rng(4))["image"]
    pet = sample_patch(store, rec, PatchConfig(patch=P, channels=("pet",)), norm,
                       np.random.default_rng(4))["image"]
    ct = sample_patch(store, rec, PatchConfig(patch=P, channels=("ct",)), norm,
                      np.random.default_rng(4))["image"]
    assert pet.shape == (*P, 1) and ct.shape == (*P, 1)
    assert np.array_equal(pet[..., 0], joint[..., 0]) and np.array_equal(ct[..., 0], joint[..., 1])


@pytest.mark.parametrize("task,zoom", [("mae", 0.0), ("mae", 1.0), ("seg", 0.0)])
def test_float16_patches_are_the_float32_patch_rounded_once(store, task, zoom):
    """data.dtype="float16": the same draw, the float32 values rounded to nearest once (the
    identity read path, the zoomed path, and fine-tuning augmentation)."""
    rec, norm = store.record("case00"), make_normalizer("zscore")
    kw = dict(patch=P, zoom_prob=zoom, zoom_range=(0.9, 0.9))
    f32 = sample_patch(store, rec, PatchConfig.for_task(task, **kw), norm, np.random.default_rng(5))
    f16 = sample_patch(store, rec, PatchConfig.for_task(task, dtype="float16", **kw), norm,
                       np.random.default_rng(5))
    assert f16["image"].dtype == np.float16 and f32["image"].dtype == np.float32
    assert np.array_equal(f16["image"], f32["image"].astype(np.float16))
    assert np.abs(f32["image"]).max() > 1  # not a trivially exact patch
    if task == "seg":
        assert np.array_equal(f16["label"], f32["label"])


def test_config_from_configdict_and_errors():
    import ml_collections
    c = ml_collections.ConfigDict({"channels": ("ct",), "patch": (32, 32, 32), "num_workers": 8,
                                   "zoom_prob": 0.5, "augment": {"flip_prob": (0.5, 0.5, 0.5)}})
    cfg = PatchConfig.from_config(c, task="seg")
    assert cfg.patch == (32, 32, 32) and cfg.channels == ("ct",) and cfg.labels
    assert cfg.foreground_fraction == pytest.approx(1 / 3) and cfg.augment.flip_prob == (0.5, 0.5, 0.5)
    assert cfg.augment.rotate_prob == 0.0  # a given augment group replaces the preset's
    with pytest.raises(PetctError, match="channels"):
        PatchConfig(channels=("ct", "pet"))
    with pytest.raises(PetctError, match="augment"):
        PatchConfig.from_config({"augment": {"flip": 1}})
    with pytest.raises(PetctError, match="labels"):
        PatchConfig(foreground_fraction=0.3)
    with pytest.raises(PetctError, match="data.dtype"):
        PatchConfig(dtype="bfloat16")


@pytest.mark.parametrize("case,task,kw", [
    ("case02", "seg", dict(augment=aug.AugmentConfig(rotate_prob=1.0, flip_prob=(1.0, 0.0, 1.0),
                                                     noise_prob=1.0))),
    ("case02", "mae", dict(zoom_prob=1.0)),
    ("case00", "mae", dict(zoom_prob=0.0, dtype="float16")),
    ("case00", "seg", dict(augment=aug.AugmentConfig(flip_prob=(0.0, 1.0, 0.0)))),
])
def test_sampling_into_used_batch_slots_equals_fresh_arrays(store, case, task, kw):
    """The pipeline samples into reused batch memory: old contents must not show through
    (padding, rotated-out corners) and flips must not read what they already wrote."""
    rec, norm = store.record(case), make_normalizer("zscore")
    cfg = PatchConfig.for_task(task, patch=P, **kw)
    want = sample_patch(store, rec, cfg, norm, np.random.default_rng(11))
    out = {"image": np.full(want["image"].shape, np.nan, cfg.dtype)}
    if cfg.labels:
        out["label"] = np.full(P, 255, np.uint8)
    got = sample_patch(store, rec, cfg, norm, np.random.default_rng(11), out=out)
    assert got["image"] is out["image"]
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert np.isfinite(want["image"]).all() and (want["image"] == 0).any() == (case == "case02")
