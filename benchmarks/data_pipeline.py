"""Patch-pipeline throughput: ours (Grain over the zarr3 store, region reads) vs the reference.

The reference's MAE data path (method.md): one float32 (2, Z, Y, X) .npy per scan, loaded
whole, then MONAI `RandZoomd(prob=0.5, 0.9-1.1, trilinear, keep_size=False)` on the whole
volume, `SpatialPadd` with zeros and `RandSpatialCropd(96, 128, 128)`. We run those very
MONAI transforms when MONAI is installed (else an equivalent numpy version), inside the
same Grain loop (shuffle, repeat, batch 2, 0/1/2 worker processes) as ours, so the only
difference is the data path: ours reads the patch/zoom region from the store (pet
float16, ct int16, Blosc LZ4HC chunks), z-scores it and resamples only that region.

Default cohort (built once under /tmp, reused): 8 synthetic whole-body-sized scans,
300 x 200 x 200 voxels at 3 x 2 x 2 mm (smooth random fields plus noise, so compression
is realistic), as a store and as the reference's .npy files. Both are read from the page
cache (warm): this measures CPU cost, not the disk.

GPU demand estimate: one training step of the default PlainConvUNet (6 stages,
32-320 wide, 2 in / 2 out) on a 96 x 128 x 128 patch costs ~3x its forward FLOPs
(forward + input and weight gradients), computed below (~2.2 TFLOP per patch). An H100
SXM peaks at 989 dense BF16/FP16 TFLOP/s (NVIDIA datasheet); cuDNN's 3D convolutions
for these channel widths typically reach 15-40% of peak, i.e. ~70-180 patches/s. We report
the demand at 20% (~90 patches/s) and the number of CPU cores our pipeline needs to
cover it, from its measured CPU time per patch (wall-clock rates on a shared 2-core
machine swing with the load; CPU time per patch does not).

Ours runs once per batch dtype (`--dtypes`, default float32 and float16): `speedup` is for
the dtype the full-size training configs use (`data.dtype`), `speedup_by_dtype` for each
(first round). `speedup` is the median ratio of `--rounds` (default 3) ours/reference pairs
with the most workers, each pair measured back to back (`speedup_rounds`), because this
machine's speed drifts by more than 10% within minutes.

Usage: python benchmarks/data_pipeline.py [--batches 48] [--warmup 16] [--workers 0 1 2] [--dtypes ...]
       [--rounds 3] [--fresh]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import grain  # noqa: E402
import psutil  # noqa: E402
import scipy.ndimage as ndi  # noqa: E402

from petct_jax import store as store_lib  # noqa: E402
from petct_jax.data import make_patch_iterator  # noqa: E402
from petct_jax.config_blocks import IMAGE_DTYPE  # noqa: E402
from petct_jax.data.patches import IMAGE_DTYPES, PatchConfig  # noqa: E402
from petct_jax.data.pipeline import EpochShuffle, allow_worker_processes  # noqa: E402

PATCH = (96, 128, 128)
BATCH = 2
SPACING = (3.0, 2.0, 2.0)
H100_PEAK_TFLOPS = 989.0  # dense BF16/FP16 tensor cores, H100 SXM
ASSUMED_EFFICIENCY = 0.20


# ---------------------------------------------------------------------------
# Cohort.

def _summary(x: np.ndarray) -> dict:
    x64 = x.astype(np.float64)
    p = np.percentile(x64[::7, ::7, ::7], [0.5, 99.5])
    return {"mean": float(x64.mean()), "std": float(x64.std()), "min": float(x64.min()),
            "max": float(x64.max()), "p00_5": float(p[0]), "p99_5": float(p[1])}


def build_cohort(root: str, n: int, shape: tuple[int, int, int],
                 chunk: tuple[int, int, int]) -> tuple[str, list[str]]:
    store_root, npy_dir = os.path.join(root, "store"), os.path.join(root, "npy")
    done = os.path.join(root, "DONE")
    if os.path.exists(done) and store_lib.read_info(store_root)["chunk_zyx"] == list(chunk):
        return store_root, sorted(os.path.join(npy_dir, f) for f in os.listdir(npy_dir))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(npy_dir)
    store_lib.create(store_root, spacing_zyx=SPACING, chunk_zyx=chunk)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        small = [s // 8 for s in shape]
        field = ndi.zoom(rng.normal(size=small).astype(np.float32),
                         [s / m for s, m in zip(shape, small)], order=1)[: shape[0], : shape[1], : shape[2]]
        ct = (field * 300 - 100 + rng.normal(0, 20, shape).astype(np.float32)).round()
        ct = ct.clip(-1024, 3000).astype(np.int16)
        pet = np.abs(field + 1.5 + rng.normal(0, 0.1, shape).astype(np.float32)).astype(np.float16)
        case_id = f"bench{i:02d}"
        store_lib.write_case(store_root, case_id, {"pet": pet, "ct": ct}, chunk)
        stats = {"pet": _summary(pet), "ct": _summary(ct), "ct_foreground": None, "ct_body": None}
        store_lib.commit_case(store_root, {
            "id": case_id, "patient_id": case_id, "cohort": "bench", "shape_zyx": list(shape),
            "spacing_zyx": list(SPACING), "affine_zyx": np.diag([*SPACING, 1.0]).tolist(),
            "arrays": ["pet", "ct"], "has_label": False, "stats": stats, "lesions": [],
            "lesion_count": 0, "lesion_volume_ml": 0.0})
        # The reference's preprocessed file: both channels z-scored over the box, float32.
        both = np.stack([(pet.astype(np.float32) - stats["pet"]["mean"]) / stats["pet"]["std"],
                         (ct.astype(np.float32) - stats["ct"]["mean"]) / stats["ct"]["std"]])
        path = os.path.join(npy_dir, f"{case_id}.npy")
        np.save(path, both.astype(np.float32))
        paths.append(path)
    open(done, "w").close()
    return store_root, paths


def read_mb_per_patch(store_root: str, case_id: str, shape, chunk, patch=PATCH, n: int = 500) -> float:
    """Expected compressed bytes a patch read touches: the whole chunks it overlaps, at
    random positions (compressed bytes per voxel of the scan x voxels of those chunks)."""
    per_voxel = store_lib.case_bytes(store_root, case_id) / np.prod(shape)
    rng = np.random.default_rng(0)
    touched = []
    for _ in range(n):
        lo = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch)]
        touched.append(np.prod([min(-(-(a + p) // c) * c, s) - a // c * c
                                for a, p, c, s in zip(lo, patch, chunk, shape)]))
    return float(np.mean(touched) * per_voxel / 2 ** 20)


# ---------------------------------------------------------------------------
# The reference's data path.

class ReferenceTransform:
    """np.load the whole scan, RandZoom the whole volume, pad, random crop (MONAI if present)."""

    def __init__(self, patch=PATCH):
        self.patch = patch
        self._compose = None

    def __getstate__(self):
        return {"patch": self.patch, "_compose": None}

    def _build(self):
        try:
            import torch
            from monai.transforms import (Compose, LoadImaged, RandSpatialCropd, RandZoomd,
                                          SpatialPadd, ToTensord)
        except ImportError:
            return None
        if multiprocessing.parent_process() is not None:
            torch.set_num_threads(1)  # as torch's DataLoader does in its workers
        return Compose([
            LoadImaged(keys=["image"], reader="NumpyReader"),
            RandZoomd(keys=["image"], prob=0.5, min_zoom=0.9, max_zoom=1.1, mode="trilinear",
                      keep_size=False),
            SpatialPadd(keys=["image"], spatial_size=self.patch, mode="constant", constant_values=0),
            RandSpatialCropd(keys=["image"], roi_size=self.patch, random_size=False),
            ToTensord(keys=["image"]),
        ])

    def __call__(self, path: str, rng: np.random.Generator) -> dict:
        if self._compose is None:
            self._compose = self._build() or "numpy"
        if self._compose != "numpy":
            self._compose.set_random_state(seed=int(rng.integers(2 ** 31)))
            return {"image": np.asarray(self._compose({"image": path})["image"])}
        return {"image": _numpy_reference(np.load(path), self.patch, rng)}


def _numpy_reference(x: np.ndarray, patch, rng) -> np.ndarray:
    from petct_jax.data.patches import _resample_axis, zoomed_size
    if rng.random() < 0.5:
        scale = rng.uniform(0.9, 1.1)
        for axis, n in enumerate(x.shape[1:], 1):
            nz = zoomed_size(n, scale)
            u = np.clip((np.arange(nz) + 0.5) * n / nz - 0.5, 0, n - 1)
            x = _resample_axis(x, u, axis, True)
    pad = [(0, 0)] + [((max(p - n, 0)) // 2, max(p - n, 0) - max(p - n, 0) // 2)
                      for p, n in zip(patch, x.shape[1:])]
    x = np.pad(x, pad)
    starts = [int(rng.integers(0, n - p + 1)) for n, p in zip(x.shape[1:], patch)]
    return x[(slice(None),) + tuple(slice(s, s + p) for s, p in zip(starts, patch))]


def reference_iterator(paths: list[str], workers: int, seed: int = 0):
    # The same shuffle as ours (Grain's own costs ~3.8 ms a sample on 8 scans: EpochShuffle).
    ds = EpochShuffle(grain.MapDataset.source(paths).seed(seed), seed).repeat()
    ds = ds.random_map(ReferenceTransform()).batch(BATCH, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if workers:
        allow_worker_processes()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
    return iter(it)


# ---------------------------------------------------------------------------
# Measuring.

class PeakRSS:
    """Peak resident memory of this process plus its worker processes, sampled every 20 ms.
    The process list is refreshed every 0.5 s only: listing children scans /proc (~2.5 ms of
    CPU here), which at every sample would bill the faster contender most."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        procs, listed = [me], 0.0
        while not self._stop.is_set():
            if time.monotonic() - listed > 0.5:
                procs, listed = [me, *me.children(recursive=True)], time.monotonic()
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its live worker processes."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def measure(make_iter, n_batches: int, warmup: int) -> dict:
    """Steady-state throughput (wall clock) and CPU cost per patch (robust to a busy machine),
    after `warmup` batches: worker start-up, imports and the first allocations (our workers'
    reusable batch segments; batch_buffers.py) are reported as `startup_s`, not timed."""
    with PeakRSS() as rss:
        it = make_iter()
        t0 = time.perf_counter()
        first = next(it)
        assert first["image"].shape[0] == BATCH
        del first
        for _ in range(warmup - 1):
            next(it)
        startup = time.perf_counter() - t0
        c0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(n_batches):
            next(it)
        dt, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        it.close()
    return {"patches_per_s": round(n_batches * BATCH / dt, 2),
            "cpu_ms_per_patch": round(1000 * cpu / (n_batches * BATCH), 1),
            "startup_s": round(startup, 2), "peak_rss_mb": round(rss.peak / 2 ** 20)}


def plainconvunet_train_tflop_per_patch(patch=PATCH, widths=(32, 64, 128, 256, 320, 320),
                                        in_ch: int = 2, out_ch: int = 2) -> float:
    """2 x MACs of the 3x3x3 convs, 2x2x2 transposed convs and the head, x3 for training."""
    vox = [int(np.prod([p // 2 ** s for p in patch])) for s in range(len(widths))]
    macs, c = 0, in_ch
    for s, w in enumerate(widths):
        macs += 27 * (c + w) * w * vox[s]
        c = w
    for s in range(len(widths) - 2, -1, -1):
        w = widths[s]
        macs += widths[s + 1] * w * vox[s] + 27 * 3 * w * w * vox[s]
    macs += widths[0] * out_ch * vox[0]
    return 3 * 2 * macs / 1e12


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 200, 200))
    parser.add_argument("--batches", type=int, default=48, help="timed batches per setting")
    parser.add_argument("--warmup", type=int, default=16, help="untimed batches first (>= 1)")
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--dtypes", nargs="+", default=("float32", "float16"), choices=IMAGE_DTYPES,
                        help="our batches' dtypes (the reference's are float32)")
    parser.add_argument("--root", default="/tmp/petct_bench_data_pipeline")
    parser.add_argument("--chunk", type=int, nargs=3, default=store_lib.DEFAULT_CHUNK_ZYX,
                        help="store chunk shape (default: the store's default)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="ours/reference pairs measured in turns for the headline (most workers, "
                             "the configs' dtype); `speedup` is the median of their ratios")
    parser.add_argument("--fresh", action="store_true", help="rebuild the cohort")
    args = parser.parse_args()
    if args.warmup < 1 or args.batches < 1 or args.rounds < 1:
        parser.error("--warmup, --batches and --rounds must be at least 1")
    if args.fresh:
        shutil.rmtree(args.root, ignore_errors=True)

    t0 = time.perf_counter()
    chunk = tuple(args.chunk)
    store_root, paths = build_cohort(args.root, args.cases, tuple(args.shape), chunk)
    store_mib = sum(store_lib.case_bytes(store_root, f"bench{i:02d}") for i in range(len(paths))) / 2 ** 20
    print(f"cohort: {len(paths)} scans {tuple(args.shape)} ({time.perf_counter() - t0:.1f} s); "
          f"store {store_mib:.0f} MiB, .npy {sum(os.path.getsize(p) for p in paths) / 2 ** 20:.0f} MiB",
          flush=True)
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was

    def measure_ours(dtype: str, w: int) -> dict:  # RandZoom p=0.5, 0.9-1.1: as the reference
        config = PatchConfig.for_task("mae", patch=PATCH, dtype=dtype)
        got = measure(lambda: make_patch_iterator(store_root, None, config, seed=0, batch_size=BATCH,
                                                  num_workers=w, process_index=0, process_count=1),
                      args.batches, args.warmup)
        print(f"ours {dtype} workers={w}: {got}", flush=True)
        return got

    def measure_reference(w: int) -> dict:
        got = measure(lambda: reference_iterator(paths, w), args.batches, args.warmup)
        print(f"reference float32 workers={w}: {got}", flush=True)
        return got

    ours: dict[str, dict[int, dict]] = {d: {} for d in args.dtypes}
    ref = {}
    for w in args.workers:
        for dtype in args.dtypes:
            ours[dtype][w] = measure_ours(dtype, w)
        ref[w] = measure_reference(w)

    try:
        import monai  # noqa: F401
        ref_impl = "MONAI " + monai.__version__
    except ImportError:
        ref_impl = "numpy equivalent (MONAI not installed)"
    best, first = max(args.workers), min(args.workers)
    # The headline is the dtype the full-size training configs feed their networks, measured
    # in `rounds` adjacent ours/reference pairs (this kind of machine drifts by more than 10%
    # within minutes): the first pair is the one above, later ones alternate which goes first.
    dtype = IMAGE_DTYPE if IMAGE_DTYPE in ours else args.dtypes[0]
    rounds = [(ours[dtype][best], ref[best])]
    for r in range(1, args.rounds):
        print(f"round {r + 1} of {args.rounds}", flush=True)
        if r % 2:
            rf = measure_reference(best)
            rounds.append((measure_ours(dtype, best), rf))
        else:
            o = measure_ours(dtype, best)
            rounds.append((o, measure_reference(best)))
    ratios = [o["patches_per_s"] / rf["patches_per_s"] for o, rf in rounds]
    tflop = plainconvunet_train_tflop_per_patch()
    demand = H100_PEAK_TFLOPS * ASSUMED_EFFICIENCY / tflop
    per_core = 1000 / ours[dtype][best]["cpu_ms_per_patch"]  # patches/s one busy core sustains
    result = {
        "benchmark": "data_pipeline",
        "patch": list(PATCH), "batch": BATCH, "timed_batches": args.batches,
        "warmup_batches": args.warmup, "cases": len(paths), "shape": list(args.shape),
        "workers": best, "dtype": dtype,
        "rounds": len(rounds),
        "patches_per_s": float(np.median([o["patches_per_s"] for o, _ in rounds])),
        "reference_patches_per_s": float(np.median([rf["patches_per_s"] for _, rf in rounds])),
        "speedup": round(float(np.median(ratios)), 2),
        "speedup_rounds": [round(x, 2) for x in ratios],
        "speedup_by_dtype": {d: round(o[best]["patches_per_s"] / ref[best]["patches_per_s"], 2)
                             for d, o in ours.items()},
        "speedup_in_process": round(ours[dtype][first]["patches_per_s"]
                                    / ref[first]["patches_per_s"], 2),
        "speedup_cpu": round(ref[best]["cpu_ms_per_patch"] / ours[dtype][best]["cpu_ms_per_patch"], 2),
        "ours": {d: {str(k): v for k, v in o.items()} for d, o in ours.items()},
        "reference": {str(k): v for k, v in ref.items()},
        "reference_impl": ref_impl,
        "chunk": list(chunk),
        "read_mb_per_patch": round(read_mb_per_patch(store_root, "bench00", args.shape, chunk), 1),
        "reference_read_mb_per_patch": round(os.path.getsize(paths[0]) / 2 ** 20, 1),
        "cpu_cores": os.cpu_count(),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "train_tflop_per_patch": round(tflop, 3),
        "h100_demand_patches_per_s": round(demand, 1),
        "ours_patches_per_core_s": round(per_core, 1),
        "cores_to_feed_h100": int(np.ceil(demand / per_core)),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
