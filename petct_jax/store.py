"""The harmonized PET/CT store: TensorStore zarr3 arrays plus a JSON-lines manifest.

Layout of a store rooted at STORE (a local path or a TensorStore kvstore URL such as
`gs://bucket/store/`):

    STORE/store.json          format version, target spacing, chunk shape, orientation
    STORE/manifest.jsonl      one JSON object per finished case (the commit point)
    STORE/failures.jsonl      one JSON object per case that failed to preprocess
    STORE/cases/<id>/pet      zarr3, float16, SUV
    STORE/cases/<id>/ct       zarr3, int16, HU
    STORE/cases/<id>/seg      zarr3, uint8, 0/1 (only for labelled cases)

Orientation: every array is indexed [z, y, x] with z running inferior -> superior,
y posterior -> anterior and x left -> right (the transpose of nibabel's closest
canonical RAS+ orientation). `record["affine_zyx"]` maps (z, y, x, 1) voxel indices
to RAS+ world millimetres.

Each array is one zarr3 shard (the `sharding_indexed` codec) holding chunks of
`chunk_zyx` voxels, byte-shuffled and compressed with Blosc LZ4HC: a cohort is a few
files per scan rather than thousands, and a random 96x128x128 patch reads only the
chunks it touches. LZ4HC rather than zstd because reading is what the pipeline does
all day: on float16/int16 scans it decodes ~1.8x cheaper in CPU than zstd level 3 at a
similar size (benchmarks/RESULTS.md, data_pipeline).

Integrity: every chunk ends in a crc32c (zarr3's `crc32c` codec) and so does the shard
index, so flipped bytes fail the read; every chunk is written, even one equal to the fill
value, so a missing data file is damage; `commit_case` records each array's sha256 content
digest (`record["digests"]`, from the array's zarr.json attributes) for `petct store-info
--verify`. Opening an array checks its data file, dtype and shape against the store and the
manifest; any failure is a PetctError naming case, array and folder, never fill values.

A case becomes visible only when its manifest line is written, after its arrays are
complete; a case whose arrays exist without a manifest line is an interrupted write
and is rewritten by the next run. Later manifest lines for the same id (from
`--overwrite`) replace earlier ones. On a local store a case's arrays are written into
`cases/.<id>.partial/` and renamed into place. An append first repairs the file's tail: a
torn or malformed last line is cut and kept aside in `<file>.torn-<time>` (reported), a
complete last record without its newline gets one. The fields of a manifest record are
documented in preprocessing/harmonize.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorstore as ts

from petct_jax.errors import PetctError

FORMAT_VERSION = 1
DEFAULT_CHUNK_ZYX = (16, 32, 32)  # a 96x128x128 patch decodes ~1.6x its voxels (32x64x64: ~3x)
ORIENTATION = "zyx index = (inferior->superior, posterior->anterior, left->right); world RAS+ mm"
ARRAY_DTYPES = {"pet": "float16", "ct": "int16", "seg": "uint8"}


def float32_reads(names: Iterable[str]) -> dict[str, Any]:
    """`Store.read(dtypes=...)` for arrays about to be normalized into float32: the float16
    ones (PET) are converted on TensorStore's threads, where it is nearly free; numpy's float16
    conversion is slow, while int16 (CT) converts fast inside the normalization itself."""
    return {name: np.float32 for name in names if ARRAY_DTYPES[name] == "float16"}


_INFO = "store.json"
_MANIFEST = "manifest.jsonl"
_RECORD_KEYS = ("id", "patient_id", "cohort", "shape_zyx", "spacing_zyx", "affine_zyx")
_FAILURES = "failures.jsonl"


def is_url(path: str) -> bool:
    return "://" in str(path)


def _join(root: str, *parts: str) -> str:
    return "/".join([str(root).rstrip("/"), *parts])


def _kvstore(path: str) -> Any:
    """A TensorStore kvstore spec for a local path or a URL (gs://, s3://, file://...)."""
    if is_url(path):
        return path if path.endswith("/") else path + "/"
    return {"driver": "file", "path": os.path.abspath(path) + "/"}


# ---------------------------------------------------------------------------
# Small text files (store.json, manifest, failures): local files are appended in
# place; on object storage, which cannot append, the file is read and rewritten.

_append_lock = threading.Lock()


def _read_text(root: str, name: str) -> str | None:
    if not is_url(root):
        try:
            with open(os.path.join(root, name), encoding="utf-8") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            raise PetctError(f"{os.path.join(root, name)}: not a text file (petct stores "
                             "write UTF-8 JSON here)") from None
    kv = ts.KvStore.open(_kvstore(root)).result()
    got = kv.read(name).result()
    if got.state != "value":
        return None
    try:
        return got.value.decode("utf-8")
    except UnicodeDecodeError:
        raise PetctError(f"{_join(root, name)}: not a text file (petct stores write UTF-8 "
                         "JSON here)") from None


def _write_text(root: str, name: str, text: str) -> None:
    if not is_url(root):
        path = os.path.join(root, name)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic: readers never see half a file
        return
    kv = ts.KvStore.open(_kvstore(root)).result()
    kv.write(name, text.encode("utf-8")).result()


def _append_line(root: str, name: str, obj: dict) -> None:
    line = json.dumps(obj, sort_keys=True) + "\n"
    with _append_lock:
        if not is_url(root):
            with open(os.path.join(root, name), "a+b") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(0)
                keep, extra = _repair_tail(f.read(), root, name) if size else (0, b"")
                if keep < size:
                    f.truncate(keep)
                f.write(extra + line.encode("utf-8"))
                f.flush()
                os.fsync(f.fileno())
            return
        data = (_read_text(root, name) or "").encode("utf-8")
        keep, extra = _repair_tail(data, root, name)
        _write_text(root, name, (data[:keep] + extra).decode("utf-8") + line)


def _repair_tail(data: bytes, root: str, name: str) -> tuple[int, bytes]:
    """How to append after `data` without losing or gluing lines: (bytes to keep, bytes to
    write before the new line).

    A complete record that only lacks its newline keeps it (one newline is added). A torn or
    malformed last line, which the reader skips while it is last but which would turn into
    corruption in the middle of the file, is cut and kept aside in `<file>.torn-<time>`,
    reported on stderr.
    """
    body, sep, last = data.rstrip(b"\n").rpartition(b"\n")
    if not last.strip():
        return len(data), b"" if data.endswith(b"\n") or not data else b"\n"
    if _json_object(last) is not None:
        return len(data), b"" if data.endswith(b"\n") else b"\n"
    keep = len(body) + len(sep)
    aside = f"{name}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    _write_text(root, aside, data[keep:].decode("utf-8", errors="replace"))
    source, aside = _join(root, name), _join(root, aside)
    print(f"petct: {source}: its last line was torn or malformed ({len(data) - keep} bytes); "
          f"kept aside in {aside} before appending", file=sys.stderr)
    return keep, b""


def _json_object(line: bytes | str) -> dict | None:
    try:
        value = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _parse_jsonl(text: str | None, source: str, required: Sequence[str] = ()) -> list[dict]:
    records = []
    lines = (text or "").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _json_object(line)
        if record is None:
            # A torn last line (power loss mid-append) is an unfinished commit, repaired at
            # the next append; anything else is corruption the user must see.
            if n == last:
                continue
            raise PetctError(f"{source}: line {n} is not a JSON object")
        missing = [k for k in required if k not in record]
        if missing:
            raise PetctError(f"{source}: line {n} lacks {', '.join(map(repr, missing))}")
        records.append(record)
    return records


# ---------------------------------------------------------------------------
# Creating and writing.

def create(root: str, *, spacing_zyx: Sequence[float],
           chunk_zyx: Sequence[int] = DEFAULT_CHUNK_ZYX,
           harmonization: dict | None = None) -> dict:
    """Create the store (or check that an existing one has the same spacing and
    harmonization: how its cases were made, e.g. {"preset": "canonical"})."""
    old = check_target(root, spacing_zyx=spacing_zyx, harmonization=harmonization)
    if old is not None:
        return old
    info = {
        "format_version": FORMAT_VERSION,
        "spacing_zyx": [float(s) for s in spacing_zyx],
        "chunk_zyx": [int(c) for c in chunk_zyx],
        "orientation": ORIENTATION,
        "arrays": ARRAY_DTYPES,
        "harmonization": dict(harmonization or {}),
    }
    if not is_url(root):
        os.makedirs(root, exist_ok=True)
    _write_text(root, _INFO, json.dumps(info, indent=2) + "\n")
    return info


def check_target(root: str, *, spacing_zyx: Sequence[float],
                 harmonization: dict | None = None) -> dict | None:
    """The store.json of the store at `root` if it can take cases of this spacing and
    harmonization, None if `root` holds no store yet; PetctError, changing nothing, for a
    folder that is not a petct store but holds one's file names, a damaged manifest, or a
    store of another format, spacing or harmonization. Read-only, so a command can call it
    before it writes anything (its lock file included)."""
    harmonization = dict(harmonization or {})
    if not is_url(root) and os.path.exists(root) and not os.path.isdir(root):
        raise PetctError(f"{root}: is a file, not a store folder")
    if _read_text(root, _INFO) is None:
        # Without store.json, a manifest (or failures, or cases/) is someone else's file, or
        # a store whose store.json was lost: writing a fresh store.json beside it would
        # adopt records of unknown spacing and harmonization as ours.
        foreign = [name for name in (_MANIFEST, _FAILURES) if _read_text(root, name) is not None]
        if not is_url(root) and os.path.isdir(os.path.join(root, "cases")):
            foreign.append("cases/")
        if foreign:
            raise PetctError(f"{_join(root, foreign[0])}: this folder holds {', '.join(foreign)} "
                             f"but no {_INFO}, so it is not a petct store (or lost its {_INFO}); "
                             "choose another --out")
        return None
    old = read_info(root)
    if old.get("format_version") != FORMAT_VERSION:
        raise PetctError(f"{_join(root, _INFO)}: store format {old.get('format_version')} "
                         f"is not {FORMAT_VERSION}")
    spacing = [float(v) for v in spacing_zyx]
    if np.shape(old["spacing_zyx"]) != (3,) or not np.allclose(old["spacing_zyx"], spacing):
        raise PetctError(f"{_join(root, _INFO)}: store spacing {old['spacing_zyx']} differs "
                         f"from requested {spacing}; use a new store")
    if store_preset(old) != store_preset({"harmonization": harmonization}) or (
            {**old.get("harmonization", {}), "preset": None} != {**harmonization, "preset": None}):
        raise PetctError(f"{_join(root, _INFO)}: store harmonized with {old.get('harmonization', {})}, "
                         f"this run asks for {harmonization}; use a new store")
    read_manifest(root)  # a foreign or damaged manifest is refused before the first append
    return old


def store_preset(info: dict) -> str:
    """The harmonization preset of a store (its store.json); stores made before presets
    existed are canonical."""
    return (info.get("harmonization") or {}).get("preset", "canonical")


def _array_spec(root: str, case_id: str, name: str) -> dict:
    return {"driver": "zarr3", "kvstore": _kvstore(_join(root, "cases", case_id, name))}


def write_array(root: str, case_id: str, name: str, data: np.ndarray,
                chunk_zyx: Sequence[int] = DEFAULT_CHUNK_ZYX, *,
                context: ts.Context | None = None) -> ts.Future:
    """Start writing one (z, y, x) array of a case as a single zarr3 shard; returns the future.

    Any previous array at that place (an interrupted or overwritten case) is replaced.
    """
    if name not in ARRAY_DTYPES:
        raise ValueError(f"unknown store array {name!r}; expected one of {list(ARRAY_DTYPES)}")
    dtype = ARRAY_DTYPES[name]
    if data.ndim != 3:
        raise ValueError(f"store arrays are 3D (z, y, x); got shape {data.shape}")
    chunk = [min(int(c), int(s)) for c, s in zip(chunk_zyx, data.shape)]
    shard = [int(-(-s // c) * c) for s, c in zip(data.shape, chunk)]  # multiple of the chunk
    data = np.ascontiguousarray(data, dtype=dtype)
    spec = _array_spec(root, case_id, name)
    spec.update({
        "create": True,
        "delete_existing": True,
        # Write every chunk, even one equal to the fill value (an empty label): a missing data
        # file is then always damage, never an empty array.
        "store_data_equal_to_fill_value": True,
        "metadata": {
            "shape": list(data.shape),
            "data_type": dtype,
            "attributes": {"digest": content_digest(data)},
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": shard}},
            "codecs": [{
                "name": "sharding_indexed",
                "configuration": {
                    "chunk_shape": chunk,
                    "codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                               {"name": "blosc", "configuration": {
                                   "cname": "lz4hc", "clevel": 5, "shuffle": "shuffle",
                                   "typesize": np.dtype(dtype).itemsize, "blocksize": 0}},
                               {"name": "crc32c"}],  # every chunk checked when it is read
                    "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}},
                                     {"name": "crc32c"}],
                },
            }],
            "dimension_names": ["z", "y", "x"],
        },
    })
    arr = ts.open(spec, context=context).result()
    return arr.write(data)


def content_digest(data: np.ndarray) -> str:
    """"sha256:<hex>" of an array's voxels in C order, little-endian, in its stored dtype:
    what `petct store-info --verify` recomputes from the chunks it decodes."""
    data = np.ascontiguousarray(data)
    if data.dtype.byteorder == ">":
        data = data.astype(data.dtype.newbyteorder("<"))
    return "sha256:" + hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def write_case(root: str, case_id: str, arrays: dict[str, np.ndarray],
               chunk_zyx: Sequence[int] = DEFAULT_CHUNK_ZYX) -> int:
    """Write all arrays of a case (concurrently) and return the bytes they occupy on disk.

    The case is not visible until `commit_case` appends its manifest record. On a local
    store the arrays are written into `cases/.<id>.partial/` and renamed into place, so
    rewriting a committed case (`--overwrite`) never leaves it half old, half new.
    Object stores (no rename) are written in place.
    """
    if is_url(root):
        _write_arrays(root, case_id, arrays, chunk_zyx)
        return case_bytes(root, case_id)
    cases = os.path.join(root, "cases")
    final = os.path.join(cases, case_id)
    staged, old = f".{case_id}.partial", f".{case_id}.old"
    shutil.rmtree(os.path.join(cases, staged), ignore_errors=True)  # left by a killed run
    _write_arrays(root, staged, arrays, chunk_zyx)
    shutil.rmtree(os.path.join(cases, old), ignore_errors=True)
    if os.path.exists(final):
        os.rename(final, os.path.join(cases, old))
    os.rename(os.path.join(cases, staged), final)
    shutil.rmtree(os.path.join(cases, old), ignore_errors=True)
    return case_bytes(root, case_id)


def _write_arrays(root: str, case_id: str, arrays: dict[str, np.ndarray],
                  chunk_zyx: Sequence[int]) -> None:
    context = ts.Context()
    futures = [write_array(root, case_id, name, data, chunk_zyx, context=context)
               for name, data in arrays.items()]
    for f in futures:
        f.result()


def case_bytes(root: str, case_id: str) -> int:
    """Bytes on disk of a case's arrays (local stores; 0 when unknown, e.g. on a URL)."""
    if is_url(root):
        return 0
    total = 0
    for dirpath, _, files in os.walk(os.path.join(root, "cases", case_id)):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def commit_case(root: str, record: dict) -> None:
    """Make a written case visible by appending its manifest record."""
    for key in _RECORD_KEYS:
        if key not in record:
            raise ValueError(f"manifest record for {record.get('id')!r} lacks {key!r}")
    if "digests" not in record:  # as written by write_case, read back from each zarr.json
        record = {**record, "digests": _written_digests(root, record["id"],
                                                        record.get("arrays", ARRAY_DTYPES))}
    _append_line(root, _MANIFEST, record)


def _written_digests(root: str, case_id: str, names: Iterable[str]) -> dict[str, str]:
    out = {}
    for name in names:
        text = _read_text(_join(root, "cases", case_id, name), "zarr.json")
        digest = ((_json_object(text) or {}).get("attributes") or {}).get("digest") if text else None
        if digest:
            out[name] = digest
    return out


def record_failure(root: str, failure: dict) -> None:
    """Append one failed case (`id`, `error`, `file`...) to STORE/failures.jsonl."""
    _append_line(root, _FAILURES, failure)


def read_manifest(root: str) -> list[dict]:
    """Committed cases in first-commit order; a later line for an id replaces the earlier."""
    by_id: dict[str, dict] = {}
    for rec in _parse_jsonl(_read_text(root, _MANIFEST), _join(root, _MANIFEST), _RECORD_KEYS):
        by_id[rec["id"]] = rec
    return list(by_id.values())


def read_failures(root: str) -> list[dict]:
    return _parse_jsonl(_read_text(root, _FAILURES), _join(root, _FAILURES))


def read_info(root: str) -> dict:
    text = _read_text(root, _INFO)
    if text is None:
        raise PetctError(f"{root}: not a petct store (no {_INFO}); create one with `petct preprocess`")
    info = _json_object(text)
    if info is None or "spacing_zyx" not in info:
        raise PetctError(f"{_join(root, _INFO)}: damaged (not the JSON object `petct preprocess` "
                         "writes); restore it from a backup or re-run preprocessing into a new store")
    return info


# ---------------------------------------------------------------------------
# Reading.

class Store:
    """Read access to a store: the manifest plus patch reads of its arrays.

    Picklable (TensorStore handles are reopened lazily in each process), so it can be
    a Grain data source's member in spawned worker processes.

    concurrency: TensorStore's decoding threads in this process. A copy unpickled in another
    process (a Grain worker, an evaluation pool) uses `worker_concurrency` (1): there several
    processes already keep the cores busy, and handing chunks between threads only costs
    CPU (2 Grain workers on 2 cores: 35 instead of 42 CPU ms per unzoomed default patch).
    """

    def __init__(self, root: str, *, cache_bytes: int = 0, concurrency: int = 4,
                 worker_concurrency: int = 1):
        self.root = str(root)
        self.info = read_info(self.root)
        self.records = read_manifest(self.root)
        self.by_id = {r["id"]: r for r in self.records}
        self._cache_bytes = cache_bytes
        self.concurrency, self.worker_concurrency = concurrency, worker_concurrency
        self._arrays: dict[tuple[str, str], ts.TensorStore] = {}
        self._context: ts.Context | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        state["_context"] = None
        state["concurrency"] = self.worker_concurrency
        return state

    def __len__(self) -> int:
        return len(self.records)

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.records]

    def record(self, case_id: str) -> dict:
        try:
            return self.by_id[case_id]
        except KeyError:
            raise PetctError(f"{self.root}: no case {case_id!r} in the manifest") from None

    def array(self, case_id: str, name: str) -> ts.TensorStore:
        """The opened array, checked against the manifest: its data exists, and its dtype and
        shape are the store's and the record's (else a PetctError naming case, array, file)."""
        key = (case_id, name)
        if key not in self._arrays:
            if self._context is None:
                self._context = ts.Context({
                    "cache_pool": {"total_bytes_limit": self._cache_bytes},
                    "data_copy_concurrency": {"limit": self.concurrency},
                })
            if name not in self.record(case_id).get("arrays", ARRAY_DTYPES):
                raise PetctError(f"{self.root}: case {case_id!r} has no {name!r} array")
            self._arrays[key] = self._open_checked(case_id, name)
        return self._arrays[key]

    def _where(self, case_id: str, name: str) -> str:
        return f"{self.root}: case {case_id!r}, array {name!r} ({_join(self.root, 'cases', case_id, name)})"

    def _open_checked(self, case_id: str, name: str) -> ts.TensorStore:
        where = self._where(case_id, name)
        spec = _array_spec(self.root, case_id, name)
        try:
            arr = ts.open(spec, read=True, context=self._context).result()
            # One shard per array: without its file a zarr3 read returns fill values.
            keys = ts.KvStore.open(spec["kvstore"]).result().list().result()
        except ValueError as e:
            raise PetctError(f"{where}: cannot be opened ({_first_line(e)})") from None
        if not any(k.startswith(b"c/") or k.startswith(b"c.") for k in keys) and not self._all_fill(case_id, name):
            raise PetctError(f"{where}: its data file is missing (only {sorted(k.decode() for k in keys)})")
        if arr.dtype.name != ARRAY_DTYPES[name]:
            raise PetctError(f"{where}: zarr.json says {arr.dtype.name}, the store keeps {name} "
                             f"as {ARRAY_DTYPES[name]}")
        shape = list(self.record(case_id)["shape_zyx"])
        if list(arr.shape) != shape:
            raise PetctError(f"{where}: shape {list(arr.shape)} but the manifest records {shape}")
        return arr

    def _all_fill(self, case_id: str, name: str) -> bool:
        """Whether the manifest says this array is all zeros, which stores written before every
        chunk was kept hold without a data file: by its digest, or an old record's empty label."""
        record = self.record(case_id)
        digest = (record.get("digests") or {}).get(name)
        if digest is None:
            return name == "seg" and record.get("lesion_count") == 0
        return digest == content_digest(np.zeros(record["shape_zyx"], ARRAY_DTYPES[name]))

    def verify(self, case_id: str) -> list[str]:
        """Problems of one case's arrays (empty: sound): every chunk read (crc32c-checked)
        and the voxels' digest compared with the manifest's."""
        record = self.record(case_id)
        problems = []
        for name in record.get("arrays", ARRAY_DTYPES):
            try:
                data = self.read(case_id, [name])[name]
            except PetctError as e:
                problems.append(str(e))
                continue
            want = (record.get("digests") or {}).get(name)
            if want is None:
                problems.append(f"{self._where(case_id, name)}: no digest in the manifest "
                                "(written before digests were recorded): its chunks read, its content is unchecked")
            elif content_digest(data) != want:
                problems.append(f"{self._where(case_id, name)}: content differs from the digest "
                                "recorded when it was written")
        return problems

    def read(self, case_id: str, names: Iterable[str], lo: Sequence[int] | None = None,
             hi: Sequence[int] | None = None, fill: float = 0,
             dtypes: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Read the box [lo, hi) of several arrays of a case, concurrently.

        The box may reach outside the volume; voxels outside are `fill`. Only the chunks
        inside the box are read. `dtypes` maps array names to the dtype they are converted to
        while reading (on TensorStore's threads, along with decoding: float16 PET to float32
        this way costs next to nothing, numpy's cast ~2.5 ns a voxel); others keep their stored dtype.
        """
        shape = self.record(case_id)["shape_zyx"]
        lo = [0, 0, 0] if lo is None else [int(v) for v in lo]
        hi = list(shape) if hi is None else [int(v) for v in hi]
        in_lo = [max(a, 0) for a in lo]
        in_hi = [min(b, s) for b, s in zip(hi, shape)]
        inside = in_lo == lo and in_hi == hi
        futures, kinds = {}, {}
        for name in names:
            kinds[name] = np.dtype((dtypes or {}).get(name, ARRAY_DTYPES[name]))
            if all(a < b for a, b in zip(in_lo, in_hi)):
                arr = self.array(case_id, name)
                if kinds[name] != np.dtype(ARRAY_DTYPES[name]):
                    arr = ts.cast(arr, ts.dtype(kinds[name].name))
                futures[name] = arr[tuple(slice(a, b) for a, b in zip(in_lo, in_hi))].read()
            else:
                futures[name] = None
        out = {}
        dst = tuple(slice(a - l, b - l) for a, b, l in zip(in_lo, in_hi, lo))
        for name, fut in futures.items():
            try:
                got = None if fut is None else fut.result()
            except ValueError as e:  # a chunk's checksum or the shard index failed
                raise PetctError(f"{self._where(case_id, name)}: damaged ({_first_line(e)})") from None
            if inside and got is not None:
                out[name] = got  # a fresh array already: no padded copy needed
                continue
            box = np.full([b - a for a, b in zip(lo, hi)], fill, dtype=kinds[name])
            if got is not None:
                box[dst] = got
            out[name] = box
        return out


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
