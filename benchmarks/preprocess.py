"""Preprocessing throughput and store size: `petct preprocess` against the reference approach.

    python benchmarks/preprocess.py [--cases 8] [--size small] [--workers 2]

Builds a phantom AutoPET cohort (`petct phantoms`), then harmonizes it twice from the
same files (read once beforehand so both find them in the page cache):

* ours: `petct_jax.preprocessing.preprocess.preprocess` (affine resampling in float32 with the
  diagonal fast path, body crop, exact statistics, lesion index, source hashes,
  float16/int16/uint8 zarr3 shards, Blosc LZ4HC), `--workers` processes;
* reference: a faithful re-implementation of the authors' approach: per scan, one
  after the other, load SUV, CTres and SEG with nibabel `get_fdata()` (float64),
  `scipy.ndimage.zoom` the whole arrays to 3 x 2 x 2 mm (order 1; the label order 0),
  body crop (largest component of CT > -500 HU, padded by 3), z-score PET and CT over
  the box, save one float32 `.npy` of shape (2, Z, Y, X) plus the label as uint8 `.npy`.

Prints one line holding one JSON object: scans per minute, bytes on disk, `speedup`
(ours / reference, scans per minute) and `bytes_ratio` (ours / reference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from petct_jax.phantoms import generate_cohort  # noqa: E402
from petct_jax.preprocessing.preprocess import preprocess  # noqa: E402

TARGET_ZYX = (3.0, 2.0, 2.0)


def reference_case(study_dir: str, out_dir: str, name: str) -> None:
    """The reference's per-scan harmonization (re-implemented from its description)."""
    pet_img = nib.load(os.path.join(study_dir, "SUV.nii.gz"))
    ct_img = nib.load(os.path.join(study_dir, "CTres.nii.gz"))
    seg_img = nib.load(os.path.join(study_dir, "SEG.nii.gz"))
    pet, ct, seg = pet_img.get_fdata(), ct_img.get_fdata(), seg_img.get_fdata()
    # NIfTI arrays are (x, y, z) with header zooms in that order; target 2 x 2 x 3 mm.
    factors = np.array(pet_img.header.get_zooms()[:3]) / np.array(TARGET_ZYX[::-1])
    pet = ndi.zoom(pet, factors, order=1)
    ct = ndi.zoom(ct, factors, order=1)
    seg = ndi.zoom(seg, factors, order=0)
    labels, n = ndi.label(ct > -500)
    body = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    box = ndi.find_objects((labels == body).astype(np.uint8))[0]
    box = tuple(slice(max(0, s.start - 3), min(dim, s.stop + 3)) for s, dim in zip(box, ct.shape))
    pet, ct, seg = pet[box], ct[box], seg[box]
    pet = (pet - pet.mean()) / pet.std()
    ct = (ct - ct.mean()) / ct.std()
    image = np.stack([pet.transpose(2, 1, 0), ct.transpose(2, 1, 0)]).astype(np.float32)
    np.save(os.path.join(out_dir, f"{name}.npy"), image)
    np.save(os.path.join(out_dir, f"{name}_seg.npy"), seg.transpose(2, 1, 0).astype(np.uint8))


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (our worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _du(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(folder, f)) for f in files)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "standard"))
    parser.add_argument("--workers", type=int, default=2, help="our worker processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="petct-bench-") as tmp:
        raw = os.path.join(tmp, "raw")
        t = time.perf_counter()
        studies = generate_cohort(raw, args.cases, seed=args.seed, layout="autopet", size=args.size,
                                  workers=args.workers, progress=False)
        generate_s = time.perf_counter() - t
        dirs = [os.path.join(raw, os.path.dirname(s["paths"]["SUV"])) for s in studies]
        for folder in dirs:  # warm the page cache for both contenders alike
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    f.read()

        t, cpu = time.perf_counter(), _cpu_s()
        summary = preprocess(raw, os.path.join(tmp, "store"), workers=args.workers, progress=False)
        ours_s, ours_cpu = time.perf_counter() - t, _cpu_s() - cpu
        assert summary.ok and len(summary.committed) == args.cases, summary.failures

        ref_dir = os.path.join(tmp, "reference")
        os.makedirs(ref_dir)
        t, cpu = time.perf_counter(), _cpu_s()
        for n, folder in enumerate(dirs):
            reference_case(folder, ref_dir, f"case{n:04d}")
        ref_s, ref_cpu = time.perf_counter() - t, _cpu_s() - cpu

        ours_bytes, ref_bytes = _du(os.path.join(tmp, "store")), _du(ref_dir)
        raw_bytes = sum(_du(d) for d in dirs)
    result = {
        "benchmark": "preprocess",
        "cases": args.cases,
        "size": args.size,
        "workers": args.workers,
        "generate_s": round(generate_s, 2),
        "ours_s": round(ours_s, 2),
        "reference_s": round(ref_s, 2),
        "ours_cpu_s": round(ours_cpu, 2),
        "reference_cpu_s": round(ref_cpu, 2),
        "ours_scans_per_min": round(60 * args.cases / ours_s, 2),
        "reference_scans_per_min": round(60 * args.cases / ref_s, 2),
        "speedup": round(ref_s / ours_s, 3),
        "ours_bytes": ours_bytes,
        "reference_bytes": ref_bytes,
        "raw_nifti_bytes": raw_bytes,
        "bytes_ratio": round(ours_bytes / ref_bytes, 4),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
