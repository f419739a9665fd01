"""3D convolutions that run fast on XLA:CPU, with exactly the numbers of `lax.conv_general_dilated`.

Why: XLA:CPU lowers a 3D convolution to Eigen's generic cuboid convolution, and its gradients
(a kernel-gradient convolution with batch and feature swapped, transposes around it) are
slower still, while 2D convolutions go to well-tuned kernels (Eigen's spatial convolution, or
YNNPACK). Measured on a 2-core AMD EPYC (Zen 4), 3x3x3 32->32 at 2x32x64x64: XLA's 3D
convolution ~18 / 21 GFLOP/s (forward / forward+backward), the decomposition below ~150 /
~110 GFLOP/s with Eigen's 2D convolution (benchmarks/conv3d.py has every layer of the UNet).

The decomposition (`conv3d` with `impl="cpu"`):

- 1x1x1 kernels: a strided slice and one `jnp.dot` over the channels.
- Few input channels (KD x C <= FOLD_MAX_CHANNELS, depth stride 1: the PET/CT stem): the depth
  taps folded into the channels, one 2D convolution over KD depth-shifted copies of the input.
- Otherwise, per depth tap `kd`: one 2D convolution over (y, x) with the kernel slice `k[kd]`,
  with depth folded into the batch axis, (B*D, H, W, C). For depth stride 1 the 2D conv runs on
  the unpadded input and its *output* is shifted in depth by `kd - pad` (zero rows where the
  tap falls into the padding) and summed: no copy of the input, one fused add. For depth
  stride > 1 the tap's input slices `d * stride + kd - pad` are taken with a strided slice.
  Taps that only ever see padding are skipped.

Gradients are plain JAX autodiff of that forward: the transposes of 2D convolutions are again
2D convolutions, of `dot` are dots and of slices/pads are pads/slices. Hand-written backward
passes were measured and were not faster: the kernel gradient as one 2D convolution with the
depth taps folded into its batch or output channels, as im2col + one matmul, or as KH*KW
matmuls over row-shifted views of the flattened padded input (fast alone, but XLA copies
every shifted view and runs the nine products concurrently, 1.2-2.5x slower in context).
The kernel gradient's GEMMs run at the forward's rate; two thirds of its time is Eigen packing
its image-sized patches, and every formulation that writes them out first costs more (RESULTS.md).

Materialized operands (`materialize`): the input of every convolution, and a depth-tap sum, are
written to memory once and read from there. XLA:CPU otherwise fuses the elementwise work that
produced them (the tap sum, bias, instance norm, LeakyReLU) into each consumer, and two kinds of
consumer make that very expensive: the transposing copy that puts a convolution's input into
(C, H, W, N) order for its kernel gradient, which then walks the 3-4 full-size arrays it
recomputes from in transposed order (one 32-channel full-resolution layer: 305 ms against 10 ms
to write the activation and 19 ms to transpose it), and the reductions of the norm's backward
pass, which re-read the tap outputs. Measured on the paper's UNet (2 x 32x64x64, one MAE step,
2-core Zen 3): 5.8 -> 4.8 s (input only), 6.6 -> 5.4 s (input and tap sums; same run).

The 2D convolutions must run on XLA's Eigen kernels, not YNNPACK's (half the speed on these
shapes): the entry points set that flag on CPU runs before any backend starts (`petct_jax/cpu_process.py`).

Selection: `impl="auto"` (what `petct_jax.models.layers.Conv3d` uses) takes the fast path when
JAX's default backend is the CPU at trace time and keeps `lax.conv_general_dilated` elsewhere
(cuDNN on GPU and the TPU convolution emitters are already fast). `PETCT_CONV3D=xla|cpu|auto`
in the environment (read at trace time, so re-jit after changing it), or the `use_impl(...)`
context manager, overrides the choice. `stats["fast"]` counts traces that took the fast path.

Low precision: each 2D piece accumulates in float32 (`preferred_element_type`), the pieces are
summed in float32 and the result is cast to the input dtype once, as a single convolution does.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from jax import lax

IMPLS = ("auto", "cpu", "xla")

# Trace-time counters: how many convolutions took which path (tests read them).
stats = {"fast": 0, "xla": 0}

_override: list[str] = []


@contextlib.contextmanager
def use_impl(impl: str) -> Iterator[None]:
    """Force `impl` ("cpu", "xla" or "auto") for convolutions traced inside the block.

    JAX caches a function's trace by the function, not by this choice: a step lowered inside
    the block and jitted again after it would keep the block's convolutions (and the other
    way round). So where the block changes the choice, JAX's caches are cleared on entering
    and on leaving it (`jax.clear_caches`: functions compiled before are compiled again, and a
    function jitted inside the block and called after it is traced again on the path outside;
    `jax.jit(f).lower(...).compile()` inside the block gives an executable that keeps it)."""
    if impl not in IMPLS:
        raise ValueError(f"conv3d impl must be one of {IMPLS}, got {impl!r}")
    before = resolve_impl()
    _override.append(impl)
    changed = resolve_impl() != before
    if changed:
        jax.clear_caches()
    try:
        yield
    finally:
        _override.pop()
        if changed:
            jax.clear_caches()


def resolve_impl(impl: str = "auto") -> str:
    """"cpu" or "xla": the override, then `impl`, then $PETCT_CONV3D, then the default backend."""
    if _override:
        impl = _override[-1]
    if impl == "auto":
        impl = os.environ.get("PETCT_CONV3D", "auto").lower() or "auto"
    if impl not in IMPLS:
        raise ValueError(f"conv3d impl must be one of {IMPLS}, got {impl!r} (PETCT_CONV3D?)")
    if impl == "auto":
        impl = "cpu" if jax.default_backend() == "cpu" else "xla"
    return impl


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1, 1),
           padding: Sequence[tuple[int, int]] = ((0, 0), (0, 0), (0, 0)), *,
           impl: str = "auto") -> jax.Array:
    """`lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NDHWC",
    "DHWIO", "NDHWC"))`: x (B, D, H, W, C), kernel (KD, KH, KW, C, O), explicit padding pairs."""
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    if x.ndim != 5 or kernel.ndim != 5 or len(strides) != 3 or len(padding) != 3:
        raise ValueError(f"conv3d: x {x.shape}, kernel {kernel.shape}, strides {strides}, "
                         f"padding {padding}: want 5D NDHWC / DHWIO and 3 strides / pad pairs")
    if resolve_impl(impl) == "xla":
        stats["xla"] += 1
        return lax.conv_general_dilated(x, kernel, strides, padding,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    stats["fast"] += 1
    return conv3d_cpu(x, kernel, strides, padding)


def out_size(n: int, k: int, s: int, pad: tuple[int, int]) -> int:
    return (n + pad[0] + pad[1] - k) // s + 1


def conv3d_cpu(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
               padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """The decomposition described in the module docstring (no backend check)."""
    dtype = jnp.result_type(x.dtype, kernel.dtype)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    kd_, kh_, kw_, c, o = kernel.shape
    if x.shape[-1] != c:
        raise ValueError(f"conv3d: input has {x.shape[-1]} channels, kernel expects {c}")
    acc = _acc_dtype(dtype)
    x = materialize(x)
    if (kd_, kh_, kw_) == (1, 1, 1):
        y = _pointwise(x, kernel, strides, padding, acc)
    elif c * kd_ <= FOLD_MAX_CHANNELS and strides[0] == 1:
        y = _depth_folded(x, kernel, strides, padding, acc)
    else:
        y = _depth_taps(x, kernel, strides, padding, acc)
    return y.astype(dtype)


def materialize(x: jax.Array) -> jax.Array:
    """`x`, computed once into its own buffer: an op whose producers XLA cannot fuse into x's
    consumers (see the module docstring for why that matters on CPU).

    `lax.optimization_barrier` does not do this on XLA:CPU (it is expanded before fusion), a dot
    with the identity is rewritten into a transpose; a conditional is opaque to fusion. Both
    branches return x, so the data-dependent predicate (which XLA cannot fold) only decides which
    copy of the identity runs; gradients flow through it unchanged (and are materialized too).
    """
    if x.size == 0:
        return x
    return lax.cond(x.reshape(-1)[0] < jnp.inf, lambda v: v, lambda v: v * 1, x)


# Few input channels (the 2-channel PET/CT stem): a 2D convolution with C = 2 input channels
# leaves the GEMM underneath nearly empty, so the depth taps go into the channels instead
# (one 2D convolution with KD x C inputs over a depth-shifted copy of the input). Measured on
# the stem, 2 -> 32 at 2x32x64x64: 57 vs 25 GFLOP/s forward, 70 vs 27 forward+backward.
FOLD_MAX_CHANNELS = 12


def _depth_folded(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
                  padding: tuple[tuple[int, int], ...], acc) -> jax.Array:
    """Depth stride 1: the KD depth-shifted inputs side by side in the channels, one 2D conv."""
    kd_, kh_, kw_, c, o = kernel.shape
    xp = jnp.pad(x, ((0, 0), padding[0], (0, 0), (0, 0), (0, 0)))
    d_out = xp.shape[1] - kd_ + 1
    stacked = jnp.concatenate([xp[:, k:k + d_out] for k in range(kd_)], axis=-1)
    folded = jnp.transpose(kernel, (1, 2, 0, 3, 4)).reshape(kh_, kw_, kd_ * c, o)
    return _conv2d(stacked, folded, strides[1:], padding[1:], acc)


def _acc_dtype(dtype):
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _pointwise(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
               padding: tuple[tuple[int, int], ...], acc) -> jax.Array:
    """1x1x1 kernel: (padded, strided) input times the (C, O) weight."""
    if any(p != (0, 0) for p in padding):
        x = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    if strides != (1, 1, 1):
        x = x[:, ::strides[0], ::strides[1], ::strides[2]]
    return jnp.dot(x, kernel.reshape(kernel.shape[-2:]), preferred_element_type=acc)


def _conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
            padding: tuple[tuple[int, int], ...], acc) -> jax.Array:
    """x (B, N, H, W, C) with N folded into the batch; kernel (KH, KW, C, O)."""
    b, n, h, w, c = x.shape
    y = lax.conv_general_dilated(x.reshape(b * n, h, w, c), kernel, strides, padding,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 preferred_element_type=acc)
    return y.reshape(b, n, *y.shape[1:])


def _depth_taps(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
                padding: tuple[tuple[int, int], ...], acc) -> jax.Array:
    """Sum over depth taps of 2D convolutions, depth folded into the batch."""
    d = x.shape[1]
    sd, pad_d = strides[0], padding[0]
    d_out = out_size(d, kernel.shape[0], sd, pad_d)
    total, taps = None, 0
    for kd in range(kernel.shape[0]):
        # Output rows whose input row i = j * sd + kd - pad_lo lies inside the volume.
        first = max(0, -(-(pad_d[0] - kd) // sd))
        last = min(d_out - 1, (d - 1 + pad_d[0] - kd) // sd)
        if last < first:
            continue  # this tap only sees padding
        i0 = first * sd + kd - pad_d[0]
        if sd == 1:
            # Convolve every input row and shift the output: no copy of the input.
            y = _conv2d(x, kernel[kd], strides[1:], padding[1:], acc)
            y = y[:, i0:i0 + last - first + 1]
        else:
            xs = lax.slice_in_dim(x, i0, i0 + (last - first) * sd + 1, sd, axis=1)
            y = _conv2d(xs, kernel[kd], strides[1:], padding[1:], acc)
        if first or last < d_out - 1:
            y = jnp.pad(y, ((0, 0), (first, d_out - 1 - last), (0, 0), (0, 0), (0, 0)))
        total = y if total is None else total + y
        taps += 1
    if taps > 1:
        total = materialize(total)
    if total is None:  # every tap in the padding: the output is zero
        shape = (x.shape[0], d_out,
                 *(out_size(n, k, s, p) for n, k, s, p in
                   zip(x.shape[2:4], kernel.shape[1:3], strides[1:], padding[1:])),
                 kernel.shape[-1])
        return jnp.zeros(shape, acc)
    return total


def conv_flops(x_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
               padding: Sequence[tuple[int, int]]) -> int:
    """Nominal multiply-add FLOPs (2 per MAC) of the forward convolution, padding included."""
    outs = [out_size(n, k, s, p) for n, k, s, p in
            zip(x_shape[1:4], kernel_shape[:3], strides, padding)]
    return 2 * x_shape[0] * math.prod(outs) * math.prod(kernel_shape)
