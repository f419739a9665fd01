"""Transposed convolution: our matmul + depth-to-space form vs flax `nnx.ConvTranspose`.

One forward + backward step (gradient of mean(logits^2) w.r.t. all parameters) of the default
PlainConvUNet (the paper's 6-stage network), once with our decoder upsampling and once with the
same weights in `nnx.ConvTranspose` (which XLA lowers to a convolution over a zero-dilated
input); outputs, loss and the gradients of all shared parameters are compared. Then the five
upsampling layers alone at the same shapes (forward + gradients). Timings are the fastest of
`--repeats` runs taken in turns (the machine may be shared).

    python benchmarks/transposed_conv.py [--batch 1] [--shape 32 64 64] [--repeats 2]

Ends with one line holding one JSON object (`speedup` = flax time / our time for the model step).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from petct_jax.cpu_process import prepare_cpu_process
from petct_jax.models.layers import ConvTranspose3d
from petct_jax.models.plain_unet import PlainConvUNet


class FlaxTranspose(nnx.Module):
    """The same layer as `ours` through flax's nnx.ConvTranspose (transpose_kernel=False wants
    the kernel flipped on the spatial axes; 'VALID' with kernel = stride gives n * stride)."""

    def __init__(self, ours: ConvTranspose3d):
        self.conv = nnx.ConvTranspose(
            ours.in_channels, ours.out_channels, kernel_size=ours.kernel_size,
            strides=ours.stride, padding="VALID", use_bias=ours.bias is not None,
            rngs=nnx.Rngs(0))
        self.conv.kernel.set_value(jnp.flip(ours.kernel[...], axis=(0, 1, 2)))
        if ours.bias is not None:
            self.conv.bias.set_value(ours.bias[...])

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def step_fn(model: nnx.Module, wrt_input: bool = False):
    """jitted (params, x) -> (loss, grads) for mean(model(x)^2); grads w.r.t. the parameters
    (and the input with `wrt_input`, as inside a network)."""
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p: Any, x: jax.Array) -> jax.Array:
        return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x)))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1) if wrt_input else 0)), params


def forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, xx: nnx.merge(graphdef, s)(xx))(state, x)


def without_transpconvs(grads: Any) -> dict:
    """Gradients of the parameters both models share (the flax kernels are stored flipped)."""
    flat = nnx.to_flat_state(grads)
    return {path: v for path, v in flat if "transpconvs" not in path}


def compile_time(fn, *args) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, tuple], repeats: int) -> dict[str, float]:
    """Fastest of `repeats` steady-state runs of each fn, run in turns so that load from
    other processes on a shared machine hits all of them alike (min: the least disturbed)."""
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def rel_diff(a: Any, b: Any) -> float:
    """max |a - b| / max |a| over all leaves together (conv biases before an InstanceNorm
    have gradients that are 0 up to rounding, so per-leaf ratios would be noise)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    diff = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(leaves_a, leaves_b, strict=True))
    return diff / max(float(jnp.max(jnp.abs(x))) for x in leaves_a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 64, 64), metavar=("Z", "Y", "X"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    prepare_cpu_process(huge_pages=False)

    ours = PlainConvUNet(rngs=nnx.Rngs(0))
    flax_model = nnx.clone(ours)
    for i, layer in enumerate(ours.decoder.transpconvs):
        flax_model.decoder.transpconvs[i] = FlaxTranspose(layer)
    x = jax.random.normal(jax.random.key(1), (args.batch, *args.shape, 2), jnp.float32)

    step_ours, params_ours = step_fn(ours)
    step_flax, params_flax = step_fn(flax_model)
    compile_ours, (loss_ours, grads_ours) = compile_time(step_ours, params_ours, x)
    compile_flax, (loss_flax, grads_flax) = compile_time(step_flax, params_flax, x)
    out_diff = rel_diff(forward(ours, x), forward(flax_model, x))
    grad_diff = rel_diff(without_transpconvs(grads_ours), without_transpconvs(grads_flax))

    # The five upsampling layers alone, at their shapes in this step (forward + gradients
    # w.r.t. input and parameters).
    layer_fns, layer_diffs = {}, []
    for i, layer in enumerate(ours.decoder.transpconvs):
        # decoder.transpconvs[i] upsamples the output of encoder stage n - 1 - i
        strides = ours.config["strides"]
        factor = [math.prod(s[a] for s in strides[:len(strides) - i]) for a in range(3)]
        shape = (args.batch, *(n // f for n, f in zip(args.shape, factor, strict=True)),
                 layer.in_channels)
        xi = jax.random.normal(jax.random.key(2 + i), shape, jnp.float32)
        for name, module in (("ours", layer), ("flax", FlaxTranspose(layer))):
            fn, params = step_fn(module, wrt_input=True)
            layer_fns[f"{name}{i}"] = (fn, (params, xi))
        layer_diffs.append(rel_diff(forward(layer, xi), forward(FlaxTranspose(layer), xi)))
    for fn, fn_args in layer_fns.values():
        compile_time(fn, *fn_args)

    best = interleaved({"ours": (step_ours, (params_ours, x)),
                        "flax": (step_flax, (params_flax, x))}, args.repeats)
    t_ours, t_flax = best["ours"], best["flax"]
    layer_best = interleaved(layer_fns, max(args.repeats, 3))
    t_layers_ours = sum(v for k, v in layer_best.items() if k.startswith("ours"))
    t_layers_flax = sum(v for k, v in layer_best.items() if k.startswith("flax"))

    print(json.dumps({
        "benchmark": "transposed_conv",
        "device": jax.devices()[0].device_kind,
        "model": "PlainConvUNet default (6 stages, 32-320, 31.2M params)",
        "input_bzyxc": [args.batch, *args.shape, 2],
        "step": "forward+backward",
        "ours_s": round(t_ours, 3),
        "flax_convtranspose_s": round(t_flax, 3),
        "speedup": round(t_flax / t_ours, 3),
        "compile_ours_s": round(compile_ours, 2),
        "compile_flax_s": round(compile_flax, 2),
        "loss_rel_diff": float(abs(loss_ours - loss_flax) / abs(loss_flax)),
        "output_max_rel_diff": out_diff,
        "grad_max_rel_diff": grad_diff,
        "upsampling_layers_ours_s": round(t_layers_ours, 4),
        "upsampling_layers_flax_s": round(t_layers_flax, 4),
        "upsampling_layers_speedup": round(t_layers_flax / t_layers_ours, 2),
        "upsampling_layers_output_max_rel_diff": max(layer_diffs),
    }))


if __name__ == "__main__":
    main()
