"""`petct predict` runs the plausibility checks on its inputs (preprocessing/plausibility.py):
the image checks of preprocess, and body_masks, the PET and CT bodies compared on the
harmonized grid. Phantoms of petct_jax.phantoms (tiny size, one patient per seed) on a
4x3x3 mm grid; the injected threshold network of tests/test_predict.py.

Phantoms of different seeds share one body template at nearly one position (their bodies
overlap by Dice 0.73-0.89, see plausibility.body_masks), so "the CT of another patient" is
another seed's CT moved by 4 cm or 40% wider, as a patient lying elsewhere on the table or
of another build would be.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from petct_jax import cli
from petct_jax.downstream import predict as pr
from petct_jax.errors import PetctError
from petct_jax.preprocessing import plausibility as checks
from petct_jax.preprocessing.harmonize import open_image
from petct_jax.preprocessing.readers import list_cases

SPACING = (4.0, 3.0, 3.0)
WINDOW = (16, 16, 16)
SEEDS = range(6)


class IdentityNormalizer:
    def __call__(self, channel, array, record):
        return np.asarray(array, np.float32)


@pytest.fixture(scope="module")
def threshold_fn():
    return jax.jit(lambda w: jnp.concatenate([jnp.zeros_like(w[..., :1]), w[..., :1] - 10.0], -1))


def predictor(fn, levels="error", channels=("pet", "ct")):
    return pr.Predictor(fn, channels, WINDOW, 2, SPACING, IdentityNormalizer(), batch_windows=4,
                        plausibility=checks.parse_levels(levels, checks.PREDICT_CHECKS))


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """One tiny phantom study per seed: [CaseSpec]."""
    from petct_jax.phantoms.cohort import generate_cohort

    root = tmp_path_factory.mktemp("phantoms")
    specs = []
    for seed in SEEDS:
        generate_cohort(str(root / f"seed{seed}"), 1, seed=seed, size="tiny", progress=False)
        specs += list_cases(str(root / f"seed{seed}"))
    return specs


def moved(path, out, shift_mm=(0.0, 0.0, 0.0), widen=1.0):
    """The scan at `path` moved by `shift_mm` (RAS world mm) and, with `widen`, resampled
    `widen` times wider in-plane (R and A) about its centre, voxel sizes kept; written to
    `out` (values as float32)."""
    from scipy import ndimage as ndi

    img = nib.load(path)
    data, aff = np.asarray(img.get_fdata(), np.float32), img.affine.copy()
    centre = aff[:3, :3] @ ((np.asarray(data.shape) - 1) / 2) + aff[:3, 3]
    if widen != 1.0:  # the array axes along R/A (world rows 0 and 1) grow
        zoom = [widen if int(np.argmax(np.abs(aff[:3, k]))) < 2 else 1.0 for k in range(3)]
        data = ndi.zoom(data, zoom, order=1, mode="nearest")
    aff[:3, 3] = centre - aff[:3, :3] @ ((np.asarray(data.shape) - 1) / 2) + np.asarray(shift_mm)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    nib.save(nib.Nifti1Image(data, aff), out)
    return out


def dice(p, pet, ct, levels="error,body_masks=off"):
    arrays, record = predictor(p.predict_fn, levels).harmonize(pet, ct, "case")
    grid = np.asarray(record["affine_zyx"])
    views = [(np.linalg.inv(open_image(f, "X", "case").affine) @ grid, open_image(f, "X", "case").shape)
             for f in (pet, ct)]
    return checks.body_overlap(arrays["pet"], arrays["ct"], SPACING, views)[0]


def test_a_patients_own_pet_and_ct_pass(patients, threshold_fn):
    p = predictor(threshold_fn)
    own = [dice(p, s.pet, s.ct) for s in patients]
    print("own Dice", [round(d, 3) for d in own])
    assert min(own) >= checks.BODY_MIN_DICE + 0.05  # measured 0.87-0.95
    for s in patients:
        result = p.predict(s.pet, s.ct, case=s.id)
        assert not any("body_masks" in w for w in result.record["warnings"])


def _one_line_body_error(err, pet, ct):
    msg = str(err.value)
    assert "[body_masks]" in msg and f"PET {pet}" in msg and f"CT {ct}" in msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("how", ["moved 4 cm right", "moved 4 cm anterior", "40% wider"])
def test_pet_of_one_patient_with_the_ct_of_another_is_refused(patients, threshold_fn, tmp_path, how):
    p = predictor(threshold_fn)
    shift = {"moved 4 cm right": (40.0, 0.0, 0.0), "moved 4 cm anterior": (0.0, 40.0, 0.0)}.get(how, (0, 0, 0))
    widen = 1.4 if how == "40% wider" else 1.0
    found = []
    for a, b in zip(patients, patients[1:] + patients[:1]):
        other = moved(b.ct, str(tmp_path / b.id / "CT.nii.gz"), shift, widen)
        found.append(dice(p, a.pet, other))
        with pytest.raises(PetctError) as err:
            p.predict(a.pet, other, case=a.id)
        msg = _one_line_body_error(err, a.pet, other)
        assert msg.startswith(f"{a.id}: fails plausibility: [body_masks]")
    print(how, "Dice", [round(d, 3) for d in found])
    # warn: the scan is predicted, the finding kept as a warning
    result = predictor(threshold_fn, "error,body_masks=warn").predict(a.pet, other, case=a.id)
    assert any(w.startswith("plausibility warning [body_masks]") for w in result.record["warnings"])


def test_swapped_pet_and_ct_are_refused(patients, threshold_fn):
    s = patients[0]
    with pytest.raises(PetctError, match=r"\[ct_range\].*swapped"):
        predictor(threshold_fn).predict(s.ct, s.pet, case=s.id)
    # With the value-range checks off, the bodies still do not match (measured Dice 0.01-0.06).
    with pytest.raises(PetctError) as err:
        predictor(threshold_fn, "error,ct_range=off,pet_range=off").predict(s.ct, s.pet, case=s.id)
    _one_line_body_error(err, s.ct, s.pet)
    assert dice(predictor(threshold_fn), s.ct, s.pet, "off") < checks.BODY_MIN_DICE / 2


def test_pet_only_model_without_ct_runs_no_ct_checks(patients, threshold_fn):
    # The PET stands in for the CT: ct_range would refuse it; neither it nor body_masks runs.
    s = patients[0]
    result = predictor(threshold_fn, channels=("pet",)).predict(s.pet, None, case=s.id)
    assert not any("plausibility" in w for w in result.record["warnings"])
    # The PET's own checks still do: a CT given as the PET of a PET-only model
    with pytest.raises(PetctError, match=r"\[pet_range\]"):
        predictor(threshold_fn, channels=("pet",)).predict(s.ct, None, case=s.id)


def test_batch_form_reports_a_mismatched_case_and_goes_on(tmp_path, threshold_fn, capsys):
    import argparse

    from petct_jax.phantoms.cohort import generate_cohort

    raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
    generate_cohort(raw, 2, seed=0, size="tiny", progress=False)
    bad, good = list_cases(raw)
    moved(good.ct, bad.ct + ".tmp.nii.gz", (40.0, 0.0, 0.0))
    os.replace(bad.ct + ".tmp.nii.gz", bad.ct)  # the CT of the other patient, 4 cm off
    args = argparse.Namespace(input=raw, out=out, layout="auto", probabilities=None, overwrite=False,
                              no_progress=True)
    assert pr.predict_folder(predictor(threshold_fn), args) == 1
    captured = capsys.readouterr()
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].startswith(f"FAILED {bad.id}: fails plausibility: [body_masks]")
    assert f"CT {bad.ct}" in failed[0]
    assert sorted(os.listdir(out)) == [f"{good.id}.nii.gz"]
    assert "1 predicted, 0 already there, 1 failed" in captured.out


def test_cli_option(tmp_path, capsys):
    assert checks.parse_levels("warn,body_masks=off", checks.PREDICT_CHECKS) == dict(
        {c: "warn" for c in checks.PREDICT_CHECKS}, body_masks="off")
    assert checks.parse_levels("error") == checks.default_levels()  # preprocess: unchanged
    with pytest.raises(PetctError, match="CHECK one of .*body_masks"):
        checks.parse_levels("duplicate=off", checks.PREDICT_CHECKS)  # no duplicate check per scan
    with pytest.raises(PetctError, match="body_masks"):
        checks.parse_levels("body_masks=off")  # not (yet) a preprocess check
    rc = cli.main(["predict", "--checkpoint", str(tmp_path), "--pet", "x.nii.gz", "--out",
                   str(tmp_path / "o.nii.gz"), "--plausibility", "loud"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("petct predict: error: --plausibility 'loud'") and "\n" not in err
