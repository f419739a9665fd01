"""Whole-scan sliding-window inference: ours vs MONAI's `sliding_window_inference` on the torch twin.

One synthetic 2-channel scan (default 160x96x96 voxels, z-scored-like noise with a few bright
blobs) is segmented by the default PlainConvUNet (the paper's 6-stage 32..320 network,
2 classes; random He-initialised weights, so the logits are arbitrary but identical on both
sides) with the same windows, overlap 0.5, window batch 2 and Gaussian weighting:

  - ours:      `petct_jax.downstream.inference.sliding_window_predict` over
               `make_predict_fn(model)` (one jitted network call per window batch);
  - reference: MONAI 1.6.1 `sliding_window_inference` over dynamic_network_architectures'
               PlainConvUNet holding the same weights (`petct_jax.convert.to_torch`), under
               `torch.inference_mode()`, given *our* Gaussian map as `roi_weight_map`.

Same windows: the default sizes make `size - window` a multiple of MONAI's step on every axis,
where MONAI's and nnU-Net's tile placements coincide (petct_jax/downstream/inference.py); with
our map the two results must then agree to float tolerance (`max_abs_diff`). MONAI's own
Gaussian (`mode="gaussian", sigma_scale=0.125`) is centred at (window - 1) / 2, untruncated and
floored at 1e-3; `--monai-own-gaussian` also reports how far that result is from ours (not timed).

Timing: the fastest of `--repeats` whole-scan runs per side, taken in turns, after one
untimed run each (compile / warm-up). CPU default window 64x64x64 (the network needs
multiples of 32); the paper's setting is `--window 96 128 128` on a real-size scan
(e.g. `--shape 320 200 200`). Both sides run in one process; on Linux the process restarts
itself once with glibc's malloc on transparent huge pages (`--no-huge-pages` to keep the
default allocator; see `petct_jax.hugepages`).

    python benchmarks/inference.py [--shape 160 96 96] [--window 64 64 64] [--repeats 2]

Ends with one line holding one JSON object (`speedup` = MONAI time / our time).
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Measure the checkout this file belongs to, whatever `pip install -e` points at.
_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import json
import math
import os
import time

import numpy as np

from petct_jax.cpu_process import prepare_cpu_process
from petct_jax.hugepages import huge_pages_on  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 96, 96), metavar=("Z", "Y", "X"))
    parser.add_argument("--window", type=int, nargs=3, default=(64, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--batch-windows", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--net", choices=("paper", "small"), default="paper")
    parser.add_argument("--monai-own-gaussian", action="store_true")
    parser.add_argument("--no-huge-pages", action="store_true")
    return parser.parse_args()


def synthetic_scan(shape, seed: int = 0) -> np.ndarray:
    """(Z, Y, X, 2) float32: noise plus a few Gaussian blobs, brighter in the PET channel."""
    rng = np.random.default_rng(seed)
    image = rng.normal(scale=0.5, size=(*shape, 2)).astype(np.float32)
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    for _ in range(6):
        centre = [rng.uniform(0, n) for n in shape]
        r2 = sum((g - c) ** 2 for g, c in zip(grids, centre))
        blob = np.exp(-r2 / (2 * rng.uniform(2, 6) ** 2))
        image[..., 0] += 4.0 * blob
        image[..., 1] += 1.0 * blob
    return image


def main() -> None:
    args = parse_args()
    prepare_cpu_process(huge_pages=not args.no_huge_pages)

    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from petct_jax.downstream.inference import (
        gaussian_importance_map, make_predict_fn, sliding_window_predict, tile_positions)
    from petct_jax.models.plain_unet import PlainConvUNet

    # the torch twin builder lives with the training benchmark
    import sys
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from train_step import NETS, torch_twin

    # bfloat16 compute on GPU and TPU as in training; the label below is the model's own dtype.
    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    torch_device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(os.cpu_count())
    window = tuple(args.window)
    model = PlainConvUNet(**NETS[args.net], dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
    image = synthetic_scan(tuple(args.shape))
    predict = make_predict_fn(model)
    net = torch_twin(model, torch_device).eval()
    from monai.inferers import sliding_window_inference

    weight_map = torch.from_numpy(gaussian_importance_map(window)).to(torch_device)
    x_t = torch.from_numpy(np.moveaxis(image, -1, 0)[None].copy()).to(torch_device)

    def ours() -> np.ndarray:
        return sliding_window_predict(predict, image, window, num_classes=2, overlap=args.overlap,
                                      batch_windows=args.batch_windows)

    def reference(**kw) -> np.ndarray:
        with torch.inference_mode():
            out = sliding_window_inference(x_t, window, args.batch_windows, net,
                                           overlap=args.overlap, mode="gaussian", **kw)
            if torch_device == "cuda":
                torch.cuda.synchronize()
        return np.moveaxis(out[0].float().cpu().numpy(), 0, -1)

    monai = lambda: reference(roi_weight_map=weight_map)  # noqa: E731

    t0 = time.perf_counter()
    out_ours = ours()  # compiles the window network once
    first_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_monai = monai()
    first_monai = time.perf_counter() - t0
    best = {"ours": math.inf, "monai": math.inf}
    for _ in range(args.repeats):
        for name, fn in (("ours", ours), ("monai", monai)):
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)

    diff = float(np.max(np.abs(out_ours - out_monai)))
    n_windows = len(tile_positions(args.shape, window, args.overlap))
    voxels = math.prod(args.shape)
    result = {
        "benchmark": "inference",
        "device": jax.devices()[0].device_kind, "torch_device": torch_device,
        "cpu_count": os.cpu_count(), "load_avg_1min": round(os.getloadavg()[0], 2),
        "huge_pages": huge_pages_on(),
        "jax": jax.__version__, "torch": torch.__version__,
        "net": args.net, "scan_zyx": list(args.shape), "window": list(window),
        "overlap": args.overlap, "batch_windows": args.batch_windows, "windows": n_windows,
        "dtype": str(jnp.dtype(model.dtype)),
        "ours_s": round(best["ours"], 3), "monai_s": round(best["monai"], 3),
        "speedup": round(best["monai"] / best["ours"], 3),
        "ours_first_run_s": round(first_ours, 2), "monai_first_run_s": round(first_monai, 2),
        "ours_voxels_per_s": round(voxels / best["ours"]),
        "monai_voxels_per_s": round(voxels / best["monai"]),
        "max_abs_diff": diff,
        "max_abs_logit": float(np.max(np.abs(out_monai))),
        "argmax_agreement": float(np.mean(out_ours.argmax(-1) == out_monai.argmax(-1))),
    }
    if args.monai_own_gaussian:
        own = reference(sigma_scale=0.125)
        result["monai_own_gaussian_max_abs_diff"] = float(np.max(np.abs(out_ours - own)))
        result["monai_own_gaussian_mean_abs_diff"] = float(np.mean(np.abs(out_ours - own)))
    print(f"whole scan {tuple(args.shape)}, {n_windows} windows of {window}: ours "
          f"{result['ours_s']} s, MONAI {result['monai_s']} s, speedup {result['speedup']}, "
          f"max |diff| {diff:.2e}", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
