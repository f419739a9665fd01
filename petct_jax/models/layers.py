"""Layers shared by the CNN backbones, with the semantics of nnU-Net's PyTorch building blocks.

Everything is channels-last, (batch, z, y, x, channels). Each layer matches its
`dynamic_network_architectures` / PyTorch counterpart number for number (padding, eps,
initialisation), so weights move between the two sides by a transpose (see
`petct_jax.convert.nnunet`).

Parameter layouts (torch -> here):
  - `Conv3d.kernel` (kD, kH, kW, I, O)  = torch weight (O, I, kD, kH, kW).transpose(2, 3, 4, 1, 0)
  - `ConvTranspose3d.kernel` (kD, kH, kW, I, O)
        = torch weight (I, O, kD, kH, kW).transpose(2, 3, 4, 0, 1)
    (not flipped: output voxel `stride * i + a` receives `x[i] @ kernel[a]`, as in torch)
  - `InstanceNorm.scale` / `.bias` = torch `weight` / `bias`

Mixed precision: `dtype` is the compute dtype (float32 or bfloat16); parameters live in
`param_dtype` and are cast on use; normalisation statistics are always computed in float32.

Rematerialisation (`remat` option of the models, applied per encoder/decoder stage by
`call_stage`):
  - None:         store every activation (fastest, most memory).
  - "stage":      `jax.checkpoint` around each stage, saving nothing inside it: only stage
                  inputs/outputs stay alive, everything else is recomputed in the backward pass.
  - "stage_dots": checkpoint each stage but keep the outputs of convolutions (tagged
                  `CONV_OUT`) and of matmuls without batch dimensions (transposed convs,
                  attention projections); only norms, activations and adds are recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from petct_jax.errors import PetctError
from petct_jax.models.conv_cpu import conv3d
from petct_jax.models.instance_norm import instance_norm_act

# Name given to convolution outputs so remat policies can choose to keep them.
CONV_OUT = "conv_out"

REMAT_OPTIONS = (None, "stage", "stage_dots")

_DIMENSIONS = ("NDHWC", "DHWIO", "NDHWC")


def triple(value: int | Sequence[int], what: str = "value") -> tuple[int, int, int]:
    """An int or a 3-sequence as a tuple of 3 ints, in (z, y, x) order."""
    if isinstance(value, int):
        return (value, value, value)
    out = tuple(int(v) for v in value)
    if len(out) != 3:
        raise PetctError(f"{what} must be an int or 3 ints (z, y, x), got {value!r}")
    return out  # type: ignore[return-value]


def per_stage(value: Any, n: int, what: str) -> list[Any]:
    """nnU-Net's convention: a scalar applies to all `n` stages, else one entry per stage."""
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    if len(value) != n:
        raise PetctError(f"{what} needs {n} entries (one per stage), got {len(value)}: {value!r}")
    return value


def stage_ints(value: int | Sequence[int], n: int, what: str) -> tuple[int, ...]:
    return tuple(int(v) for v in per_stage(value, n, what))


def stage_triples(value: Any, n: int, what: str) -> tuple[tuple[int, int, int], ...]:
    """Per-stage kernel sizes or strides, each as a (z, y, x) triple."""
    return tuple(triple(v, what) for v in per_stage(value, n, what))


def he_normal(key: jax.Array, shape: Sequence[int], fan_in: int, dtype: Any,
              negative_slope: float = 1e-2) -> jax.Array:
    """torch.nn.init.kaiming_normal_(w, a=negative_slope) (mode fan_in, leaky_relu gain).

    nnU-Net's InitWeights_He(1e-2): normal (not truncated), std = sqrt(2 / (1 + a^2) / fan_in),
    where torch takes fan_in from weight dim 1 times the receptive field, i.e. in_channels * k^3
    for Conv3d but out_channels * k^3 for ConvTranspose3d.
    """
    std = math.sqrt(2.0 / (1.0 + negative_slope**2)) / math.sqrt(fan_in)
    # Draw a power-of-two count and slice: XLA compiles the random generator once per
    # distinct size (~0.3 s each on CPU), so this keeps it to a dozen sizes across all models.
    n = math.prod(shape)
    draw = jax.random.normal(key, (1 << max(n - 1, 1).bit_length(),), jnp.float32)
    return (std * draw[:n]).reshape(tuple(shape)).astype(dtype)


class Conv3d(nnx.Module):
    """torch.nn.Conv3d with padding (k - 1) // 2 on each side (nnU-Net's "same" padding).

    Explicit padding, never 'SAME': XLA's 'SAME' with stride 2 pads (0, 1) where torch pads (1, 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, *, use_bias: bool = True,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 negative_slope: float = 1e-2, rngs: nnx.Rngs):
        k = triple(kernel_size, "kernel_size")
        self.kernel_size = k
        self.stride = triple(stride, "stride")
        self.padding = tuple(((ki - 1) // 2, (ki - 1) // 2) for ki in k)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dtype = dtype
        self.kernel = nnx.Param(he_normal(rngs.params(), (*k, in_channels, out_channels),
                                          in_channels * math.prod(k), param_dtype, negative_slope))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        # lax.conv_general_dilated on GPU/TPU; on CPU the same numbers from 2D convolutions and
        # matmuls, which XLA:CPU runs several times faster (petct_jax/models/conv_cpu.py).
        y = conv3d(x.astype(self.dtype), self.kernel[...].astype(self.dtype), self.stride,
                   self.padding)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return checkpoint_name(y, CONV_OUT)


class ConvTranspose3d(nnx.Module):
    """torch.nn.ConvTranspose3d(padding=0, output_padding=0).

    When kernel == stride (every nnU-Net decoder) the output blocks do not overlap, so the layer
    is one dense matmul (B*Z*Y*X, I) @ (I, kD*kH*kW*O) followed by a depth-to-space reshape.
    XLA lowers a transposed convolution to a convolution over an input dilated with zeros,
    which for 3D is many times slower on CPU and GPU (jax#31662, jax#8537); the matmul form is
    exact and runs at GEMM speed. Other kernel/stride pairs fall back to the dilated form.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int], *, use_bias: bool = True,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 negative_slope: float = 1e-2, rngs: nnx.Rngs):
        k = triple(kernel_size, "kernel_size")
        self.kernel_size = k
        self.stride = triple(stride, "stride")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.dtype = dtype
        self.kernel = nnx.Param(he_normal(rngs.params(), (*k, in_channels, out_channels),
                                          out_channels * math.prod(k), param_dtype, negative_slope))
        self.bias = nnx.Param(jnp.zeros((out_channels,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.kernel_size == self.stride:
            y = depth_to_space_transpose(x, kernel)
        else:
            y = dilated_transpose(x, kernel, self.stride)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return checkpoint_name(y, CONV_OUT)


def depth_to_space_transpose(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Transposed conv with kernel == stride as matmul + depth-to-space; kernel (kD,kH,kW,I,O)."""
    b, d, h, w, c = x.shape
    kd, kh, kw, _, o = kernel.shape
    weight = jnp.transpose(kernel, (3, 0, 1, 2, 4)).reshape(c, kd * kh * kw * o)
    y = jnp.dot(x.reshape(b * d * h * w, c), weight)
    y = y.reshape(b, d, h, w, kd, kh, kw, o).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, d * kd, h * kh, w * kw, o)


def dilated_transpose(x: jax.Array, kernel: jax.Array, stride: Sequence[int]) -> jax.Array:
    """General torch ConvTranspose3d (padding 0): correlate the zero-dilated input with the
    spatially flipped kernel, padded by k - 1. Output size (n - 1) * s + k."""
    k = kernel.shape[:3]
    return jax.lax.conv_general_dilated(
        x, jnp.flip(kernel, axis=(0, 1, 2)), (1, 1, 1), [(ki - 1, ki - 1) for ki in k],
        lhs_dilation=tuple(stride), dimension_numbers=_DIMENSIONS)


class InstanceNorm(nnx.Module):
    """torch.nn.InstanceNorm3d(affine=True, track_running_stats=False): per sample and channel
    over (z, y, x), biased variance, eps inside the square root. Statistics in float32;
    called with `negative_slope`, fused with the LeakyReLU after it (`act_first`: before it),
    see `instance_norm.py` for why."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, zero_init: bool = False,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param((jnp.zeros if zero_init else jnp.ones)((num_features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))

    def __call__(self, x: jax.Array, negative_slope: float | None = None,
                 act_first: bool = False) -> jax.Array:
        y = instance_norm_act(x, self.scale[...], self.bias[...], eps=self.eps,
                              negative_slope=negative_slope, act_first=act_first)
        return y.astype(self.dtype)


class ConvNormAct(nnx.Module):
    """nnU-Net's ConvDropoutNormReLU without dropout: conv -> norm -> LeakyReLU
    (conv -> LeakyReLU -> norm with `nonlin_first`; no activation with `act=False`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | Sequence[int],
                 stride: int | Sequence[int] = 1, *, use_bias: bool = True, act: bool = True,
                 nonlin_first: bool = False, zero_init_norm: bool = False, norm_eps: float = 1e-5,
                 negative_slope: float = 1e-2, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.conv = Conv3d(in_channels, out_channels, kernel_size, stride, use_bias=use_bias,
                           dtype=dtype, param_dtype=param_dtype, negative_slope=negative_slope,
                           rngs=rngs)
        self.norm = InstanceNorm(out_channels, eps=norm_eps, zero_init=zero_init_norm, dtype=dtype,
                                 param_dtype=param_dtype)
        self.act = act
        self.nonlin_first = nonlin_first
        self.negative_slope = negative_slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.conv(x), self.negative_slope if self.act else None,
                         act_first=self.nonlin_first)


class StackedConvBlocks(nnx.Module):
    """nnU-Net's StackedConvBlocks: `num_convs` ConvNormAct, the first one strided."""

    def __init__(self, num_convs: int, in_channels: int, out_channels: int,
                 kernel_size: int | Sequence[int], initial_stride: int | Sequence[int], *,
                 use_bias: bool, nonlin_first: bool = False, norm_eps: float = 1e-5,
                 negative_slope: float = 1e-2, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        if num_convs < 1:
            raise PetctError(f"a stage needs at least one convolution, got {num_convs}")
        self.convs = nnx.List([
            ConvNormAct(in_channels if i == 0 else out_channels, out_channels, kernel_size,
                        initial_stride if i == 0 else 1, use_bias=use_bias,
                        nonlin_first=nonlin_first, norm_eps=norm_eps,
                        negative_slope=negative_slope, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs)
            for i in range(num_convs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = conv(x)
        return x


def leaky_relu(x: jax.Array, negative_slope: float = 1e-2) -> jax.Array:
    return jnp.where(x >= 0, x, negative_slope * x)


def avg_pool(x: jax.Array, stride: Sequence[int]) -> jax.Array:
    """torch AvgPool3d(kernel=stride, stride=stride) on sizes divisible by the stride."""
    b, d, h, w, c = x.shape
    sd, sh, sw = stride
    y = x.reshape(b, d // sd, sd, h // sh, sh, w // sw, sw, c)
    return jnp.mean(y, axis=(2, 4, 6)).astype(x.dtype)


def check_remat(remat: str | None) -> str | None:
    if remat not in REMAT_OPTIONS:
        raise PetctError(f"remat must be one of {REMAT_OPTIONS}, got {remat!r}")
    return remat


def remat_policy(remat: str | None) -> Callable[..., bool] | None:
    """The jax.checkpoint policy for a `remat` option (None for "stage": save nothing)."""
    if remat == "stage_dots":
        return jax.checkpoint_policies.save_from_both_policies(
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
            jax.checkpoint_policies.save_only_these_names(CONV_OUT))
    return None


def call_stage(remat: str | None, fn: Callable[..., jax.Array], *args: Any) -> jax.Array:
    """`fn(*args)`, rematerialised according to `remat` (modules may be among the args)."""
    if remat is None:
        return fn(*args)
    return nnx.remat(fn, policy=remat_policy(remat))(*args)


def check_divisible(shape: Sequence[int], strides: Sequence[Sequence[int]], name: str) -> None:
    """nnU-Net networks need spatial sizes divisible by the product of the strides (the skip
    connections must line up); torch fails deep inside with a size mismatch, we say why."""
    total = [math.prod(s[i] for s in strides) for i in range(3)]
    if any(n % t for n, t in zip(shape, total, strict=True)):
        raise PetctError(
            f"{name}: input spatial shape {tuple(shape)} (z, y, x) must be divisible by "
            f"{tuple(total)}, the product of the strides")
