"""The Grain input pipeline: random patches from the store -> per-host batches -> global arrays.

    EpochShuffle(MapDataset.source(ScanSource).seed(seed), seed)             # new order each epoch
      .repeat(num_epochs)                                                    # global sample g
      .map_with_index(tag g)  .random_map(keep the rng)                      # rng from (seed, g)
      [process_index::process_count]                                         # this host's samples
      .batch(batch_size // process_count, drop_remainder=True,               # a local batch:
             batch_fn=PatchBatcher)                                          # patches sampled here
      [next_batch:] .to_iter_dataset(ReadOptions) .mp_prefetch(num_workers)

Why batch on the MapDataset (before `to_iter_dataset`): every element the workers
process is then a whole batch, so batch b always holds the global samples
g in [b*B, (b+1)*B) (B = global batch size) whatever the number of workers or hosts:
the stream is deterministic for a seed, identical with 0, 1 or N workers, and restoring
position b restarts exactly there, even with another worker count. Samples draw
their randomness from Grain's per-record rng keyed by g (the random_map sits before the
host slice, so hosts never share random streams). The patches themselves are sampled by the
batch function, straight into the batch's memory: in worker processes that is a shared
segment the worker reuses (`batch_buffers.py`), which the iterator opens as numpy views.

Foreground oversampling: sample g is centred on a lesion iff its position in the global
batch, g mod B, is among the last `B - round(B * (1 - foreground_fraction))` positions
(nnU-Net forces the last third of each batch with the same rounding), so the count per
global batch is exact; each host gets its share +-1. Scans without lesions fall back
to a random patch (nnU-Net's behaviour), so the share of patches that really contain
foreground is lower on cohorts with tumour-free scans.

Checkpointing: `PatchIterator` is a `grain.DatasetIterator` whose state is the number of
batches consumed (plus a fingerprint that must match on restore). Save it with Orbax
through Grain's handler, next to the train state::

    mngr = ocp.CheckpointManager(dir, item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler()})
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                               data=grain.checkpoint.CheckpointRestore(it)))

(one `process_<i>-of-<n>.json` per host). Every host's state is the same global batch
counter, so a run resumed on another number of hosts (same global batch size) can
`set_state` any host's saved JSON and continue with the same global batches; Grain's
handler itself only looks for the file of the current process count.

Worker processes start by spawn and unpickle the dataset; they import Grain (which
imports JAX) but never initialise it: the trainer's `jax.distributed.initialize()` must
sit under `if __name__ == "__main__":` so that the re-imported main module does not run it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any, Iterable, Mapping

import grain
import numpy as np

from petct_jax.data.batch_buffers import BatchBuffers, BatchViews, init_worker_process, ring_size_for
from petct_jax.data.normalize import Normalizer, make_normalizer
from petct_jax.data.patches import PatchConfig, sample_patch
from petct_jax.data.source import ScanSource, load_case, open_store
from petct_jax.errors import PetctError
from petct_jax.store import Store


def forced_count(batch_size: int, fraction: float) -> int:
    """Patches of a batch that must contain foreground (nnU-Net's rounding)."""
    return batch_size - int(round(batch_size * (1.0 - fraction))) if fraction else 0


def allow_worker_processes() -> None:
    """Grain 0.2.18's mp_prefetch reads an absl flag, which raises in programs that never
    parse absl flags (no `absl.app`; google/grain#1355, fixed upstream): mark them parsed."""
    from absl import flags
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class EpochShuffle(grain.MapDataset):
    """`parent` in a new random order each epoch: element e*n + i (epoch e, n = len(parent))
    is parent[e*n + perm_e[i]], perm_e a numpy permutation seeded by (seed, e), kept for the
    epoch last asked for (made again only where a batch straddles two epochs). It replaces
    Grain's `shuffle`, whose per-element cipher works on a domain of at least 2**16 and walks
    ~65536/n cycles to land inside a small one: 3.8 ms a sample for the 8 scans of a benchmark
    cohort (5-shot subsets are smaller still), 35 us at n = 1000, against ~1 us here."""

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = int(seed)
        self._last: tuple[int, np.ndarray] | None = None  # (epoch, perm): one object, thread-safe

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def permutation(self, epoch: int) -> np.ndarray:
        last = self._last
        if last is None or last[0] != epoch:
            last = self._last = (epoch, np.random.default_rng([self._seed, epoch]).permutation(len(self)))
        return last[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self))
        return self._parent[epoch * len(self) + int(self.permutation(epoch)[i])]


def _tag(index: int, record: dict) -> tuple[int, dict]:
    return index, record


def _keep_rng(element: tuple[int, dict], rng: np.random.Generator) -> tuple[int, dict, np.random.Generator]:
    """Grain `random_map`: a copy of sample g's generator (Grain reuses its own afterwards)."""
    return (*element, copy.deepcopy(rng))


class PatchBatcher:
    """Grain `batch_fn`: [(global index, record, rng), ...] -> one batch of patches, each
    sampled into its slot of the batch's arrays (`BatchBuffers`). Picklable."""

    def __init__(self, store: Store, config: PatchConfig, normalizer: Normalizer,
                 batch_size: int, with_ids: bool = False):
        self.store, self.config, self.normalizer = store, config, normalizer
        self.batch_size, self.with_ids = batch_size, with_ids
        self.first_forced = batch_size - forced_count(batch_size, config.foreground_fraction)
        self.buffers = BatchBuffers()

    def force_foreground(self, index: int) -> bool:
        return index % self.batch_size >= self.first_forced

    def __call__(self, elements: list[tuple[int, dict, np.random.Generator]]) -> dict:
        patch, n = self.config.patch, len(elements)
        spec = {"image": ((n, *patch, len(self.config.channels)), self.config.dtype)}
        if self.config.labels:
            spec["label"] = ((n, *patch), np.uint8)
        arrays, batch = self.buffers.new(spec)
        for j, (index, record, rng) in enumerate(elements):
            sample_patch(self.store, record, self.config, self.normalizer, rng,
                         force_foreground=self.force_foreground(index),
                         out={k: v[j] for k, v in arrays.items()})
        if self.with_ids:
            batch["case"] = np.asarray([record["id"] for _, record, _ in elements])
            batch["index"] = np.asarray([index for index, _, _ in elements], dtype=np.int32)
        return batch


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # only the main (trainer) process asks; workers never get here
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise PetctError(f"process_index={process_index} is not in [0, {process_count})")
    return process_index, process_count


def patch_dataset(store: Store | str, ids: Iterable[str] | None, config: PatchConfig, *,
                  seed: int, batch_size: int, process_index: int = 0, process_count: int = 1,
                  num_epochs: int | None = None, normalizer: Normalizer | None = None,
                  with_ids: bool = False) -> grain.MapDataset:
    """This host's batches as a Grain MapDataset (element b = local batch b).

    `PatchIterator` (`make_patch_iterator`) runs it. To run it through your own
    `mp_prefetch`, pass `functools.partial(batch_buffers.init_worker_process, ring_size)` as
    `worker_init_fn` and open each batch with a `batch_buffers.BatchViews` (the workers then
    send their batches as shared segments); without the init function workers return plain
    numpy batches, which Grain copies into new shared memory."""
    if batch_size < 1 or batch_size % process_count:
        raise PetctError(f"batch_size={batch_size} (global) is not divisible by the "
                         f"{process_count} processes")
    source = ScanSource(store, ids, require=("seg",) if config.labels else ())
    if normalizer is None:
        normalizer = make_normalizer(config.normalization, [source[i] for i in range(len(source))])
    batcher = PatchBatcher(source.store, config, normalizer, batch_size, with_ids)
    ds = EpochShuffle(grain.MapDataset.source(source).seed(seed), seed).repeat(num_epochs)
    ds = ds.map_with_index(_tag).random_map(_keep_rng)
    if num_epochs is not None:  # every host must see the same number of batches
        ds = ds[: len(ds) // batch_size * batch_size]
    ds = ds[process_index::process_count]
    return ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=batcher)


class PatchIterator(grain.DatasetIterator):
    """Iterator over local batches {"image": (b, Z, Y, X, C) of `data.dtype` (float32 by
    default)[, "label": (b, Z, Y, X) uint8]}; checkpointable with
    `grain.checkpoint.CheckpointSave/Restore` (see module doc)."""

    def __init__(self, dataset: grain.MapDataset, *, num_workers: int = 0, read_threads: int = 1,
                 buffer: int = 2, fingerprint: Mapping[str, Any] | None = None,
                 normalizer: Normalizer | None = None, config: PatchConfig | None = None):
        super().__init__()
        self._dataset = dataset
        self._num_workers, self._read_threads, self._buffer = num_workers, read_threads, buffer
        self._fingerprint = dict(fingerprint or {})
        self._next_batch = 0
        self._it: grain.DatasetIterator | None = None
        self._views = BatchViews()  # maps the workers' batch segments
        self.normalizer, self.config = normalizer, config

    def _open(self) -> None:
        ds = self._dataset[self._next_batch:].to_iter_dataset(grain.ReadOptions(
            num_threads=self._read_threads, prefetch_buffer_size=max(self._buffer, self._read_threads)))
        if self._num_workers:
            allow_worker_processes()
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers, per_worker_buffer_size=self._buffer),
                worker_init_fn=functools.partial(
                    init_worker_process, ring_size_for(self._buffer, self._read_threads),
                    parent_pid=os.getpid()))
        self._it = iter(ds)

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._it is None:
            self._open()
        batch = self._views.open(next(self._it))
        self._next_batch += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"next_batch": self._next_batch, **self._fingerprint}

    def set_state(self, state: Mapping[str, Any]) -> None:
        for key, value in self._fingerprint.items():
            if key in state and state[key] != value:
                raise PetctError(f"data iterator state was saved with {key}={state[key]!r}; "
                                 f"this pipeline has {key}={value!r}")
        self._stop()
        self._next_batch = int(state["next_batch"])

    def start_prefetch(self) -> None:
        if self._it is None:
            self._open()
        self._it.start_prefetch()

    def _stop(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        self._views.close()

    def close(self) -> None:
        self._stop()
        super().close()

    def __str__(self) -> str:
        return f"PatchIterator(next_batch={self._next_batch}, workers={self._num_workers})"


def make_patch_iterator(store: Store | str, ids: Iterable[str] | None = None, config: Any = None, *,
                        seed: int, batch_size: int, num_workers: int = 0, task: str = "mae",
                        num_epochs: int | None = None, read_threads: int = 1, buffer: int = 2,
                        process_index: int | None = None, process_count: int | None = None,
                        normalizer: Normalizer | None = None, with_ids: bool = False) -> PatchIterator:
    """Training batches of random patches for this host.

    store: a `Store` or its root. ids: the scans (default: all). config: a `PatchConfig`,
    a mapping or a ConfigDict (e.g. `config.data`); missing fields take the `task`
    preset ("mae" | "seg", see `PatchConfig.for_task`). batch_size: the GLOBAL batch;
    each of the `process_count` hosts (default: JAX's) yields batch_size/process_count.
    num_epochs: None repeats forever. normalizer: pass the training iterator's to another
    pipeline (nnU-Net statistics come from the training scans). with_ids adds "case"
    (strings) and "index" (the global sample index) to each batch.
    """
    config = PatchConfig.from_config(config, task)
    if task == "seg" and not config.labels:
        config = dataclasses.replace(config, labels=True)
    process_index, process_count = _process(process_index, process_count)
    store = open_store(store)
    source_ids = list(store.ids if ids is None else ids)
    if normalizer is None:
        normalizer = make_normalizer(config.normalization, [store.record(i) for i in source_ids])
    dataset = patch_dataset(store, source_ids, config, seed=seed, batch_size=batch_size,
                            process_index=process_index, process_count=process_count,
                            num_epochs=num_epochs, normalizer=normalizer, with_ids=with_ids)
    fingerprint = {"seed": int(seed), "batch_size": int(batch_size), "num_scans": len(source_ids)}
    return PatchIterator(dataset, num_workers=num_workers, read_threads=read_threads, buffer=buffer,
                         fingerprint=fingerprint, normalizer=normalizer, config=config)


class CaseTransform:
    """Grain `map`: record -> whole normalized case. Picklable."""

    def __init__(self, store: Store, config: PatchConfig, normalizer: Normalizer):
        self.store, self.config, self.normalizer = store, config, normalizer

    def __call__(self, record: dict) -> dict:
        return load_case(self.store, record, self.config.channels, self.normalizer, self.config.labels)


def make_case_iterator(store: Store | str, ids: Iterable[str] | None = None, config: Any = None, *,
                       task: str = "seg", num_workers: int = 0, normalizer: Normalizer | None = None,
                       process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Whole cases in `ids` order, for validation and sliding-window inference:
    {"image": (Z, Y, X, C) float32, "label": (Z, Y, X) uint8 (task "seg"), "case": id}.

    Hosts split the cases (`ids[process_index::process_count]`) only when asked. For the
    nnU-Net scheme pass the training iterator's `normalizer`.
    """
    config = PatchConfig.from_config(config, task)
    store = open_store(store)
    ids = list(store.ids if ids is None else ids)[process_index::process_count]
    if normalizer is None:
        normalizer = make_normalizer(config.normalization, [store.record(i) for i in ids])
    source = ScanSource(store, ids, require=("seg",) if config.labels else ())
    ds = grain.MapDataset.source(source).map(CaseTransform(source.store, config, normalizer))
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    if num_workers:
        allow_worker_processes()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                         per_worker_buffer_size=1))
    return iter(ds)


def global_batch(local_batch: Mapping[str, Any], mesh: Any, batch_axes: tuple[str, ...] | None = None
                 ) -> dict[str, Any]:
    """Assemble every host's local batch into global `jax.Array`s sharded over the batch
    axes of `mesh` (default: its "data" and "fsdp" axes, else its first axis). Leaves
    that are not numeric (case ids) stay host-local numpy arrays."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if batch_axes is None:
        batch_axes = tuple(a for a in mesh.axis_names if a in ("data", "fsdp")) or mesh.axis_names[:1]
    sharding = NamedSharding(mesh, PartitionSpec(batch_axes if len(batch_axes) > 1 else batch_axes[0]))

    def put(x: Any) -> Any:
        x = np.asarray(x)
        if x.dtype.kind not in "biuf":
            return x
        return jax.make_array_from_process_local_data(sharding, x)

    return {k: put(v) for k, v in local_batch.items()}
