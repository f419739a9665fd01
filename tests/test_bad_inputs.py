"""Bad input ends in one line naming the file or setting, never a traceback (issue 23, point 7):
config paths that are not configs, impossible config values, damaged .safetensors / .npz
weights, a weight missing under all its aliases, a foreign store folder as `preprocess --out`,
and unicode-only case folders. Each case goes through `petct` (cli.main), and where a folder
or a cohort is involved, asserts that nothing else was lost or changed.

Damaged stores and outputs over inputs are covered in test_store_corruption.py,
test_outputs_safe.py and test_store.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest

from petct_jax import cli, store
from petct_jax.convert import io as convert_io


def _fails(argv: list[str], capsys, *named: str) -> str:
    """Run `petct ARGV`: non-zero exit, one line on stderr that names everything in `named`."""
    capsys.readouterr()
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def _snapshot(folder) -> dict[str, str]:
    """Relative path -> sha256 of every file under `folder` (hidden ones, the lock file, too)."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ----------------------------------------------------------------------------- --config paths

CONFIG_FILES = {
    "text.txt": ("hello, not a config\n", "not a Python config file"),
    "no_get_config.py": ("x = 1\n", "defines no get_config"),
    "syntax.py": ("def get_config(:\n", "not valid Python (line 1"),
    "raises.py": ("import nonexistent_module_xyz\n", "failed to load (line 1): ModuleNotFoundError"),
    "get_config_raises.py": ("def get_config(arg):\n    return 1 / 0\n",
                             "failed (line 2): ZeroDivisionError"),
    "returns_int.py": ("def get_config(arg):\n    return 5\n", "returned a int"),
}


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_a_config_path_that_is_not_a_config(tmp_path, capsys, command, name):
    text, message = CONFIG_FILES[name]
    path = tmp_path / name
    path.write_text(text)
    workdir = tmp_path / "w"
    _fails([command, "--config", str(path), "--workdir", str(workdir)], capsys, str(path), message)
    assert not workdir.exists()


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
def test_a_missing_config_or_a_directory(tmp_path, capsys, command):
    workdir = str(tmp_path / "w")
    missing = str(tmp_path / "missing.py")
    _fails([command, "--config", missing, "--workdir", workdir], capsys, missing, "no such config file")
    for folder in (tmp_path / "folder", tmp_path / "folder.py"):
        folder.mkdir()
        _fails([command, "--config", f"{folder}:tiny", "--workdir", workdir], capsys, str(folder),
               "is a directory")
    assert not os.path.exists(workdir)


# ----------------------------------------------------------------------------- config values

@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize("override, message", [
    ("total_steps=-5", "--config.total_steps=-5: must be >= 1"),
    ("total_steps=0", "--config.total_steps=0: must be >= 1"),
    ("batch_size=0", "--config.batch_size=0: must be >= 1"),
    ("optim.lr=-1e-3", "--config.optim.lr=-0.001: must be > 0"),
    ("optim.lr=0", "--config.optim.lr=0.0: must be > 0"),
    ("epochs=-1", "--config.epochs=-1: must be >= 0"),
    ("data.val_fraction=1.5", "--config.data.val_fraction=1.5: must be in [0.0, 1.0)"),
])
def test_impossible_settings_are_refused_before_training(tmp_path, capsys, command, override, message):
    workdir = tmp_path / "w"
    _fails([command, "--config", f"configs/{command}.py:tiny", "--workdir", str(workdir),
            f"--config.{override}"], capsys, message)
    assert not workdir.exists()


@pytest.mark.parametrize("ratio", ["2.0", "-0.1", "0.0", "1.0"])
def test_an_mae_ratio_outside_0_1_is_refused(tmp_path, capsys, ratio):
    _fails(["pretrain", "--config", "configs/pretrain.py:tiny", "--workdir", str(tmp_path / "w"),
            f"--config.mae.ratio={ratio}"], capsys, f"--config.mae.ratio={float(ratio)}", "(0.0, 1.0)")


def test_total_steps_is_not_checked_when_epochs_set_it():
    """With epochs > 0 the run computes total_steps itself; the check then stops at the store."""
    from petct_jax.config import resolve

    config = resolve("configs/pretrain.py:tiny", ["total_steps=0", "epochs=3"])
    assert config.total_steps == 0 and config.epochs == 3


# ----------------------------------------------------------------------------- weights files

def _good_safetensors() -> bytes:
    from safetensors.numpy import save

    return save({"a": np.arange(16, dtype=np.float32).reshape(4, 4)})


def _bad_weights() -> dict[str, bytes]:
    good = _good_safetensors()
    n = struct.unpack("<Q", good[:8])[0]
    return {
        "garbage.safetensors": b"\x93 garbage bytes, not a header at all",
        "empty.safetensors": b"",
        "three_bytes.safetensors": b"abc",
        "truncated.safetensors": good[:20],
        "header_longer_than_file.safetensors": struct.pack("<Q", 10 ** 6) + good[8:],
        "header_not_json.safetensors": good[:8] + b"{" + b" " * (n - 1) + good[8 + n:],
        "header_a_list.safetensors": struct.pack("<Q", 8) + b"[1,2,3] ",
        "data_cut_short.safetensors": good[:-10],
        "garbage.npz": b"PK\x03\x04 not a zip archive",
    }


@pytest.mark.parametrize("name", sorted(_bad_weights()))
def test_damaged_weights_files_are_named(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(_bad_weights()[name])
    out = tmp_path / "converted"
    _fails(["convert", "torch2jax", "--arch", "plain_unet", "--in", str(path), "--out", str(out)],
           capsys, str(path), "not a readable")
    assert not out.exists()


def test_a_weights_file_without_tensors_is_named(tmp_path, capsys):
    from safetensors.numpy import save_file

    path = tmp_path / "empty_dict.safetensors"
    save_file({}, str(path))
    _fails(["convert", "torch2jax", "--arch", "plain_unet", "--in", str(path),
            "--out", str(tmp_path / "out")], capsys, str(path), "no state_dict found")


def _plain_unet_state() -> dict[str, np.ndarray]:
    from flax import nnx

    from petct_jax import convert
    from petct_jax.models.plain_unet import PlainConvUNet

    model = PlainConvUNet(input_channels=2, n_stages=3, features_per_stage=(4, 6, 8),
                          kernel_sizes=3, strides=(1, 2, 2), n_conv_per_stage=2, num_classes=2,
                          n_conv_per_stage_decoder=1, conv_bias=True, rngs=nnx.Rngs(0))
    return dict(convert.to_torch(model))


def _without(state: dict, canonical: str) -> dict:
    """`state` less `canonical` under every spelling nnU-Net state_dicts carry."""
    prefix, _, leaf = canonical.rpartition(".conv.")
    aliases = {canonical, f"{prefix}.all_modules.0.{leaf}"}
    aliases |= {f"decoder.{a}" for a in aliases if a.startswith("encoder.")}
    assert aliases <= set(state), aliases - set(state)  # the test deletes what is there
    return {k: v for k, v in state.items() if k not in aliases}


@pytest.mark.parametrize("key", [
    "encoder.stages.0.0.convs.0.conv.weight",  # was KeyError: (0, 0)
    "encoder.stages.1.0.convs.1.conv.weight",
    "decoder.stages.0.convs.0.conv.weight",  # was ValueError: max() arg is an empty sequence
])
def test_a_weight_missing_under_all_its_aliases_is_named(tmp_path, capsys, key):
    full = _plain_unet_state()
    convert_io.save_state_dict(full, tmp_path / "full.safetensors")
    assert cli.main(["convert", "torch2jax", "--arch", "plain_unet", "--in",
                     str(tmp_path / "full.safetensors"), "--out", str(tmp_path / "ok")]) == 0
    path = convert_io.save_state_dict(_without(full, key), tmp_path / "missing.safetensors")
    out = tmp_path / "converted"
    _fails(["convert", "torch2jax", "--arch", "plain_unet", "--in", str(path), "--out", str(out)],
           capsys, str(path), f"missing key: {key}")
    assert not out.exists()


# ----------------------------------------------------------------------------- preprocess --out

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """3 tiny phantom studies and a store made from them."""
    from petct_jax.phantoms.cohort import generate_cohort
    from petct_jax.preprocessing.preprocess import preprocess

    root = tmp_path_factory.mktemp("bad_inputs")
    raw, good = str(root / "raw"), str(root / "store")
    generate_cohort(raw, 3, seed=0, size="tiny", progress=False)
    preprocess(raw, good, workers=1, progress=False)
    return raw, good


def _foreign(kind: str, folder, good: str) -> str:
    """Fill `folder` as `kind` says; the file the error must name."""
    os.makedirs(folder)
    manifest, info = os.path.join(folder, "manifest.jsonl"), os.path.join(folder, "store.json")
    if kind == "text_manifest":
        open(manifest, "w").write("subject,scan\n1,2\n")
    elif kind == "other_jsonl_manifest":
        open(manifest, "w").write('{"name": "x"}\n{"name": "y"}\n')
    elif kind == "store_manifest_without_store_json":
        shutil.copy(os.path.join(good, "manifest.jsonl"), manifest)
    elif kind == "failures_only":
        manifest = os.path.join(folder, "failures.jsonl")
        open(manifest, "w").write('{"id": "a", "error": "x"}\n')
    elif kind == "foreign_manifest_beside_store_json":
        shutil.copy(os.path.join(good, "store.json"), info)
        open(manifest, "w").write('{"name": "x"}\n')
    else:
        with open(os.path.join(good, "store.json")) as f:
            meta = json.load(f)
        shutil.copy(os.path.join(good, "manifest.jsonl"), manifest)
        if kind == "other_spacing":
            meta["spacing_zyx"] = [2.0, 2.0, 2.0]
            open(info, "w").write(json.dumps(meta))
        elif kind == "foreign_store_json":
            open(info, "w").write('{"project": "someone else"}\n')
        elif kind == "binary_store_json":
            open(info, "wb").write(bytes(range(128, 256)))
        return info
    return manifest


@pytest.mark.parametrize("kind", [
    "text_manifest", "other_jsonl_manifest", "store_manifest_without_store_json", "failures_only",
    "foreign_manifest_beside_store_json", "other_spacing", "foreign_store_json", "binary_store_json"])
def test_a_foreign_store_folder_is_refused_and_left_unchanged(cohort, tmp_path, capsys, kind):
    raw, good = cohort
    folder = tmp_path / "out"
    named = _foreign(kind, folder, good)
    before = _snapshot(folder)
    _fails(["preprocess", "--input", raw, "--out", str(folder), "--workers", "1"], capsys, named)
    assert _snapshot(folder) == before  # no store.json, no lock file, nothing appended


def test_a_file_as_the_store_folder_is_refused(cohort, tmp_path, capsys):
    raw, _ = cohort
    path = tmp_path / "notes.txt"
    path.write_text("mine\n")
    _fails(["preprocess", "--input", raw, "--out", str(path), "--workers", "1"], capsys, str(path))
    assert path.read_text() == "mine\n"


# ----------------------------------------------------------------------------- unicode folders

def test_unicode_only_folder_names_get_ids_and_the_cohort_goes_on(cohort, tmp_path, capsys):
    raw, _ = cohort
    uni = tmp_path / "raw"
    shutil.copytree(raw, uni)
    patients = sorted(os.listdir(uni))
    os.rename(uni / patients[0], uni / "患者")
    os.rename(uni / patients[1], uni / "ÄÖÜ")
    out = str(tmp_path / "store")
    capsys.readouterr()
    assert cli.main(["preprocess", "--input", str(uni), "--out", out, "--workers", "1"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    records = store.read_manifest(out)
    assert len(records) == 3 and not store.read_failures(out)
    by_patient = {r["patient_id"]: r for r in records}
    assert patients[2] in by_patient
    umlauts = [p for p in by_patient if p.startswith("AOU_")]
    others = [p for p in by_patient if p.startswith("id_")]
    assert len(umlauts) == 1 and len(others) == 1
    for record in records:  # every id is a plain file name, readable back from the store
        assert record["id"].isascii() and not record["id"].startswith(".")
        assert store.Store(out).read(record["id"], ["pet"])["pet"].size > 0


def test_sanitized_ids_keep_ascii_names_and_never_merge_unicode_ones():
    from petct_jax.preprocessing.readers import sanitize_id

    assert sanitize_id("PETCT_0af7ffe12a") == "PETCT_0af7ffe12a"
    assert sanitize_id(" a b/c ") == "a_b_c"
    assert sanitize_id("患者") == sanitize_id("患者") != sanitize_id("病人")
    assert sanitize_id("张三_0001") != sanitize_id("李四_0001")
    assert sanitize_id("ÄÖÜ").startswith("AOU_")
    assert sanitize_id("...").startswith("id_")
