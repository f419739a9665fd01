"""`petct predict`: masks land on the lesion in world space for any input orientation,
harmonization equals training's, the batch form, errors, and loading a real workdir.

Geometry is tested with an injected network whose output is a fixed function of the input
(lesion logit = SUV - 10, with an identity "normalizer" so the threshold is in SUV), which
makes the expected mask known exactly in world millimetres.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

import nifti_scenes as ns
from conftest import REPO
from petct_jax import cli
from petct_jax.data.normalize import Normalizer, make_normalizer
from petct_jax.data.source import load_case
from petct_jax.downstream import predict as pr
from petct_jax.errors import PetctError
from petct_jax.store import Store

LESION = np.array([12.0, -5.0, 14.0])  # world RAS mm
LESION_RADIUS = 12.0
DECOY = np.array([62.0, 0.0, 0.0])  # hot PET spot in the air, outside the body crop box
BODY_AXES = np.array([40.0, 30.0, 60.0])
SPACING = (4.0, 3.0, 3.0)  # the "store" spacing of the injected predictor (z, y, x)
WINDOW = (16, 16, 16)
THRESHOLD_SUV = 10.0


class IdentityNormalizer:
    """Keeps SUV units, so the injected network's threshold is in SUV."""

    def __call__(self, channel, array, record):
        return np.asarray(array, np.float32)


@pytest.fixture(scope="module")
def threshold_fn():
    # logits [0, PET - 10]: argmax = PET > 10, lesion probability = sigmoid(PET - 10)
    return jax.jit(lambda w: jnp.concatenate([jnp.zeros_like(w[..., :1]), w[..., :1] - THRESHOLD_SUV], -1))


def threshold_predictor(fn, channels=("pet", "ct"), **kw):
    return pr.Predictor(fn, channels, WINDOW, 2, SPACING, IdentityNormalizer(), batch_windows=4, **kw)


def write_scene(folder, pet_affine, pet_shape, ct_affine=None, ct_shape=None):
    """PET (SUV 1 in the body, 20 in the lesion sphere, 20 in the decoy) and CT (40 HU body,
    -1000 air) sampled on their own grids; returns (pet path, ct path)."""
    ct_affine = pet_affine if ct_affine is None else ct_affine
    ct_shape = pet_shape if ct_shape is None else ct_shape
    w = ns.world_coords(pet_affine, pet_shape)
    body = ((w / BODY_AXES) ** 2).sum(-1) <= 1
    hot = (np.linalg.norm(w - LESION, axis=-1) <= LESION_RADIUS) | (np.linalg.norm(w - DECOY, axis=-1) <= 6.0)
    pet = np.where(hot, 20.0, np.where(body, 1.0, 0.0)).astype(np.float32)
    wc = ns.world_coords(ct_affine, ct_shape)
    ct = np.where(((wc / BODY_AXES) ** 2).sum(-1) <= 1, 40.0, -1000.0).astype(np.float32)
    return (ns.save(os.path.join(folder, "SUV.nii.gz"), pet, pet_affine),
            ns.save(os.path.join(folder, "CTres.nii.gz"), ct, ct_affine))


PET_SHAPE = (35, 25, 40)  # 140 x 100 x 160 mm at 4 mm


@pytest.mark.parametrize("axes", ["RAS", "LPS", "RAI", "PIL"])
def test_mask_lands_on_the_lesion_in_world_space(tmp_path, threshold_fn, axes):
    shape = tuple(PET_SHAPE[{"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}[a]] for a in axes)
    pet_aff = ns.affine((4.0, 4.0, 4.0), axes, shape, center=(1.0, -2.0, 3.0))
    ct_aff, ct_shape = None, None
    if axes == "LPS":  # CT on its own, finer grid, other orientation
        ct_shape = (60, 44, 70)
        ct_aff = ns.affine((2.5, 2.5, 2.5), "RAS", ct_shape)
    pet, ct = write_scene(str(tmp_path), pet_aff, shape, ct_aff, ct_shape)
    out, prob = str(tmp_path / "seg.nii.gz"), str(tmp_path / "prob.nii.gz")
    result = threshold_predictor(threshold_fn).predict(pet, ct, probabilities=True)
    pr.write_prediction(result, out, prob)

    img = nib.load(out)
    assert img.shape == shape and img.get_data_dtype() == np.uint8
    np.testing.assert_allclose(img.affine, pet_aff, atol=1e-5)
    assert "".join(nib.aff2axcodes(img.affine)) == axes
    mask = np.asarray(img.dataobj)
    assert set(np.unique(mask)) == {0, 1}
    world = ns.world_coords(pet_aff, shape)
    dist = np.linalg.norm(world - LESION, axis=-1)
    assert mask[dist <= LESION_RADIUS - 5].all()  # the lesion's core, within a store voxel of its edge
    assert not mask[(dist > LESION_RADIUS + 5)].any()  # nothing elsewhere: the decoy is cropped away
    centroid = world[mask > 0].mean(axis=0)
    assert np.linalg.norm(centroid - LESION) < 1.5

    p = np.asarray(nib.load(prob).dataobj)
    assert p.dtype == np.float32 and p.shape == shape
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert p[dist <= LESION_RADIUS - 5].min() > 0.99
    decoy = np.linalg.norm(world - DECOY, axis=-1) <= 6.0
    assert decoy.any() and (p[decoy] == 0).all() and not mask[decoy].any()  # outside the crop: background


def test_mirroring_and_pet_only_models(tmp_path, threshold_fn):
    aff = ns.affine((4.0, 4.0, 4.0), "LPS", PET_SHAPE)
    pet, ct = write_scene(str(tmp_path), aff, PET_SHAPE)
    base = threshold_predictor(threshold_fn).predict(pet, ct)
    mirrored = threshold_predictor(threshold_fn, mirror=True).predict(pet, ct)
    np.testing.assert_array_equal(base.mask, mirrored.mask)  # a pointwise model is flip-equivariant
    pet_only = threshold_predictor(threshold_fn, channels=("pet",))
    np.testing.assert_array_equal(pet_only.predict(pet, ct).mask, base.mask)  # given both: uses PET only
    no_ct = pet_only.predict(pet, None)  # no CT: whole field of view, a warning; the lesion is still found
    assert any("no CT" in w for w in no_ct.record["warnings"])
    assert no_ct.record["shape_zyx"] == [40, 33, 47]  # the whole PET field of view, 160 x 100 x 140 mm
    world = ns.world_coords(aff, PET_SHAPE)
    assert no_ct.mask[np.linalg.norm(world - LESION, axis=-1) <= LESION_RADIUS - 5].all()
    assert no_ct.mask[np.linalg.norm(world - DECOY, axis=-1) <= 2].all()  # no crop: the decoy is seen


def test_errors_missing_file_non_overlap_and_ct_needed(tmp_path, threshold_fn):
    aff = ns.affine((4.0, 4.0, 4.0), "RAS", PET_SHAPE)
    pet, ct = write_scene(str(tmp_path), aff, PET_SHAPE)
    p = threshold_predictor(threshold_fn)
    with pytest.raises(PetctError, match="PET file missing: .*nope.nii.gz"):
        p.predict(str(tmp_path / "nope.nii.gz"), ct)
    with pytest.raises(PetctError, match="CT file missing"):
        p.predict(pet, str(tmp_path / "nope.nii.gz"))
    far = ns.save(str(tmp_path / "far" / "CT.nii.gz"), np.zeros(PET_SHAPE, np.float32),
                  ns.affine((4.0, 4.0, 4.0), "RAS", PET_SHAPE, center=(0.0, 0.0, 900.0)))
    with pytest.raises(PetctError, match="does not overlap the PET"):
        p.predict(pet, far)
    with pytest.raises(PetctError, match="needs a CT"):
        p.predict(pet, None)


def test_batch_form_over_autopet_and_nnunet_folders(tmp_path, threshold_fn):
    from petct_jax.phantoms.cohort import generate_cohort
    from petct_jax.preprocessing.readers import list_cases

    p = threshold_predictor(threshold_fn)
    for layout in ("autopet", "nnunet"):
        raw, out = str(tmp_path / f"raw_{layout}"), str(tmp_path / f"out_{layout}")
        generate_cohort(raw, 2, seed=0, size="tiny", layout=layout, progress=False)
        args = _args(input=raw, out=out, layout="auto", probabilities=str(tmp_path / f"prob_{layout}"))
        assert pr.predict_folder(p, args) == 0
        names = sorted(os.listdir(out))
        assert len(names) == 2 and all(n.startswith("PETCT_") and n.endswith(".nii.gz") for n in names)
        specs = {c.id: c for c in list_cases(raw)}
        for name in names:  # on the PET grid, the same as the one-scan form
            spec = specs[name[: -len(".nii.gz")]]
            got, pet_img = nib.load(os.path.join(out, name)), nib.load(spec.pet)
            assert got.shape == pet_img.shape[:3]
            np.testing.assert_allclose(got.affine, pet_img.affine, atol=1e-5)
            np.testing.assert_array_equal(np.asarray(got.dataobj), p.predict(spec.pet, spec.ct).mask)
            prob = nib.load(os.path.join(args.probabilities, name))
            assert prob.shape == got.shape and prob.get_data_dtype() == np.float32
        mtimes = {n: os.path.getmtime(os.path.join(out, n)) for n in names}
        assert pr.predict_folder(p, args) == 0  # a re-run skips finished cases
        assert mtimes == {n: os.path.getmtime(os.path.join(out, n)) for n in names}


def _args(**kw):
    import argparse
    base = dict(input=None, out=None, layout="auto", probabilities=None, overwrite=False, no_progress=True)
    base.update(kw)
    return argparse.Namespace(**base)


def test_harmonization_and_normalization_equal_training(phantom_store, threshold_fn):
    """The network input built from the raw files equals what the data pipeline reads from the store."""
    store = Store(phantom_store)
    record = store.records[0]
    for scheme in ("zscore", "nnunet"):
        normalizer = make_normalizer(scheme, store.records)
        p = pr.Predictor(threshold_fn, ("pet", "ct"), WINDOW, 2, tuple(store.info["spacing_zyx"]), normalizer)
        arrays, rec = p.harmonize(record["sources"]["pet"], record["sources"]["ct"], record["id"])
        assert rec["shape_zyx"] == record["shape_zyx"]
        np.testing.assert_array_equal(rec["affine_zyx"], record["affine_zyx"])
        expected = load_case(store, record, ("pet", "ct"), normalizer)["image"]
        np.testing.assert_array_equal(p.image(arrays, rec), expected)


def test_run_settings_spacing_and_normalizer(phantom_store, tmp_path):
    store = Store(phantom_store)
    cfg = ml_collections.ConfigDict({"store": phantom_store, "data": {"normalization": "nnunet",
                                                                      "channels": ("pet", "ct")}})
    assert pr.run_spacing(cfg) == (tuple(store.info["spacing_zyx"]), f"{phantom_store}/store.json")
    assert pr.run_normalizer(cfg, ("pet",)) == Normalizer("zscore")  # PET is z-scored per scan either way
    with pytest.raises(PetctError, match="differs from the run's"):
        pr.run_spacing(cfg, "2,2,2")
    gone = ml_collections.ConfigDict({"store": str(tmp_path / "moved"), "data": {"normalization": "nnunet"}})
    with pytest.raises(PetctError, match="pass --spacing"):
        pr.run_spacing(gone)
    assert pr.run_spacing(gone, "3,2,2")[0] == (3.0, 2.0, 2.0)
    with pytest.raises(PetctError, match="data.ct_stats"):
        pr.run_normalizer(gone, ("pet", "ct"), str(tmp_path))
    gone.data.spacing_zyx = (3.0, 2.0, 2.0)
    stats = make_normalizer("nnunet", store.records).ct
    gone.data.ct_stats = {"lo": stats.lo, "hi": stats.hi, "mean": stats.mean, "std": stats.std,
                          "source": stats.source}
    assert pr.run_spacing(gone) == ((3.0, 2.0, 2.0), "config.data.spacing_zyx")
    assert pr.run_normalizer(gone, ("pet", "ct")) == Normalizer("nnunet", stats)
    # Without recorded statistics: pooled over the run's training scans (W/split.json), as fine-tuning did.
    train = store.ids[:3]
    (tmp_path / "split.json").write_text(json.dumps({"train": train, "val": [], "test": store.ids[3:]}))
    assert pr.run_normalizer(cfg, ("pet", "ct"), str(tmp_path)) == \
        make_normalizer("nnunet", [store.record(i) for i in train])


# ---------------------------------------------------------------- a real workdir


def make_workdir(path: str, store: str, channels=("pet", "ct"), patch=(16, 16, 16),
                 spacing=(6.0, 6.0, 6.0)) -> str:
    """A fine-tuning-like run directory: config.json and one RunCheckpointer checkpoint whose
    params are the backbone's pure dict (untrained). With an unreachable `store`, predict
    takes the spacing recorded in config.data.spacing_zyx (coarse here: few windows)."""
    from petct_jax.config import resolve
    from petct_jax.downstream.finetune import build_model
    from petct_jax.train.checkpoint import RunCheckpointer

    config = resolve(os.path.join(REPO, "configs", "finetune.py:tiny"),
                     [f"store={store}", f"data.patch={tuple(patch)}", f"data.channels={tuple(channels)}",
                      "loss.deep_supervision=True", "eval.batch_windows=4"])
    config.data.spacing_zyx = tuple(spacing)
    config.model.overrides = ml_collections.ConfigDict(dict(  # 2 stages, widths 4, 8
        n_stages=2, features_per_stage=(4, 8), strides=(1, 2), n_conv_per_stage=1,
        n_conv_per_stage_decoder=1))
    model = build_model(config, nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())  # as loop.prepare_workdir writes it
    ckpt = RunCheckpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(3, {"step": np.int32(3), "params": params}, config=config.to_dict(), metrics={"val_loss": 0.5})
    ckpt.wait()
    ckpt.close()
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    return make_workdir(str(root / "w"), str(root / "store_not_here"))


def test_end_to_end_from_a_workdir(workdir, tmp_path, capsys):
    from petct_jax.phantoms.cohort import generate_cohort

    raw, out, probs = str(tmp_path / "raw"), str(tmp_path / "pred"), str(tmp_path / "prob")
    generate_cohort(raw, 2, seed=0, size="tiny", progress=False)
    argv = ["predict", "--checkpoint", workdir, "--input", raw, "--out", out, "--probabilities", probs,
            "--no-progress"]  # batch_windows 4 from the run's eval settings
    assert cli.main(argv) == 0
    names = sorted(os.listdir(out))
    assert len(names) == 2 and sorted(os.listdir(probs)) == names
    study = [dp for dp, _, fs in os.walk(raw) if "SUV.nii.gz" in fs][0]
    pet = os.path.join(study, "SUV.nii.gz")
    # The one-scan form on one study (2 windows per call) gives what the batch form gave.
    single, single_prob = str(tmp_path / "one.nii.gz"), str(tmp_path / "one_prob.nii.gz")
    assert cli.main(["predict", "--checkpoint", workdir, "--which", "3", "--pet", pet, "--ct",
                     os.path.join(study, "CTres.nii.gz"), "--out", single, "--probabilities", single_prob,
                     "--no-progress", "--batch-windows", "2"]) == 0
    p = np.asarray(nib.load(single_prob).dataobj)
    assert 0.0 <= p.min() and p.max() <= 1.0 and p.std() > 0  # a real, varying output
    match = [n for n in names if np.asarray(nib.load(os.path.join(probs, n)).dataobj).shape == p.shape
             and np.allclose(np.asarray(nib.load(os.path.join(probs, n)).dataobj), p, atol=1e-5)]
    assert len(match) == 1
    np.testing.assert_array_equal(np.asarray(nib.load(os.path.join(out, match[0])).dataobj),
                                  np.asarray(nib.load(single).dataobj))
    got = nib.load(single)
    assert got.shape == nib.load(pet).shape and got.get_data_dtype() == np.uint8
    np.testing.assert_allclose(got.affine, nib.load(pet).affine, atol=1e-5)
    assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1}
    capsys.readouterr()
    assert cli.main(argv) == 0
    assert "0 predicted, 2 already there" in capsys.readouterr().out


def test_workdir_errors(workdir, tmp_path, capsys):
    aff = ns.affine((4.0, 4.0, 4.0), "RAS", PET_SHAPE)
    pet, ct = write_scene(str(tmp_path), aff, PET_SHAPE)
    out = str(tmp_path / "seg.nii.gz")

    def error(argv):
        assert cli.main(["predict", *argv, "--out", out, "--no-progress"]) == 2
        return capsys.readouterr().err.strip()

    assert "needs --ct" in error(["--checkpoint", workdir, "--pet", pet])
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((open(os.path.join(workdir, "config.json")).read()))
    assert "no finished checkpoint" in error(["--checkpoint", str(empty), "--pet", pet, "--ct", ct])
    assert "not a petct run directory" in error(["--checkpoint", str(tmp_path), "--pet", pet, "--ct", ct])
    assert "no checkpoint at step 7" in error(["--checkpoint", workdir, "--which", "7", "--pet", pet, "--ct", ct])
    msg = error(["--checkpoint", workdir, "--pet", str(tmp_path / "missing.nii.gz"), "--ct", ct])
    assert msg == f"petct predict: error: --pet {tmp_path / 'missing.nii.gz'}: no such file"
    # A config whose channels disagree with the checkpoint: named, one line.
    wrong = str(tmp_path / "wrong")
    os.makedirs(wrong)
    os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(wrong, "checkpoints"))
    cfg = json.load(open(os.path.join(workdir, "config.json")))
    cfg["data"]["channels"] = ["pet"]
    json.dump(cfg, open(os.path.join(wrong, "config.json"), "w"))
    msg = error(["--checkpoint", wrong, "--pet", pet])
    assert "has shape" in msg and "1 input channel" in msg and "\n" not in msg
    cfg["task"] = "mae"
    json.dump(cfg, open(os.path.join(wrong, "config.json"), "w"))
    assert "holds a 'mae' run" in error(["--checkpoint", wrong, "--pet", pet, "--ct", ct])
    assert not os.path.exists(out)


def test_outputs_never_replace_the_input_and_need_overwrite(workdir, tmp_path, capsys):
    """`--out` equal to the PET input used to overwrite the patient's SUV with the mask (rc 0)."""
    aff = ns.affine((4.0, 4.0, 4.0), "RAS", PET_SHAPE)
    pet, ct = write_scene(str(tmp_path), aff, PET_SHAPE)
    before = open(pet, "rb").read()
    base = ["predict", "--checkpoint", workdir, "--pet", pet, "--ct", ct, "--no-progress"]
    for out in (pet, os.path.relpath(pet), os.path.join(str(tmp_path), ".", "SUV.nii.gz")):
        for flags in ([], ["--overwrite"]):
            assert cli.main([*base, "--out", out, *flags]) == 2
            err = capsys.readouterr().err.strip()
            assert f"--out {out} is the same file as --pet {pet}" in err and "\n" not in err
    assert open(pet, "rb").read() == before
    out = str(tmp_path / "seg.nii.gz")
    assert cli.main([*base, "--out", out]) == 0
    first = open(out, "rb").read()
    first_mask = np.asarray(nib.load(out).dataobj)
    capsys.readouterr()
    assert cli.main([*base, "--out", out]) == 2  # an existing output needs --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert open(out, "rb").read() == first
    assert cli.main([*base, "--out", out, "--overwrite"]) == 0  # a second run with --overwrite works
    np.testing.assert_array_equal(np.asarray(nib.load(out).dataobj), first_mask)  # the same prediction
    assert nib.load(out).get_data_dtype() == np.uint8 and open(pet, "rb").read() == before
