"""What a run tells a person: JSON lines, TensorBoard events, a progress bar, a summary.

`W/metrics.jsonl` holds one object per line with at least `step` and the metrics;
evaluation lines carry `split`. Only process 0 writes. Files go through `etils.epath`,
so a workdir may be a URL (gs://, s3://; needs gcsfs/s3fs, and google-cloud-storage/boto3
for TensorBoard): object storage cannot append, so there the writer keeps the rows and
rewrites metrics.jsonl at each write.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from etils import epath


def _plain(value: Any) -> Any:
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr.tolist()


def is_url(path: str) -> bool:
    return "://" in str(path)


def write_text_atomic(path: str, text: str) -> None:
    """Replace a small file whole: local files through a rename; an object store's
    single write is atomic already."""
    if is_url(path):
        epath.Path(path).write_text(text)
        return
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


class MetricsWriter:
    def __init__(self, workdir: str, *, append: bool | None = None):
        self.enabled = jax.process_index() == 0
        self.workdir = workdir
        self.path = os.path.join(workdir, "metrics.jsonl")
        # Appending needs a file system; on object storage (or append=False) rows are kept
        # (loaded at the first write, after a resume has truncated the file) and rewritten.
        self.append = not is_url(workdir) if append is None else append
        self._rows: list[dict] | None = None
        self._tb = None
        if self.enabled:
            epath.Path(workdir).mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, metrics: dict, split: str | None = None) -> dict:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        if split is not None:
            row["split"] = split
        if not self.enabled:
            return row
        if self.append:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        else:
            if self._rows is None:
                self._rows = read_metrics(self.workdir)
            self._rows.append(row)
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self._rows))
        prefix = f"{split}/" if split else "train/"
        for k, v in row.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self._tb.add_scalar(prefix + k, v, int(step))
        return row

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
        write_text_atomic(os.path.join(workdir, "metrics.jsonl"),
                          "".join(json.dumps(r) + "\n" for r in kept))
