"""Outputs never replace inputs or a user's files: `petct predict` refuses an output that is
(or resolves to) one of its inputs, `petct export` replaces only its own files and only with
--overwrite, and the shared helpers in petct_jax/output_paths.py."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from petct_jax import cli, store
from petct_jax.downstream import predict as pr
from petct_jax.errors import PetctError
from petct_jax.output_paths import (RECORD, read_record, refuse_existing, refuse_output_over_inputs,
                                    remove_recorded, same_path)
from petct_jax.preprocessing.export import export_case

SPACING = (3.0, 2.0, 2.0)
SHAPE = (6, 8, 10)


# ---------------------------------------------------------------- helpers


def test_same_path_sees_through_symlinks_relative_paths_and_hard_links(tmp_path, monkeypatch):
    a = tmp_path / "a.nii.gz"
    a.write_bytes(b"scan")
    os.symlink(a, tmp_path / "link.nii.gz")
    os.link(a, tmp_path / "hard.nii.gz")
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    for other in (tmp_path / "link.nii.gz", tmp_path / "hard.nii.gz", "../a.nii.gz",
                  tmp_path / "sub" / ".." / "a.nii.gz"):
        assert same_path(a, other), other
        with pytest.raises(PetctError, match=r"--out .* is the same file as --pet .*a.nii.gz"):
            refuse_output_over_inputs(other, [("--ct", None), ("--pet", str(a))])
    assert not same_path(a, tmp_path / "b.nii.gz")  # an output not written yet
    refuse_output_over_inputs(tmp_path / "b.nii.gz", [("--pet", str(a))])
    refuse_output_over_inputs("gs://bucket/x", [("--pet", "gs://bucket/x")])  # not resolvable: left alone


def test_refuse_existing_and_the_record(tmp_path):
    (tmp_path / "x").write_text("user")
    refuse_existing([tmp_path / "y"], overwrite=False)
    with pytest.raises(PetctError, match=r"--out: .*x exists; pass --overwrite"):
        refuse_existing([tmp_path / "y", tmp_path / "x"], overwrite=False)
    refuse_existing([tmp_path / "x"], overwrite=True)
    (tmp_path / "d").mkdir()
    with pytest.raises(PetctError, match="is a folder"):
        refuse_existing([tmp_path / "d"], overwrite=True)
    # A record is trusted only for names inside its own folder.
    (tmp_path / RECORD).write_text(json.dumps({"export": ["a", "../outside", "/etc/passwd", "s/b"]}))
    assert read_record(tmp_path, "export") == ["a", "s/b"]
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "b").write_text("ours")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "c").write_text("ours")
    (tmp_path / "kept" / "mine").write_text("user")
    outside = tmp_path.parent / f"{tmp_path.name}_outside"
    outside.write_text("not in the folder")
    removed = remove_recorded(tmp_path, ["s/b", "kept/c", f"../{outside.name}", "missing"])
    assert removed == ["s/b", "kept/c"]
    assert not (tmp_path / "s").exists()  # left empty: removed
    assert (tmp_path / "kept" / "mine").read_text() == "user" and outside.exists()
    assert (tmp_path / "x").read_text() == "user"


# ---------------------------------------------------------------- export


@pytest.fixture
def small_store(tmp_path):
    """A labelled case (pet, ct, seg) and an unlabelled one (pet, ct)."""
    root = str(tmp_path / "store")
    store.create(root, spacing_zyx=SPACING, chunk_zyx=SHAPE)
    rng = np.random.default_rng(0)
    for case_id, names in (("lab", ("pet", "ct", "seg")), ("unlab", ("pet", "ct"))):
        arrays = {"pet": rng.gamma(2.0, 1.0, SHAPE).astype(np.float16),
                  "ct": rng.integers(-1000, 1000, SHAPE).astype(np.int16),
                  "seg": (rng.random(SHAPE) > 0.8).astype(np.uint8)}
        arrays = {n: arrays[n] for n in names}
        store.write_case(root, case_id, arrays, chunk_zyx=SHAPE)
        store.commit_case(root, {"id": case_id, "patient_id": case_id, "cohort": "c",
                                 "shape_zyx": list(SHAPE), "spacing_zyx": list(SPACING),
                                 "affine_zyx": np.eye(4).tolist(), "arrays": list(names)})
    return root


def _export(root, case, out, *flags):
    return cli.main(["export", "--store", root, "--case", case, "--out", str(out), *flags])


def test_export_replaces_only_its_own_files_and_only_with_overwrite(small_store, tmp_path, capsys):
    out = tmp_path / "viewer"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "pet.nii.gz").write_bytes(b"my own pet file")
    rc = _export(small_store, "lab", out)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "pet.nii.gz exists" in err and "--overwrite" in err and "\n" not in err
    assert (out / "pet.nii.gz").read_bytes() == b"my own pet file"  # nothing written
    assert sorted(os.listdir(out)) == ["notes.txt", "pet.nii.gz"]

    assert _export(small_store, "lab", out, "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "my notes"  # the user's unrelated file survives
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "pet.nii.gz", "ct.nii.gz", "seg.nii.gz", RECORD])
    expected = store.Store(small_store).read("lab", ["pet"])["pet"].transpose(2, 1, 0).astype(np.float32)
    assert np.array_equal(np.asarray(nib.load(out / "pet.nii.gz").dataobj), expected)

    # A second export without --overwrite is refused; with it, it works again. An unlabelled
    # case's export removes the seg.nii.gz export wrote before (it would pass for this case's).
    assert _export(small_store, "unlab", out) == 2
    assert (out / "seg.nii.gz").exists()
    assert _export(small_store, "unlab", out, "--overwrite") == 0
    assert sorted(os.listdir(out)) == sorted(["notes.txt", "pet.nii.gz", "ct.nii.gz", RECORD])
    assert read_record(out, "export") == ["ct.nii.gz", "pet.nii.gz"]
    assert (out / "notes.txt").read_text() == "my notes"

    # A user's seg.nii.gz (not recorded as export's) is never removed.
    (out / "seg.nii.gz").write_bytes(b"my own mask")
    assert _export(small_store, "unlab", out, "--overwrite") == 0
    assert (out / "seg.nii.gz").read_bytes() == b"my own mask"


def test_export_into_a_folder_with_unrelated_files_needs_no_overwrite(small_store, tmp_path):
    out = tmp_path / "viewer"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    assert sorted(export_case(small_store, "lab", str(out))) == ["ct", "pet", "seg"]
    assert (out / "notes.txt").read_text() == "my notes"
    assert not [n for n in os.listdir(out) if ".tmp-" in n]  # temporary names renamed away


def test_export_never_writes_into_the_store(small_store, capsys):
    for out in (small_store, os.path.join(small_store, "cases"), os.path.join(small_store, "x", "..")):
        rc = _export(small_store, "lab", out, "--overwrite")
        err = capsys.readouterr().err.strip()
        assert rc == 2 and "lies in --store" in err and "\n" not in err
    assert not os.path.exists(os.path.join(small_store, "pet.nii.gz"))
    assert not os.path.exists(os.path.join(small_store, "cases", "pet.nii.gz"))


# ---------------------------------------------------------------- predict


def _scan(folder, name, value):
    path = os.path.join(folder, name)
    nib.save(nib.Nifti1Image(np.full((4, 5, 6), value, np.float32), np.eye(4)), path)
    return path


def _predict(*argv):
    return cli.main(["predict", "--checkpoint", "no_run_needed", "--no-progress", *argv])


def test_predict_refuses_an_output_over_its_inputs_before_loading(tmp_path, monkeypatch, capsys):
    """Checked before the run is read: the checkpoint need not even exist."""
    pet, ct = _scan(str(tmp_path), "SUV.nii.gz", 7.0), _scan(str(tmp_path), "CT.nii.gz", 40.0)
    before = {p: open(p, "rb").read() for p in (pet, ct)}
    os.symlink(pet, tmp_path / "alias.nii.gz")
    monkeypatch.chdir(tmp_path)
    cases = [
        (["--out", pet], f"--out {pet} is the same file as --pet {pet}"),
        (["--out", "SUV.nii.gz"], "--out SUV.nii.gz is the same file as --pet"),  # relative
        (["--out", str(tmp_path / "alias.nii.gz")], "is the same file as --pet"),  # symlink
        (["--out", str(tmp_path / "seg.nii.gz"), "--probabilities", ct],
         f"--probabilities {ct} is the same file as --ct {ct}"),
        (["--out", str(tmp_path / "seg.nii.gz"), "--probabilities", "./seg.nii.gz"],
         "the map would replace the mask"),
    ]
    for flags in ([], ["--overwrite"]):  # --overwrite never allows replacing an input
        for argv, message in cases:
            assert _predict("--pet", pet, "--ct", ct, *argv, *flags) == 2
            err = capsys.readouterr().err.strip()
            assert message in err and "\n" not in err and "Traceback" not in err, err
    assert {p: open(p, "rb").read() for p in (pet, ct)} == before  # the patient's scans are intact
    assert not os.path.exists(tmp_path / "seg.nii.gz")


def test_predict_one_scan_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    pet, ct = _scan(str(tmp_path), "SUV.nii.gz", 7.0), _scan(str(tmp_path), "CT.nii.gz", 40.0)
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"an earlier mask")
    assert _predict("--pet", pet, "--ct", ct, "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    assert f"--out: {out} exists; pass --overwrite" in err
    assert out.read_bytes() == b"an earlier mask"
    # With --overwrite the check passes and the command goes on (to the missing run here).
    assert _predict("--pet", pet, "--ct", ct, "--out", str(out), "--overwrite") == 2
    assert "no_run_needed" in capsys.readouterr().err


@pytest.fixture(scope="module")
def zero_fn():
    return jax.jit(lambda w: jnp.concatenate([jnp.zeros_like(w[..., :1]), w[..., :1] - 10.0], -1))


def _folder_args(**kw):
    import argparse
    base = dict(input=None, out=None, layout="auto", probabilities=None, overwrite=False, no_progress=True)
    base.update(kw)
    return argparse.Namespace(**base)


def _predictor(fn):
    class Identity:
        def __call__(self, channel, array, record):
            return np.asarray(array, np.float32)
    return pr.Predictor(fn, ("pet", "ct"), (16, 16, 16), 2, (6.0, 6.0, 6.0), Identity(), batch_windows=4)


def test_predict_folder_never_writes_over_inputs(tmp_path, zero_fn):
    from petct_jax.phantoms.cohort import generate_cohort

    raw = tmp_path / "raw"
    generate_cohort(raw, 2, seed=0, size="tiny", layout="nnunet", progress=False)
    labels = {n: (raw / "labelsTr" / n).read_bytes() for n in os.listdir(raw / "labelsTr")}
    p = _predictor(zero_fn)
    for overwrite in (False, True):
        # nnU-Net masks are named <case>.nii.gz, as predict names its outputs: labelsTr as --out
        # would replace the ground truth.
        args = _folder_args(input=str(raw), out=str(raw / "labelsTr"), overwrite=overwrite)
        with pytest.raises(PetctError, match=r"--out .*labelsTr.* is the same file as input .* SEG"):
            pr.predict_folder(p, args)
        with pytest.raises(PetctError, match=r"--out .*raw is the same file as --input"):
            pr.predict_folder(p, _folder_args(input=str(raw), out=str(raw), overwrite=overwrite))
        with pytest.raises(PetctError, match=r"--out .*preds lies inside --input"):
            pr.predict_folder(p, _folder_args(input=str(raw), out=str(raw / "preds"), overwrite=overwrite))
        with pytest.raises(PetctError, match="the maps would replace the masks"):
            pr.predict_folder(p, _folder_args(input=str(raw), out=str(tmp_path / "o"),
                                              probabilities=str(tmp_path / "o" / "."), overwrite=overwrite))
    assert {n: (raw / "labelsTr" / n).read_bytes() for n in os.listdir(raw / "labelsTr")} == labels


def test_predict_folder_writes_only_missing_outputs_without_overwrite(tmp_path, zero_fn):
    from petct_jax.phantoms.cohort import generate_cohort

    raw, out, prob = tmp_path / "raw", tmp_path / "pred", tmp_path / "prob"
    generate_cohort(raw, 1, seed=0, size="tiny", progress=False)
    p = _predictor(zero_fn)
    assert pr.predict_folder(p, _folder_args(input=str(raw), out=str(out))) == 0
    (name,) = os.listdir(out)
    (out / name).write_bytes(b"kept as it is")  # e.g. a mask the user edited
    (out / "notes.txt").write_text("mine")
    # Asking for probabilities afterwards writes them, and leaves the existing mask alone.
    assert pr.predict_folder(p, _folder_args(input=str(raw), out=str(out), probabilities=str(prob))) == 0
    assert (out / name).read_bytes() == b"kept as it is" and os.listdir(prob) == [name]
    # --overwrite redoes the case's own outputs; the user's other file stays.
    assert pr.predict_folder(p, _folder_args(input=str(raw), out=str(out), probabilities=str(prob),
                                             overwrite=True)) == 0
    assert nib.load(out / name).get_data_dtype() == np.uint8
    assert (out / "notes.txt").read_text() == "mine"
