"""Grain random-access sources over the store: one record per scan.

`ScanSource` implements Grain's `RandomAccessDataSource` protocol (`__len__`,
`__getitem__`) and returns the scan's manifest record; the arrays are read later, by the
patch sampler, only where a patch needs them. It pickles (the `Store` reopens its
TensorStore handles lazily), so it works in Grain's spawned worker processes.
`load_case` reads a whole scan for evaluation.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from petct_jax.data.normalize import Normalizer
from petct_jax.errors import PetctError
from petct_jax.store import Store, float32_reads


def open_store(store: Store | str) -> Store:
    return store if isinstance(store, Store) else Store(str(store))


class ScanSource:
    """The scans `ids` of a store, in that order; element i is the record of ids[i]."""

    def __init__(self, store: Store | str, ids: Iterable[str] | None = None, *,
                 require: Sequence[str] = ()):
        self.store = open_store(store)
        self.ids = list(self.store.ids if ids is None else ids)
        if not self.ids:
            raise PetctError(f"{self.store.root}: no cases selected")
        for case_id in self.ids:
            record = self.store.record(case_id)  # raises PetctError for unknown ids
            missing = [a for a in require if a not in record.get("arrays", ("pet", "ct", "seg"))]
            if missing:
                raise PetctError(f"{self.store.root}: case {case_id!r} has no {'/'.join(missing)} "
                                 "array (unlabelled cases cannot train segmentation)")

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return self.store.record(self.ids[index])

    def __repr__(self) -> str:
        return f"ScanSource({self.store.root!r}, {len(self.ids)} scans)"


def load_case(store: Store, record: Mapping, channels: Sequence[str], normalizer: Normalizer,
              labels: bool = False) -> dict[str, Any]:
    """A whole scan: {"image": (Z, Y, X, C) float32, "label": (Z, Y, X) uint8, "case": id}."""
    names = list(channels) + (["seg"] if labels else [])
    arrays = store.read(record["id"], names, dtypes=float32_reads(channels))
    out: dict[str, Any] = {
        "image": np.stack([normalizer(c, arrays[c], record) for c in channels], axis=-1),
        "case": record["id"],
    }
    if labels:
        out["label"] = arrays["seg"].astype(np.uint8, copy=False)
    return out
