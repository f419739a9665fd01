"""Read-time normalization against numpy references (petct_jax.data.normalize, source.load_case)."""

from __future__ import annotations

import numpy as np
import pytest

from petct_jax.data.normalize import check_channels, ct_foreground_stats, make_normalizer
from petct_jax.data.source import load_case
from petct_jax.errors import PetctError
from test_data_helpers import make_store, read_all


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("norm")
    shapes = [(20, 24, 22), (18, 20, 26), (16, 22, 20)]
    labelled = make_store(str(base / "labelled"), shapes, lesions=[3, 0, 2])
    unlabelled = make_store(str(base / "unlabelled"), shapes, labelled=False, seed=1)
    return labelled, unlabelled


def test_zscore_is_the_scans_own_mean_and_std(stores):
    store = stores[0]
    for case_id in store.ids:
        arrays = read_all(store, case_id)
        out = load_case(store, store.record(case_id), ("pet", "ct"), make_normalizer("zscore"), labels=True)
        assert out["image"].dtype == np.float32 and out["image"].shape == (*arrays["pet"].shape, 2)
        for c, name in enumerate(("pet", "ct")):
            x = arrays[name].astype(np.float64)
            np.testing.assert_allclose(out["image"][..., c], (x - x.mean()) / x.std(), atol=1e-4)
        assert np.array_equal(out["label"], arrays["seg"]) and out["case"] == case_id


def test_nnunet_ct_uses_pooled_foreground_statistics(stores):
    store = stores[0]
    fg = [store.record(i)["stats"]["ct_foreground"] for i in store.ids]
    fg = [f for f in fg if f]  # the lesion-free case has none
    assert len(fg) == 2
    samples = np.concatenate([f["sample"] for f in fg]).astype(np.float64)
    lo, hi = np.percentile(samples, [0.5, 99.5])
    means, stds = np.array([f["mean"] for f in fg]), np.array([f["std"] for f in fg])
    mean = means.mean()
    std = np.sqrt(np.mean(stds ** 2 + means ** 2) - mean ** 2)
    stats = ct_foreground_stats(store.records)
    assert stats.source == "ct_foreground"
    assert stats.lo == pytest.approx(lo) and stats.hi == pytest.approx(hi)
    assert stats.mean == pytest.approx(mean) and stats.std == pytest.approx(std)
    norm = make_normalizer("nnunet", store.records)
    case_id = store.ids[1]
    arrays = read_all(store, case_id)
    out = load_case(store, store.record(case_id), ("pet", "ct"), norm)
    ct = np.clip(arrays["ct"].astype(np.float64), lo, hi)
    np.testing.assert_allclose(out["image"][..., 1], (ct - mean) / std, atol=1e-4)
    pet = arrays["pet"].astype(np.float64)  # PET keeps the per-scan z-score
    np.testing.assert_allclose(out["image"][..., 0], (pet - pet.mean()) / pet.std(), atol=1e-4)


def test_nnunet_falls_back_to_the_body_without_labelled_cases(stores):
    store = stores[1]
    stats = ct_foreground_stats(store.records)
    assert stats.source == "ct_body"
    samples = np.concatenate([store.record(i)["stats"]["ct_body"]["sample"] for i in store.ids])
    assert stats.lo == pytest.approx(np.percentile(samples.astype(np.float64), 0.5))
    with pytest.raises(PetctError, match="ct_foreground"):
        ct_foreground_stats([{"id": "x", "stats": {"ct_foreground": None, "ct_body": None}}])


def test_channel_selection(stores):
    store = stores[0]
    rec = store.record(store.ids[0])
    joint = load_case(store, rec, ("pet", "ct"), make_normalizer("zscore"))["image"]
    for channels, c in ((("pet",), 0), (("ct",), 1)):
        single = load_case(store, rec, channels, make_normalizer("zscore"))["image"]
        assert single.shape[-1] == 1 and np.array_equal(single[..., 0], joint[..., c])
    assert check_channels("pet") == ("pet",)
    for bad in (("ct", "pet"), ("pet", "pet"), ("mri",), ()):
        with pytest.raises(PetctError):
            check_channels(bad)
    with pytest.raises(PetctError, match="normalization"):
        make_normalizer("minmax")


@pytest.mark.parametrize("scheme", ["zscore", "nnunet"])
def test_writing_into_a_patch_channel_equals_a_new_array(stores, scheme):
    """`out` may be a strided channel of a channels-last patch or a contiguous array (a
    single-channel patch); either way it holds what a new array would, and the stored
    array is left alone."""
    store = stores[0]
    norm, rec = make_normalizer(scheme, store.records), store.record(store.ids[0])
    for name in ("pet", "ct"):
        stored = read_all(store, rec["id"])[name]
        kept = stored.copy()
        want = norm(name, stored, rec)
        patch = np.full((*stored.shape, 2), np.nan, np.float32)
        single = np.full((*stored.shape, 1), np.nan, np.float32)
        norm(name, stored, rec, out=patch[..., 1])
        norm(name, stored, rec, out=single[..., 0])
        assert np.array_equal(patch[..., 1], want) and np.isnan(patch[..., 0]).all()
        assert np.array_equal(single[..., 0], want) and np.array_equal(stored, kept)
