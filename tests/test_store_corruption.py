"""A damaged store is named, never read as fill values or garbage: deleted shards, flipped
bytes in chunk data or the shard index, edited zarr.json, a manifest that disagrees with its
arrays. Each case asserts the one-line error (naming case, array and file), what
`petct store-info` reports, and that the sound cases still read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from petct_jax import cli, store
from petct_jax.errors import PetctError

SPACING = (3.0, 2.0, 2.0)
SHAPE = (20, 24, 28)


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"pet": rng.gamma(2.0, 1.0, SHAPE).astype(np.float16),
            "ct": rng.integers(-1024, 2000, SHAPE).astype(np.int16),
            "seg": (rng.random(SHAPE) > 0.9).astype(np.uint8)}


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "store")
    store.create(r, spacing_zyx=SPACING, chunk_zyx=(8, 16, 16))
    for i, case_id in enumerate(("p1_a", "p2_a")):
        arrays = _arrays(i)
        store.write_case(r, case_id, arrays, chunk_zyx=(8, 16, 16))
        store.commit_case(r, {"id": case_id, "patient_id": case_id[:2], "cohort": "c",
                              "shape_zyx": list(SHAPE), "spacing_zyx": list(SPACING),
                              "affine_zyx": np.eye(4).tolist(), "arrays": list(arrays)})
    return r


def _shard(root: str, case_id: str, name: str) -> str:
    return os.path.join(root, "cases", case_id, name, "c", "0", "0", "0")


def _flip(path: str, offset: int, n: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(n))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _info(root: str, capsys, *flags: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = cli.main(["store-info", root, *flags])
    return rc, capsys.readouterr().out


def _sound_case_reads(root: str) -> None:
    got = store.Store(root).read("p2_a", ["pet", "ct", "seg"])
    for name, want in _arrays(1).items():
        assert np.array_equal(got[name], want)


def test_a_sound_store_verifies_and_records_digests(root, capsys):
    records = store.read_manifest(root)
    assert all(set(r["digests"]) == {"pet", "ct", "seg"} for r in records)
    assert records[0]["digests"]["ct"] == store.content_digest(_arrays(0)["ct"])
    for flags in ((), ("--verify",)):
        rc, out = _info(root, capsys, *flags)
        assert rc == 0 and "no damaged case" in out


def test_a_deleted_shard_is_named_not_read_as_fill(root, capsys):
    os.remove(_shard(root, "p1_a", "ct"))
    with pytest.raises(PetctError, match=r"case 'p1_a', array 'ct' \(.*p1_a/ct\): its data file is missing"):
        store.Store(root).read("p1_a", ["ct"])
    rc, out = _info(root, capsys)  # found without --verify: the check on open
    assert rc == 1 and "case 'p1_a', array 'ct'" in out and "p2_a" not in out
    _sound_case_reads(root)


@pytest.mark.parametrize("n_bytes", [1, 64])
def test_flipped_bytes_in_chunk_data_fail_the_chunk_checksum(root, capsys, n_bytes):
    _flip(_shard(root, "p1_a", "pet"), 40, n_bytes)
    s = store.Store(root)
    with pytest.raises(PetctError, match=r"case 'p1_a', array 'pet' .*: damaged \(.*[Dd]igest mismatch"):
        s.read("p1_a", ["pet"])
    rc, out = _info(root, capsys, "--verify")
    assert rc == 1 and "case 'p1_a', array 'pet'" in out and "damaged" in out
    _sound_case_reads(root)


def test_a_damaged_shard_index_is_a_one_line_error(root):
    path = _shard(root, "p1_a", "seg")
    _flip(path, os.path.getsize(path) - 10, 4)  # the index (and its crc32c) ends the shard
    with pytest.raises(PetctError, match=r"case 'p1_a', array 'seg' .*: damaged"):
        store.Store(root).read("p1_a", ["seg"])


def _edit_zarr_json(root: str, case_id: str, name: str, edit) -> None:
    path = os.path.join(root, "cases", case_id, name, "zarr.json")
    with open(path) as f:
        meta = json.load(f)
    edit(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def test_an_edited_zarr_json_dtype_is_refused(root, capsys):
    _edit_zarr_json(root, "p1_a", "ct", lambda m: m.update(data_type="uint16"))
    with pytest.raises(PetctError, match=r"array 'ct' .*zarr.json says uint16, the store keeps ct as int16"):
        store.Store(root).read("p1_a", ["ct"])
    rc, out = _info(root, capsys)
    assert rc == 1 and "uint16" in out


def test_garbage_zarr_json_is_a_one_line_error(root):
    with open(os.path.join(root, "cases", "p1_a", "pet", "zarr.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(PetctError, match=r"case 'p1_a', array 'pet' .*: cannot be opened"):
        store.Store(root).read("p1_a", ["pet"])


def test_a_manifest_shape_that_differs_from_the_array_is_refused(root):
    path = os.path.join(root, "manifest.jsonl")
    records = [json.loads(line) for line in open(path)]
    records[0]["shape_zyx"] = [20, 24, 30]
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(PetctError, match=r"shape \[20, 24, 28\] but the manifest records \[20, 24, 30\]"):
        store.Store(root).read("p1_a", ["pet"])


def test_content_replaced_behind_the_manifest_fails_the_digest(root, capsys):
    """Chunks that decode cleanly but are not what was committed (an array rewritten in place):
    only the recorded digest can tell."""
    other = _arrays(7)["ct"]
    store.write_array(root, "p1_a", "ct", other, (8, 16, 16)).result()
    assert np.array_equal(store.Store(root).read("p1_a", ["ct"])["ct"], other)  # reads fine
    assert "no damaged case" in _info(root, capsys)[1]  # structure alone cannot see it
    rc, out = _info(root, capsys, "--verify")
    assert rc == 1 and "content differs from the digest" in out and "'ct'" in out


def test_export_of_a_damaged_case_names_it_and_writes_nothing(root, tmp_path, capsys):
    os.remove(_shard(root, "p1_a", "pet"))
    out = tmp_path / "exported"
    rc = cli.main(["export", "--store", root, "--case", "p1_a", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc != 0 and "case 'p1_a', array 'pet'" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_an_empty_label_is_written_and_verifies(root, capsys):
    """A tumour-free scan's all-zero label still has its data file (a missing one is damage)."""
    empty = {**_arrays(3), "seg": np.zeros(SHAPE, np.uint8)}
    store.write_case(root, "p3_a", empty, chunk_zyx=(8, 16, 16))
    store.commit_case(root, {"id": "p3_a", "patient_id": "p3", "cohort": "c", "shape_zyx": list(SHAPE),
                             "spacing_zyx": list(SPACING), "affine_zyx": np.eye(4).tolist(),
                             "arrays": list(empty)})
    assert os.path.exists(_shard(root, "p3_a", "seg"))
    rc, out = _info(root, capsys, "--verify")
    assert rc == 0 and "no damaged case" in out
