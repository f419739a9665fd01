"""The Grain pipeline: determinism, resume, workers, hosts, foreground share, global arrays."""

from __future__ import annotations

import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from petct_jax.data import make_case_iterator, make_patch_iterator
from petct_jax.data.batch_buffers import NAME_PREFIX, REF_KEY
from petct_jax.data.patches import PatchConfig
from petct_jax.data.pipeline import EpochShuffle, forced_count, global_batch
from petct_jax.errors import PetctError
from process_helpers import HAS_PROC, alive, kill_all, spawned_workers, wait_for
from test_data_helpers import make_store

P = (16, 16, 16)
SEG = PatchConfig.for_task("seg", patch=P)
MAE = PatchConfig.for_task("mae", patch=P)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pipeline") / "store")
    shapes = [(24, 32, 28), (30, 26, 40), (12, 20, 14), (36, 36, 36), (28, 24, 32), (20, 30, 26)]
    return make_store(root, shapes, patients=["a", "a", "b", "c", "d", "d"], lesions=[2, 1, 1, 3, 2, 1])


def _iter(store, config=MAE, **kw):
    kw = {"seed": 0, "batch_size": 2, "process_index": 0, "process_count": 1, **kw}
    return make_patch_iterator(store, None, config, task="seg" if config.labels else "mae", **kw)


def _take(it, n):
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _segments(trainer: int | None = None) -> list[str]:
    """Batch segments in /dev/shm made by the workers of `trainer` (default: this process)."""
    prefix = f"{NAME_PREFIX}{os.getpid() if trainer is None else trainer}_"
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x) and len(a) == len(b)


def test_same_seed_same_batches_other_seed_other_batches(store):
    a = _take(_iter(store, seed=3), 3)
    b = _take(_iter(store, seed=3), 3)
    c = _take(_iter(store, seed=4), 3)
    assert _same(a, b) and not _same(a, c)
    assert a[0]["image"].shape == (2, *P, 2) and a[0]["image"].dtype == np.float32
    assert set(a[0]) == {"image"}


def test_each_epoch_visits_every_scan_once_in_its_own_order(store):
    epochs = [[EpochShuffle(grain.MapDataset.range(7), seed=s)[7 * e + i] for i in range(7)]
              for s in (5, 5, 6) for e in range(3)]
    assert all(sorted(order) == list(range(7)) for order in epochs)
    assert epochs[:3] == epochs[3:6]  # deterministic for a seed
    assert len({tuple(o) for o in epochs[:3]}) == 3 and epochs[:3] != epochs[6:]
    # Through the pipeline: 6 scans, batches of 2 -> one epoch every 3 batches.
    ids = [c for b in _take(_iter(store, seed=0, with_ids=True), 6) for c in b["case"]]
    assert sorted(ids[:6]) == sorted(ids[6:]) == sorted(store.ids) and ids[:6] != ids[6:]


def test_restored_state_gives_the_same_next_batches(store):
    it = _iter(store, SEG, seed=1)
    _take_some = [next(it) for _ in range(2)]
    state = it.get_state()
    want = [next(it) for _ in range(3)]
    it.close()
    assert state["next_batch"] == 2 and _take_some
    fresh = _iter(store, SEG, seed=1)
    fresh.set_state(state)
    assert _same(_take(fresh, 3), want)
    other = _iter(store, SEG, seed=2)
    with pytest.raises(PetctError, match="seed"):
        other.set_state(state)


def test_orbax_checkpoint_round_trip(store, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = _iter(store, seed=5)
    next(it)
    mngr = ocp.CheckpointManager(str(tmp_path / "ckpt"),
                                 item_handlers={"data": grain.checkpoint.CheckpointHandler()})
    mngr.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = _take(it, 2)
    fresh = _iter(store, seed=5)
    mngr.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    mngr.close()
    assert _same(_take(fresh, 2), want)


@pytest.mark.parametrize("read_threads", [1, 3])
def test_worker_processes_give_the_in_process_batches(store, read_threads):
    """Batches are formed before the worker split: 2 workers = in-process, batch for batch
    (also with several batches sampled at once in each worker, into its shared segments)."""
    want = _take(_iter(store, SEG, seed=7), 12)
    got = _take(_iter(store, SEG, seed=7, num_workers=2, read_threads=read_threads), 12)
    assert _same(got, want)
    assert _segments() == []  # a worker that died (e.g. SIGSEGV) leaves its segments


def test_worker_batches_reuse_segments_and_leave_none_behind(store):
    """Worker batches arrive in shared segments the workers reuse (batch_buffers.py): batches
    the trainer keeps stay intact while the workers go on (one-off segments once the rings are
    held), dropped batches give their segment back, and closing leaves no segment behind."""
    want = _take(_iter(store, SEG, seed=3), 70)
    it = _iter(store, SEG, seed=3, num_workers=2)
    names, open_batch = [], it._views.open
    it._views.open = lambda batch: (names.append(batch[REF_KEY].name), open_batch(batch))[1]
    held = [next(it) for _ in range(24)]  # more than both rings (2 x ring_size_for(2))
    later = [next(it) for _ in range(6)]
    assert _same(held, want[:24]) and _same(later, want[24:30])
    ring = set(names[:24])
    assert len(ring) == 24 and not ring & set(names[24:30])  # one segment per held batch
    del held, later
    for expected in want[30:]:
        assert _same([next(it)], [expected])  # dropped at once
    it.close()
    # Batches made before the trainer let go (up to 2 x 10 in flight) are one-offs; after
    # that the rings are reused.
    assert set(names[-12:]) <= ring
    assert _segments() == []


TRAINER = """
import sys, time
from petct_jax.data import make_patch_iterator
from petct_jax.data.patches import PatchConfig

if __name__ == "__main__":
    it = make_patch_iterator(sys.argv[1], None, PatchConfig.for_task("mae", patch=(16, 16, 16)),
                             task="mae", seed=0, batch_size=2, process_index=0, process_count=1,
                             num_workers=2)
    held = [next(it) for _ in range(3)]
    print("running", flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not HAS_PROC, reason="reads /proc")
def test_workers_of_a_killed_trainer_exit_and_unlink_their_segments(store, tmp_path):
    """SIGKILL gives the trainer no chance to stop its Grain workers; they notice that it is
    gone, unlink their batch segments and exit (without that they wait on their queue for
    ever, holding their memory and segments). That the workers themselves unlink is tested in
    test_batch_buffers.py; here the trainer's resource tracker stays alive, as it must to
    unlink the trainer's semaphores."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen([sys.executable, str(script), store.root], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert trainer.stdout.readline().strip() == "running"
        workers = spawned_workers(trainer.pid)
        assert len(workers) == 2
        # The workers fill their queues with batches the trainer has not opened.
        assert wait_for(lambda: _segments(trainer.pid), timeout=30)
        trainer.kill()
        trainer.wait()
        assert wait_for(lambda: not any(map(alive, workers)), timeout=30)
        assert _segments(trainer.pid) == []
    finally:  # whatever is left (orphaned workers would otherwise outlive the test run)
        kill_all([trainer.pid, *workers])


def test_foreground_share_is_exact_per_batch(store):
    assert [forced_count(b, 1 / 3) for b in (1, 2, 3, 4, 16)] == [0, 1, 1, 1, 5]
    it = _iter(store, SEG, seed=0, batch_size=3, with_ids=True)
    batches = _take(it, 8)
    contains = []
    for batch in batches:
        assert batch["label"].shape == (3, *P) and batch["label"].dtype == np.uint8
        assert list(batch["index"] % 3) == [0, 1, 2]
        assert batch["label"][2].sum() > 0  # the forced (last) patch of each batch: every scan has lesions
        contains += [int(lab.sum() > 0) for lab in batch["label"]]
    assert 1 / 3 <= np.mean(contains) <= 1.0
    # Without oversampling the small lesions are rarely hit by 16^3 patches.
    none = _take(_iter(store, PatchConfig.for_task("seg", patch=P, foreground_fraction=0.0),
                       seed=0, batch_size=3), 8)
    assert np.mean([lab.sum() > 0 for b in none for lab in b["label"]]) < np.mean(contains)


def test_hosts_split_each_global_batch(store):
    """Two hosts with local batches of 2 hold exactly the samples of the 1-host global batch of 4."""
    one = _take(_iter(store, seed=9, batch_size=4, with_ids=True), 2)
    hosts = [_take(_iter(store, seed=9, batch_size=4, with_ids=True, process_index=p, process_count=2), 2)
             for p in (0, 1)]
    for b in range(2):
        assert list(hosts[0][b]["index"]) == list(one[b]["index"][0::2])
        assert list(hosts[1][b]["index"]) == list(one[b]["index"][1::2])
        np.testing.assert_array_equal(hosts[1][b]["image"], one[b]["image"][1::2])
    with pytest.raises(PetctError, match="divisible"):
        _iter(store, batch_size=3, process_index=0, process_count=2)


def test_finite_epochs_end_at_the_same_batch_on_every_host(store):
    assert len(list(_iter(store, batch_size=4, num_epochs=1))) == 1  # 6 scans -> one batch of 4
    for p in (0, 1):
        assert len(list(_iter(store, batch_size=4, num_epochs=1, process_index=p, process_count=2))) == 1


def test_global_batch_on_one_device(store):
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    local = _take(_iter(store, SEG, with_ids=True), 1)[0]
    out = global_batch(local, mesh)
    assert isinstance(out["image"], jax.Array) and out["image"].shape == local["image"].shape
    assert out["image"].sharding.spec == jax.sharding.PartitionSpec("data")
    np.testing.assert_array_equal(np.asarray(out["label"]), local["label"])
    assert isinstance(out["case"], np.ndarray)  # strings stay on the host


def test_a_global_batch_keeps_its_worker_segment(store):
    """On CPU, jax arrays may alias the batch's shared memory: the segment must not go back to
    the worker (and be overwritten) while such an array lives."""
    import jax
    from jax.sharding import Mesh

    mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
    want = _take(_iter(store, MAE, seed=5), 1)[0]
    it = _iter(store, MAE, seed=5, num_workers=2)
    out = global_batch(next(it), mesh)  # the numpy batch is dropped at once
    for _ in range(30):  # more than both rings: every free segment is rewritten
        next(it)
    it.close()
    np.testing.assert_array_equal(np.asarray(out["image"]), want["image"])


def test_case_iterator_yields_whole_cases_in_order(store):
    cases = list(make_case_iterator(store, ["case02", "case00"], {"patch": P}, task="seg"))
    assert [c["case"] for c in cases] == ["case02", "case00"]
    assert cases[0]["image"].shape == (12, 20, 14, 2) and cases[0]["label"].shape == (12, 20, 14)
    mae = list(make_case_iterator(store, ["case01"], None, task="mae"))
    assert set(mae[0]) == {"image", "case"}


def test_unknown_or_unlabelled_cases_are_refused(store, tmp_path):
    with pytest.raises(PetctError, match="nope"):
        make_patch_iterator(store, ["nope"], MAE, seed=0, batch_size=2, process_index=0, process_count=1)
    plain = make_store(str(tmp_path / "plain"), [(20, 20, 20)], labelled=False)
    with pytest.raises(PetctError, match="seg"):
        make_patch_iterator(plain, None, SEG, seed=0, batch_size=1, task="seg",
                            process_index=0, process_count=1)
