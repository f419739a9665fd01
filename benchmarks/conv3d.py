"""3D convolutions layer by layer: XLA's convolution vs our CPU path vs a matmul of the same FLOPs.

For every distinct convolution of the default PlainConvUNet (the paper's 6-stage 32..320
network) at a small CPU size (default batch 2, crop 32x64x64: the shapes are recorded from the
model itself), in one run and taken in turns (the machine may be shared):

  - xla:    `lax.conv_general_dilated` (Eigen's cuboid convolution on XLA:CPU),
  - ours:   `petct_jax.models.conv_cpu.conv3d(impl="cpu")` (2D convolutions / dots, YNNPACK),
  - matmul: one `jnp.dot` with exactly the forward's FLOPs, shaped like the convolution's
            im2col GEMM, (B*D'*H'*W', KD*KH*KW*C) @ (KD*KH*KW*C, O), operands made beforehand,
  - torch:  `torch.nn.functional.conv3d` (oneDNN) on the same shapes (with `--torch`).

Forward ("F") and forward + backward ("FB", the vjp w.r.t. input and kernel: 3x the forward's
FLOPs) in GFLOP/s = nominal FLOPs (2 per multiply-add, padding taps included) / best time.
`network_*_s` add up each layer's best time times the number of such layers in the network.
A large square matmul (`--square`, default 2048) gives the machine's matmul rate for the
target: our 3x3x3 forward+backward >= 60% of the matmul rate.

On Linux the process restarts itself once with glibc's malloc on transparent huge pages
(`--no-huge-pages` to keep the default; `petct_jax.hugepages`).

    python benchmarks/conv3d.py [--batch 2] [--crop 32 64 64] [--repeats 3] [--torch]

Ends with one line holding one JSON object.
"""

from __future__ import annotations

import os as _os
import sys as _sys

# Measure the checkout this file belongs to, whatever `pip install -e` points at.
_sys.path.insert(0, _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

import argparse
import collections
import json
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from petct_jax.cpu_process import prepare_cpu_process
from petct_jax.hugepages import huge_pages_on
from petct_jax.models import conv_cpu, layers
from petct_jax.models.plain_unet import PlainConvUNet

DN = ("NDHWC", "DHWIO", "NDHWC")


def layer_shapes(model: nnx.Module, x_shape) -> collections.Counter:
    """Counter of (x shape, kernel shape, strides, padding) over the model's convolutions."""
    calls: collections.Counter = collections.Counter()
    original = layers.conv3d

    def record(x, kernel, strides, padding, impl="auto"):
        calls[(tuple(x.shape), tuple(kernel.shape), tuple(strides),
               tuple(tuple(p) for p in padding))] += 1
        return original(x, kernel, strides, padding, impl="xla")

    layers.conv3d = record
    try:
        jax.eval_shape(lambda: model(jnp.zeros(x_shape, jnp.float32)))
    finally:
        layers.conv3d = original
    return calls


def jax_fns(impl: str, strides, padding) -> tuple[Callable, Callable]:
    if impl == "xla":
        conv = lambda x, k: jax.lax.conv_general_dilated(x, k, strides, padding,  # noqa: E731
                                                         dimension_numbers=DN)
    else:
        conv = lambda x, k: conv_cpu.conv3d(x, k, strides, padding, impl="cpu")  # noqa: E731

    def fwd_bwd(x, k, cot):
        y, vjp = jax.vjp(conv, x, k)
        return vjp(cot)

    return jax.jit(conv), jax.jit(fwd_bwd)


def torch_fns(x_shape, k_shape, strides, padding):
    import torch

    b, d, h, w, c = x_shape
    kd, kh, kw, _, o = k_shape
    x = torch.randn(b, c, d, h, w, requires_grad=True)
    k = torch.randn(o, c, kd, kh, kw, requires_grad=True)
    pad = tuple(p[0] for p in padding)

    def fwd():
        with torch.no_grad():
            torch.nn.functional.conv3d(x, k, None, strides, pad)

    def fwd_bwd():
        y = torch.nn.functional.conv3d(x, k, None, strides, pad)
        x.grad = k.grad = None
        y.backward(torch.ones_like(y))

    return fwd, fwd_bwd


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Fastest of `repeats` runs of each fn, taken in turns."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--square", type=int, default=2048, help="size of the square matmul")
    parser.add_argument("--torch", action="store_true", help="also time torch's conv3d (oneDNN)")
    parser.add_argument("--no-huge-pages", action="store_true",
                        help="keep glibc's default malloc (no re-exec with transparent huge pages)")
    args = parser.parse_args()
    prepare_cpu_process(huge_pages=not args.no_huge_pages)
    if args.torch:
        import torch
        torch.set_num_threads(os.cpu_count())

    model = PlainConvUNet(rngs=nnx.Rngs(0))
    shapes = layer_shapes(model, (args.batch, *args.crop, 2))
    n_sq = args.square
    sq_a = jax.random.normal(jax.random.key(1), (n_sq, n_sq), jnp.float32)
    sq_dot = jax.jit(jnp.dot)
    key = iter(jax.random.split(jax.random.key(0), 5 * len(shapes)))
    rows, best = [], {}
    totals: dict[str, float] = collections.defaultdict(float)
    # One layer at a time (its operands alone in memory), its contenders in turns, with the
    # square matmul among them so that every layer has a matmul rate from the same moments.
    for i, ((xs, ks, strides, padding), count) in enumerate(shapes.items()):
        x = jax.random.normal(next(key), xs, jnp.float32)
        k = 0.05 * jax.random.normal(next(key), ks, jnp.float32)
        flops = conv_cpu.conv_flops(xs, ks, strides, padding)
        outs = [conv_cpu.out_size(n, kn, s, p) for n, kn, s, p in zip(xs[1:4], ks[:3], strides, padding)]
        cot = jax.random.normal(next(key), (xs[0], *outs, ks[-1]), jnp.float32)
        m, kk = xs[0] * math.prod(outs), math.prod(ks[:4])
        a = jax.random.normal(next(key), (m, kk), jnp.float32)
        b = jax.random.normal(next(key), (kk, ks[-1]), jnp.float32)
        dot = jax.jit(jnp.dot)
        fns, results = {}, {}
        for impl in ("xla", "ours"):
            f, fb = jax_fns(impl, strides, padding)
            fns[f"{impl}_F"] = lambda f=f: jax.block_until_ready(f(x, k))
            fns[f"{impl}_FB"] = lambda fb=fb: jax.block_until_ready(fb(x, k, cot))
            results[impl] = (f(x, k), fb(x, k, cot))
        fns["matmul"] = lambda: jax.block_until_ready(dot(a, b))
        fns["square"] = lambda: jax.block_until_ready(sq_dot(sq_a, sq_a))
        if args.torch:
            fns["torch_F"], fns["torch_FB"] = torch_fns(xs, ks, strides, padding)
        for fn in fns.values():  # compile and warm up
            fn()
        for name, t in interleaved(fns, args.repeats).items():
            best[(i, name)] = t
        ref, ours = results["xla"], results["ours"]
        rel = max(float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(q)))
                  for p, q in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)))
        row = {"x": list(xs), "kernel": list(ks[:3]), "cin": ks[3], "cout": ks[4],
               "stride": list(strides), "count": count, "gflop_fwd": round(flops / 1e9, 3),
               "max_rel_diff": rel}
        rows.append(row)
        row["square_gflops"] = round(2 * n_sq**3 / best[(i, "square")] / 1e9, 1)
        for name in ("xla_F", "ours_F", "xla_FB", "ours_FB", "matmul", "torch_F", "torch_FB"):
            if (i, name) not in best:
                continue
            t = best[(i, name)]
            mult = 3 if name.endswith("FB") else 1
            row[f"{name}_gflops"] = round(mult * flops / t / 1e9, 1)
            totals[name] += row["count"] * t
        print(f"{str(row['x']):22s} k{row['kernel']} s{row['stride']} {row['cin']:3d}->{row['cout']:3d}"
              f" x{row['count']}  " + "  ".join(
                  f"{n} {row.get(n + '_gflops', float('nan')):6.1f}"
                  for n in ("xla_F", "ours_F", "xla_FB", "ours_FB", "matmul", "square", "torch_F",
                            "torch_FB")
                  if n + "_gflops" in row), flush=True)
        del x, k, cot, a, b, fns, results

    square_gflops = max(r["square_gflops"] for r in rows)  # the machine's best moment
    # The target layer: the 3x3x3 stride-1 conv with the most FLOPs at 32 -> 32 channels.
    target = max((r for r in rows if r["kernel"] == [3, 3, 3] and r["stride"] == [1, 1, 1]
                  and r["cin"] == 32 and r["cout"] == 32), key=lambda r: r["gflop_fwd"], default=None)
    out = {
        "benchmark": "conv3d",
        "device": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2), "jax": jax.__version__,
        "huge_pages": huge_pages_on(),
        "model": "PlainConvUNet default (6 stages, 32-320)",
        "input_bzyxc": [args.batch, *args.crop, 2], "repeats": args.repeats,
        "square_matmul_gflops": round(square_gflops, 1),
        "network_xla_F_s": round(totals["xla_F"], 3), "network_ours_F_s": round(totals["ours_F"], 3),
        "network_xla_FB_s": round(totals["xla_FB"], 3),
        "network_ours_FB_s": round(totals["ours_FB"], 3),
        "network_speedup_F": round(totals["xla_F"] / totals["ours_F"], 2),
        "network_speedup_FB": round(totals["xla_FB"] / totals["ours_FB"], 2),
        "max_rel_diff": max(r["max_rel_diff"] for r in rows),
    }
    if args.torch:
        out["network_torch_F_s"] = round(totals["torch_F"], 3)
        out["network_torch_FB_s"] = round(totals["torch_FB"], 3)
    if target is not None:
        out["target_layer"] = {k: target[k] for k in ("x", "cin", "cout", "gflop_fwd")}
        for name in ("xla_F", "ours_F", "xla_FB", "ours_FB", "matmul", "torch_F", "torch_FB"):
            if name + "_gflops" in target:
                out[f"target_{name}_gflops"] = target[name + "_gflops"]
        out["target_square_gflops"] = target["square_gflops"]  # measured in turns with it
        out["target_ours_FB_vs_square_matmul"] = round(
            target["ours_FB_gflops"] / target["square_gflops"], 3)
        out["target_ours_FB_vs_gemm"] = round(target["ours_FB_gflops"] / target["matmul_gflops"], 3)
    out["layers"] = rows
    print(json.dumps(out))


if __name__ == "__main__":
    main()
