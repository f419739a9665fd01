"""The store format (petct_jax/store.py): arrays, manifest semantics, reads, pickling."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest

from petct_jax import store
from petct_jax.errors import PetctError

SPACING = (3.0, 2.0, 2.0)


def _arrays(seed: int, shape=(20, 24, 28), seg=True) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"pet": rng.gamma(2.0, 1.0, shape).astype(np.float16),
           "ct": rng.integers(-1024, 2000, shape).astype(np.int16)}
    if seg:
        out["seg"] = (rng.random(shape) > 0.9).astype(np.uint8)
    return out


def _record(case_id: str, arrays: dict, **extra) -> dict:
    return {"id": case_id, "patient_id": case_id.split("_")[0], "cohort": "c",
            "shape_zyx": list(arrays["pet"].shape), "spacing_zyx": list(SPACING),
            "affine_zyx": np.eye(4).tolist(), "arrays": list(arrays), **extra}


@pytest.fixture
def root(tmp_path):
    r = str(tmp_path / "store")
    store.create(r, spacing_zyx=SPACING, chunk_zyx=(8, 16, 16))
    return r


def test_round_trip_and_padded_reads(root):
    arrays = _arrays(0)
    nbytes = store.write_case(root, "p1_a", arrays, chunk_zyx=(8, 16, 16))
    assert nbytes == store.case_bytes(root, "p1_a") > 0
    assert nbytes < sum(a.nbytes for a in arrays.values())  # compressed
    store.commit_case(root, _record("p1_a", arrays, bytes=nbytes))
    s = store.Store(root)
    assert s.ids == ["p1_a"] and s.info["chunk_zyx"] == [8, 16, 16]
    whole = s.read("p1_a", ["pet", "ct", "seg"])
    for name, a in arrays.items():
        assert whole[name].dtype == a.dtype and np.array_equal(whole[name], a)
    # A box reaching outside the volume: the inside part is data, the rest the fill.
    box = s.read("p1_a", ["ct", "pet"], lo=(-3, 10, 20), hi=(5, 30, 36), fill=-1024)
    assert box["ct"].shape == (8, 20, 16)
    assert np.array_equal(box["ct"][3:, :14, :8], arrays["ct"][:5, 10:24, 20:28])
    assert np.all(box["ct"][:3] == -1024) and np.all(box["ct"][:, 14:] == -1024)
    assert np.all(box["pet"][:, :, 8:] == -1024)  # fill is cast to the stored dtype
    # A box entirely outside reads nothing and is all fill.
    far = s.read("p1_a", ["seg"], lo=(100, 0, 0), hi=(102, 2, 2))
    assert far["seg"].shape == (2, 2, 2) and not far["seg"].any()
    with pytest.raises(PetctError, match="no case 'nope'"):
        s.read("nope", ["pet"])
    # Converted while reading: the same values in the asked dtype, inside and padded boxes.
    for lo, hi in (((2, 3, 4), (9, 20, 25)), ((-3, 10, 20), (5, 30, 36))):
        got = s.read("p1_a", ["pet", "ct"], lo=lo, hi=hi, fill=-1, dtypes={"pet": np.float32})
        want = s.read("p1_a", ["pet", "ct"], lo=lo, hi=hi, fill=-1)
        assert got["pet"].dtype == np.float32 and got["ct"].dtype == np.int16
        assert np.array_equal(got["pet"], want["pet"].astype(np.float32))
        assert np.array_equal(got["ct"], want["ct"])


def test_unlabelled_case_has_no_seg(root):
    arrays = _arrays(1, seg=False)
    store.write_case(root, "u", arrays)
    store.commit_case(root, _record("u", arrays))
    s = store.Store(root)
    with pytest.raises(PetctError, match="has no 'seg' array"):
        s.read("u", ["seg"])


def test_manifest_later_lines_replace_earlier(root):
    for case_id, version in (("a", 1), ("b", 1), ("a", 2)):
        store.commit_case(root, _record(case_id, _arrays(0), version=version))
    records = store.read_manifest(root)
    assert [(r["id"], r["version"]) for r in records] == [("a", 2), ("b", 1)]


def test_torn_last_line_is_ignored_and_healed(root):
    store.commit_case(root, _record("a", _arrays(0)))
    path = os.path.join(root, "manifest.jsonl")
    with open(path, "a") as f:
        f.write('{"id": "b", "patient_id": "b", "coh')  # power loss mid-append
    assert [r["id"] for r in store.read_manifest(root)] == ["a"]
    store.commit_case(root, _record("c", _arrays(0)))  # the next append must not glue onto it
    assert [r["id"] for r in store.read_manifest(root)] == ["a", "c"]
    assert all(json.loads(line) for line in open(path))
    # Garbage before the last line is corruption, reported with its line number.
    a, c = (json.dumps(_record(i, _arrays(0))) for i in "ac")
    with open(path, "w") as f:
        f.write(f'{a}\nnot json\n{c}\n')
    with pytest.raises(PetctError, match="line 2 is not a JSON object"):
        store.read_manifest(root)


def test_a_last_record_without_its_newline_survives_the_next_append(root):
    store.commit_case(root, _record("a", _arrays(0)))
    path = os.path.join(root, "manifest.jsonl")
    with open(path, "a") as f:
        f.write(json.dumps(_record("b", _arrays(0))))  # complete, but no final newline
    assert [r["id"] for r in store.read_manifest(root)] == ["a", "b"]
    store.commit_case(root, _record("c", _arrays(0)))
    assert [r["id"] for r in store.read_manifest(root)] == ["a", "b", "c"]
    assert not [n for n in os.listdir(root) if ".torn-" in n]


@pytest.mark.parametrize("tail", ['{"id": "b", "pat\n', "garbage\n", "[1, 2]", '{"id": "b"'])
def test_a_malformed_last_line_is_kept_aside_before_appending(root, tail, capsys):
    store.commit_case(root, _record("a", _arrays(0)))
    path = os.path.join(root, "manifest.jsonl")
    with open(path, "a") as f:
        f.write(tail)
    assert [r["id"] for r in store.read_manifest(root)] == ["a"]  # skipped while it is last
    store.commit_case(root, _record("c", _arrays(0)))
    assert [r["id"] for r in store.read_manifest(root)] == ["a", "c"]  # and never bricks the store
    aside = [n for n in os.listdir(root) if n.startswith("manifest.jsonl.torn-")]
    assert len(aside) == 1
    assert open(os.path.join(root, aside[0])).read() == tail
    assert "kept aside in" in capsys.readouterr().err


@pytest.mark.parametrize("line", ["{}", "[1, 2]", '{"id": "x"}'])
def test_a_record_that_is_not_one_is_a_one_line_error(root, line):
    a, c = (json.dumps(_record(i, _arrays(0))) for i in "ac")
    with open(os.path.join(root, "manifest.jsonl"), "w") as f:
        f.write(f"{a}\n{line}\n{c}\n")
    with pytest.raises(PetctError, match=r"manifest.jsonl: line 2 (is not a JSON object|lacks .*'patient_id')"):
        store.read_manifest(root)


def test_garbage_store_json_is_a_one_line_error(root):
    with open(os.path.join(root, "store.json"), "w") as f:
        f.write("\x00\x01 not json")
    with pytest.raises(PetctError, match="store.json: damaged"):
        store.Store(root)
    with pytest.raises(PetctError, match="store.json: damaged"):
        store.create(root, spacing_zyx=SPACING)


def test_failures_append(root):
    store.record_failure(root, {"id": "x", "error": "PET missing", "file": "/a"})
    store.record_failure(root, {"id": "y", "error": "bad", "file": "/b"})
    assert [f["id"] for f in store.read_failures(root)] == ["x", "y"]


def test_store_pickles_and_reads_in_the_copy(root):
    arrays = _arrays(2)
    store.write_case(root, "a", arrays)
    store.commit_case(root, _record("a", arrays))
    s = store.Store(root, cache_bytes=1 << 20)
    s.read("a", ["pet"])  # opens handles that must not travel
    copy = pickle.loads(pickle.dumps(s))
    assert copy._arrays == {} and copy.ids == ["a"]
    # A copy in another process (a Grain worker) decodes on one thread.
    assert (s.concurrency, copy.concurrency, copy.worker_concurrency) == (4, 1, 1)
    assert np.array_equal(copy.read("a", ["ct"], lo=(2, 3, 4), hi=(9, 9, 9))["ct"],
                          arrays["ct"][2:9, 3:9, 4:9])


def test_rewriting_a_case_replaces_it_whole(root):
    store.write_case(root, "a", _arrays(3))
    os.makedirs(os.path.join(root, "cases", ".a.partial", "junk"))  # left by a killed run
    new = _arrays(4, shape=(10, 12, 14), seg=False)
    store.write_case(root, "a", new)
    assert sorted(os.listdir(os.path.join(root, "cases"))) == ["a"]
    assert sorted(os.listdir(os.path.join(root, "cases", "a"))) == ["ct", "pet"]  # old seg gone
    store.commit_case(root, _record("a", new))
    assert np.array_equal(store.Store(root).read("a", ["pet"])["pet"], new["pet"])


def test_create_checks_an_existing_store(root, tmp_path):
    assert store.create(root, spacing_zyx=SPACING)["chunk_zyx"] == [8, 16, 16]  # reopened as is
    with pytest.raises(PetctError, match="differs"):
        store.create(root, spacing_zyx=(2.0, 2.0, 2.0))
    with pytest.raises(PetctError, match="not a petct store"):
        store.read_info(str(tmp_path / "elsewhere"))
    with pytest.raises(ValueError, match="lacks 'affine_zyx'"):
        store.commit_case(root, {"id": "a", "patient_id": "a", "cohort": "c", "shape_zyx": [1, 1, 1],
                                 "spacing_zyx": [1, 1, 1]})


def test_object_storage_appends_repair_the_tail_too(tmp_path, capsys):
    """Through a kvstore URL (read and rewritten, as on gs://) the same repair applies."""
    url = "file://" + str(tmp_path / "store")
    store.create(url, spacing_zyx=SPACING)
    store.commit_case(url, _record("a", _arrays(0)))
    with open(tmp_path / "store" / "manifest.jsonl", "a") as f:
        f.write('{"id": "b", "pat')
    store.commit_case(url, _record("c", _arrays(0)))
    assert [r["id"] for r in store.read_manifest(url)] == ["a", "c"]
    assert [n for n in os.listdir(tmp_path / "store") if n.startswith("manifest.jsonl.torn-")]
    assert "kept aside" in capsys.readouterr().err
