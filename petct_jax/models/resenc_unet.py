"""nnU-Net's ResidualEncoderUNet ("ResEnc", dynamic_network_architectures) in Flax NNX.

Encoder: a stem (one ConvNormAct, no stride) then, per stage, `n_blocks_per_stage` BasicBlockD
(ResNet-D) blocks, the first one strided:
    out = LeakyReLU(norm(conv2(LeakyReLU(norm(conv1(x))))) + skip(x))
    skip = AvgPool(stride) then 1x1x1 conv (no bias) + norm, when stride and width change;
           AvgPool only when only the stride changes; identity otherwise.
conv2's norm starts at weight = bias = 0 (nnU-Net's init_last_bn_before_add_to_0), so every
block starts as its skip path. Decoder: the same UNetDecoder as PlainConvUNet, 1 conv per stage.

Presets (`PRESETS`, `RECOMMENDED`): nnU-Net's ResEnc M / L / XL planners share one topology
template (widths min(320, 32 * 2^i), blocks 1-3-4-6-6-6(-6), one decoder conv per stage, 3x3x3
kernels, conv bias) and differ only in the GPU-memory budget (8 / 24 / 40 GB) from which the
planner picks patch and batch size; the number of stages follows from the patch. The values
here are those nnU-Net's planner gives for AutoPET (spacing 3 x 2.04 x 2.04 mm, median shape
326 x 400 x 400, 2 input channels, 2 classes), re-derived with nnU-Net's planning rules:
M 128x128x128 / batch 2 / 6 stages; L 160x224x192 / batch 2 / 6 stages;
XL 192x256x256 / batch 2 / 7 stages (one more pooling in y and x only).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from petct_jax.errors import PetctError
from petct_jax.models.layers import (
    ConvNormAct,
    StackedConvBlocks,
    avg_pool,
    call_stage,
    check_remat,
    leaky_relu,
    stage_ints,
    stage_triples,
)
from petct_jax.models.plain_unet import UNetBase, UNetDecoder, _apply

_SIX = dict(n_stages=6, features_per_stage=(32, 64, 128, 256, 320, 320), kernel_sizes=3,
            strides=(1, 2, 2, 2, 2, 2), n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
            n_conv_per_stage_decoder=1, conv_bias=True)

PRESETS: dict[str, dict[str, Any]] = {
    "M": dict(_SIX),
    "L": dict(_SIX),
    "XL": dict(n_stages=7, features_per_stage=(32, 64, 128, 256, 320, 320, 320), kernel_sizes=3,
               strides=(1, 2, 2, 2, 2, 2, (1, 2, 2)), n_blocks_per_stage=(1, 3, 4, 6, 6, 6, 6),
               n_conv_per_stage_decoder=1, conv_bias=True),
}

# Training plan nnU-Net derives with each preset's memory budget (AutoPET-like data), (z, y, x).
RECOMMENDED: dict[str, dict[str, Any]] = {
    "M": dict(patch_size=(128, 128, 128), batch_size=2, gpu_memory_gb=8),
    "L": dict(patch_size=(160, 224, 192), batch_size=2, gpu_memory_gb=24),
    "XL": dict(patch_size=(192, 256, 256), batch_size=2, gpu_memory_gb=40),
}


class BasicBlockD(nnx.Module):
    """nnU-Net's BasicBlockD (no stochastic depth, no squeeze-excitation)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Sequence[int],
                 stride: Sequence[int], *, conv_bias: bool, norm_eps: float, negative_slope: float,
                 dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(norm_eps=norm_eps, negative_slope=negative_slope, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.stride = tuple(stride)
        self.negative_slope = negative_slope
        self.conv1 = ConvNormAct(in_channels, out_channels, kernel_size, stride,
                                 use_bias=conv_bias, **common)
        self.conv2 = ConvNormAct(out_channels, out_channels, kernel_size, 1, use_bias=conv_bias,
                                 act=False, zero_init_norm=True, **common)
        self.has_stride = any(s != 1 for s in stride)
        # torch: skip = Sequential([AvgPool]? + [ConvNorm 1x1x1, bias=False]?)
        self.skip = (ConvNormAct(in_channels, out_channels, 1, 1, use_bias=False, act=False,
                                 **common) if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = avg_pool(x, self.stride) if self.has_stride else x
        if self.skip is not None:
            residual = self.skip(residual)
        out = self.conv2(self.conv1(x)) + residual
        return leaky_relu(out, self.negative_slope)


class StackedResidualBlocks(nnx.Module):
    def __init__(self, n_blocks: int, in_channels: int, out_channels: int,
                 kernel_size: Sequence[int], initial_stride: Sequence[int], **kwargs: Any):
        if n_blocks < 1:
            raise PetctError(f"a stage needs at least one residual block, got {n_blocks}")
        self.blocks = nnx.List([
            BasicBlockD(in_channels if b == 0 else out_channels, out_channels, kernel_size,
                        initial_stride if b == 0 else (1, 1, 1), **kwargs)
            for b in range(n_blocks)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class ResidualEncoder(nnx.Module):
    def __init__(self, *, input_channels: int, features: Sequence[int],
                 kernels: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks: Sequence[int], stem_channels: int, conv_bias: bool, norm_eps: float,
                 negative_slope: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        common = dict(norm_eps=norm_eps, negative_slope=negative_slope, dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs)
        self.stem = StackedConvBlocks(1, input_channels, stem_channels, kernels[0], 1,
                                      use_bias=conv_bias, **common)
        stages, channels = [], stem_channels
        for s in range(len(features)):
            stages.append(StackedResidualBlocks(n_blocks[s], channels, features[s], kernels[s],
                                                strides[s], conv_bias=conv_bias, **common))
            channels = features[s]
        self.stages = nnx.List(stages)

    def __call__(self, x: jax.Array, remat: str | None = None) -> list[jax.Array]:
        x = call_stage(remat, _apply, self.stem, x)
        skips = []
        for stage in self.stages:
            x = call_stage(remat, _apply, stage, x)
            skips.append(x)
        return skips


class ResidualEncoderUNet(UNetBase):
    """nnU-Net's ResidualEncoderUNet with BasicBlockD. Input (B, Z, Y, X, input_channels) ->
    float32 logits (B, Z, Y, X, num_classes), or a list (highest resolution first) with
    `deep_supervision`. Defaults: the M/L topology (6 stages). Arguments as in
    dynamic_network_architectures; `dtype`, `param_dtype`, `remat` as in PlainConvUNet.
    """

    def __init__(self, *, input_channels: int = 2, n_stages: int = 6,
                 features_per_stage: int | Sequence[int] = (32, 64, 128, 256, 320, 320),
                 kernel_sizes: int | Sequence[int | Sequence[int]] = 3,
                 strides: int | Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2, 2),
                 n_blocks_per_stage: int | Sequence[int] = (1, 3, 4, 6, 6, 6),
                 num_classes: int = 2, n_conv_per_stage_decoder: int | Sequence[int] = 1,
                 conv_bias: bool = True, deep_supervision: bool = False,
                 stem_channels: int | None = None, norm_eps: float = 1e-5,
                 negative_slope: float = 1e-2, dtype: Any = jnp.float32,
                 param_dtype: Any = jnp.float32, remat: str | None = None, rngs: nnx.Rngs):
        features = stage_ints(features_per_stage, n_stages, "features_per_stage")
        kernels = stage_triples(kernel_sizes, n_stages, "kernel_sizes")
        strides_ = stage_triples(strides, n_stages, "strides")
        n_blocks = stage_ints(n_blocks_per_stage, n_stages, "n_blocks_per_stage")
        n_conv_dec = stage_ints(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
        stem = features[0] if stem_channels is None else int(stem_channels)
        self.remat = check_remat(remat)
        self.dtype = dtype
        self._config = (
            ("input_channels", int(input_channels)), ("n_stages", int(n_stages)),
            ("features_per_stage", features), ("kernel_sizes", kernels), ("strides", strides_),
            ("n_blocks_per_stage", n_blocks), ("num_classes", int(num_classes)),
            ("n_conv_per_stage_decoder", n_conv_dec), ("conv_bias", bool(conv_bias)),
            ("deep_supervision", bool(deep_supervision)),
            ("stem_channels", None if stem_channels is None else stem),
            ("norm_eps", float(norm_eps)), ("negative_slope", float(negative_slope)))
        common = dict(dtype=dtype, param_dtype=param_dtype, negative_slope=negative_slope)
        self.encoder = ResidualEncoder(
            input_channels=input_channels, features=features, kernels=kernels, strides=strides_,
            n_blocks=n_blocks, stem_channels=stem, conv_bias=conv_bias, norm_eps=norm_eps,
            rngs=rngs, **common)
        self.decoder = UNetDecoder(
            encoder_channels=features, encoder_strides=strides_, encoder_kernel_sizes=kernels,
            num_classes=num_classes, n_conv_per_stage=n_conv_dec,
            deep_supervision=deep_supervision, conv_bias=conv_bias, norm_eps=norm_eps,
            rngs=rngs, **common)
        self._common = tuple(common.items())
