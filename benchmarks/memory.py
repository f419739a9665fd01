"""Peak device memory of one MAE training step per backbone and remat policy, and the largest
batch x crop that fits an 80 GB GPU, from XLA's compiled memory analysis.

For each backbone config (`configs/pretrain.py:<backbone>`: plain_unet, resenc_l, swin_small,
swin_base, swin_large; crop 96x128x128, bfloat16 compute, AdamW state in float32) and each
remat policy (None, "stage", "stage_dots"), the same jitted step `petct pretrain` runs is
lowered with abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated) and compiled,
through `petct_jax.train.plan.train_plan` (the `--dry-run` machinery), and
`compiled.memory_analysis()` gives arguments, outputs, aliased (donated) and temporary bytes;
peak = arguments + outputs - aliased + temporaries + code.

This is an estimate of GPU memory made on the CPU: the HLO is the one a GPU would run
(convolutions are forced to `lax.conv_general_dilated`, as `Conv3d` does off CPU), but the
CPU compiler fuses and schedules differently from XLA:GPU, and cuDNN workspaces, the CUDA
context (~0.5-1 GB) and allocator fragmentation are not in it. XLA:CPU's scheduler also
places recomputation early, so remat shows little or no saving here (`remat_sanity_check`: a
plain 8-stage chain needs *more* temporary memory with `jax.checkpoint` than without on CPU);
compare the remat policies on a GPU before trusting them. Compiling the large models on
2 CPU cores takes minutes each, hence a default subset (`--all` for every backbone).

Largest fit: the peak is affine in the voxels per device, peak(v) = fixed + v x per_voxel
(parameters, gradients and optimizer state do not depend on the batch; activations scale
with batch x crop voxels). Both terms come from compiling at batch 1 and batch 2 of the same
crop; the largest v with peak(v) <= `--budget-gib` (default 76 GiB of an 80 GB H100, leaving
room for the CUDA context and fragmentation) gives the largest batch at 96x128x128 and the
largest crop at batch 2 (the 96x128x128 aspect scaled, each side rounded down to a multiple
of 32 so the network's strides divide it).

    python benchmarks/memory.py [--backbones plain_unet swin_small] [--all]
                                [--remat none stage stage_dots] [--crop 96 128 128]

Ends with one line holding one JSON object.
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

from petct_jax.cpu_process import prepare_cpu_process

DEFAULT = ("plain_unet", "swin_small")
ALL = ("plain_unet", "resenc_l", "swin_small", "swin_base", "swin_large")
REMATS = {"none": None, "stage": "stage", "stage_dots": "stage_dots"}
GIB = 1024**3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=list(DEFAULT), choices=ALL)
    parser.add_argument("--all", action="store_true", help="every backbone (slow to compile)")
    parser.add_argument("--remat", nargs="+", default=list(REMATS), choices=list(REMATS))
    parser.add_argument("--crop", type=int, nargs=3, default=(96, 128, 128), metavar=("Z", "Y", "X"))
    parser.add_argument("--budget-gib", type=float, default=76.0)
    parser.add_argument("--dtype", default="bfloat16")
    return parser.parse_args()


def peak_bytes(backbone: str, remat: str | None, batch: int, crop, dtype: str) -> dict:
    """Compiled memory of one MAE train step (one device)."""
    from flax import nnx

    from petct_jax import config as config_lib
    from petct_jax.mae import pretrain
    from petct_jax.models import conv_cpu
    from petct_jax.train import plan as plan_lib

    config = config_lib.resolve(f"configs/pretrain.py:{backbone}")
    config.batch_size = batch
    config.grad_accum = 1
    config.data.patch = tuple(crop)
    config.model.dtype = dtype
    config.model.remat = remat or ""
    t0 = time.perf_counter()
    with conv_cpu.use_impl("xla"):  # the HLO a GPU would compile
        plan = plan_lib.train_plan(config, lambda: pretrain.build_model(config, nnx.Rngs(0)),
                                   pretrain.mae_loss_fn(config.mae), pretrain.batch_spec(config),
                                   compile=True)
    compiled = plan["memory"]["compiled"]
    if compiled is None:
        raise RuntimeError(f"{backbone}: {plan['memory']['note']} {plan['problems']}")
    return {"peak": compiled["peak_estimate"], "temp": compiled["temp"],
            "arguments": compiled["argument"], "params": plan["params"]["count"],
            "state_bytes": plan["memory"]["params"] + plan["memory"]["opt_state"],
            "compile_s": round(time.perf_counter() - t0, 1)}


def largest_fit(fixed: float, per_voxel: float, budget: float, crop) -> dict:
    """Largest batch at `crop` and largest crop (same aspect, sides multiples of 32) at batch 2."""
    if per_voxel <= 0:
        return {"max_voxels": None, "max_batch_at_crop": None, "max_crop_at_batch2": None}
    max_voxels = (budget - fixed) / per_voxel
    n = math.prod(crop)
    scale = (max_voxels / (2 * n)) ** (1 / 3)
    best = [max(32, int(c * scale) // 32 * 32) for c in crop]
    return {"max_voxels": int(max_voxels), "max_batch_at_crop": int(max_voxels // n),
            "max_crop_at_batch2": best if 2 * math.prod(best) <= max_voxels else None}


def remat_sanity_check() -> dict:
    """Does this backend's compiled memory see remat at all? Eight stages of four
    `tanh(x @ w)` on a 16 MiB activation, with and without `jax.checkpoint` per stage: a
    scheduler that recomputes late needs far less temporary memory with it."""
    import jax
    import jax.numpy as jnp

    def stage(x, w):
        for _ in range(4):
            x = jnp.tanh(x @ w)
        return x

    def loss(ws, x, remat):
        for w in ws:
            x = (jax.checkpoint(stage) if remat else stage)(x, w)
        return jnp.sum(x**2)

    ws = [jax.ShapeDtypeStruct((64, 64), jnp.float32)] * 8
    x = jax.ShapeDtypeStruct((65536, 64), jnp.float32)
    out = {}
    for remat in (False, True):
        compiled = jax.jit(jax.grad(loss), static_argnums=2).lower(ws, x, remat).compile()
        out["checkpoint" if remat else "plain"] = round(
            compiled.memory_analysis().temp_size_in_bytes / 2**20, 1)
    return {"chain_temp_mib": out}


def main() -> None:
    args = parse_args()
    prepare_cpu_process(huge_pages=False)  # CPU figures of the program `petct` runs: its XLA flag
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # configs/ paths
    import jax

    backbones = ALL if args.all else tuple(args.backbones)
    budget = args.budget_gib * GIB
    rows = []
    for backbone in backbones:
        for remat_name in args.remat:
            remat = REMATS[remat_name]
            one = peak_bytes(backbone, remat, 1, args.crop, args.dtype)
            two = peak_bytes(backbone, remat, 2, args.crop, args.dtype)
            voxels = math.prod(args.crop)
            per_voxel = (two["peak"] - one["peak"]) / voxels
            fixed = one["peak"] - per_voxel * voxels
            row = {"backbone": backbone, "remat": remat_name, "params": one["params"],
                   "peak_gib_batch1": round(one["peak"] / GIB, 2),
                   "peak_gib_batch2": round(two["peak"] / GIB, 2),
                   "temp_gib_batch2": round(two["temp"] / GIB, 2),
                   "state_gib": round(one["state_bytes"] / GIB, 2),
                   "fixed_gib": round(fixed / GIB, 2),
                   "activation_mib_per_sample": round(per_voxel * voxels / 2**20, 1),
                   **largest_fit(fixed, per_voxel, budget, args.crop),
                   "compile_s": one["compile_s"] + two["compile_s"]}
            rows.append(row)
            print(f"{backbone:11s} remat={remat_name:10s} peak {row['peak_gib_batch1']:7.2f} GiB (batch 1)"
                  f" {row['peak_gib_batch2']:7.2f} GiB (batch 2); activations "
                  f"{row['activation_mib_per_sample']:9.1f} MiB/sample; fits batch "
                  f"{row['max_batch_at_crop']} at {tuple(args.crop)}, crop "
                  f"{row['max_crop_at_batch2']} at batch 2  [{row['compile_s']:.0f} s]", flush=True)
    sanity = remat_sanity_check()
    print(f"remat sanity check on this backend (temp MiB of an 8-stage chain): {sanity}", flush=True)
    print(json.dumps({
        "benchmark": "memory", "remat_sanity_check": sanity, "device_compiled_on": jax.devices()[0].device_kind,
        "jax": jax.__version__, "task": "mae", "crop": list(args.crop), "dtype": args.dtype,
        "budget_gib": args.budget_gib,
        "method": "XLA compiled memory_analysis of the jitted MAE step (CPU compile, GPU HLO), "
                  "peak = args + outputs - aliased + temp + code; fit = affine in batch x voxels "
                  "from batch 1 and 2",
        "rows": rows,
    }))


if __name__ == "__main__":
    main()
