"""What a run tells a person: JSON lines, TensorBoard events, a progress bar, a summary.

`W/metrics.jsonl` holds one object per line with at least `step` and the metrics;
evaluation lines carry `split`. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np


def _plain(value: Any) -> Any:
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


class MetricsWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, split: str | None = None) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if split is not None:
            row["split"] = split
        if not self.enabled:
            return row
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        prefix = f"{split}/" if split else "train/"
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(prefix + k, v, int(step))
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class Throughput:
    """Steps/s and voxels/s over the last logging interval."""

    def __init__(self, voxels_per_step: int):
        self.voxels_per_step = voxels_per_step
        self._t, self._step = time.perf_counter(), None

    def update(self, step: int) -> dict:
        now = time.perf_counter()
        out = {}
        if self._step is not None and step > self._step:
            rate = (step - self._step) / (now - self._t)
            out = {"steps_per_s": rate, "voxels_per_s": rate * self.voxels_per_step}
        self._t, self._step = now, step
        return out


def truncate_metrics(workdir: str, last_step: int) -> None:
    """Drop lines logged after `last_step`: a resumed run rewrites them."""
    rows = read_metrics(workdir)
    kept = [r for r in rows if r["step"] <= last_step]
    if len(kept) != len(rows) and jax.process_index() == 0:
        path = os.path.join(workdir, "metrics.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(path + ".tmp", path)
