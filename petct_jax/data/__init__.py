"""Input pipeline: random 3D patches streamed from the store with Grain.

    source.py         Grain random-access source over the store (one record per scan)
    patches.py        PatchConfig; patch geometry, RandZoom, foreground oversampling
    normalize.py      per-scan z-score (the paper's) and nnU-Net's CT scheme, at read time
    augment.py        fine-tuning augmentations (flips, rotation/scaling, intensity)
    splits.py         patient-level subsets and split files
    pipeline.py       the Grain pipeline, its checkpointable iterator, global batches
    batch_buffers.py  shared batch segments that worker processes reuse (google/grain#851)

Names below are imported lazily, so `from petct_jax.data import splits` does not load
Grain (and with it JAX).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PatchConfig": "patches", "AugmentConfig": "augment", "Normalizer": "normalize",
    "make_normalizer": "normalize", "ScanSource": "source", "load_case": "source",
    "make_patch_iterator": "pipeline", "make_case_iterator": "pipeline",
    "patch_dataset": "pipeline", "PatchIterator": "pipeline", "global_batch": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"petct_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'petct_jax.data' has no attribute {name!r}")
