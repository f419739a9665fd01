"""nnU-Net's PlainConvUNet (dynamic_network_architectures) in Flax NNX, channels-last.

Same structure, arguments, initialisation and numbers as the PyTorch class, so weights move
both ways with `petct_jax.convert`. The defaults are the paper's network: 6 stages,
widths 32-64-128-256-320-320, 3x3x3 kernels, strides 1,2,2,2,2,2, two convs per stage in
encoder and decoder, conv bias, InstanceNorm (eps 1e-5, affine), LeakyReLU 0.01, He init
(a = 1e-2), no deep supervision: 31.2M parameters with 2 inputs (PET, CT) and 2 outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from petct_jax.models.layers import (
    Conv3d,
    ConvTranspose3d,
    StackedConvBlocks,
    call_stage,
    check_divisible,
    check_remat,
    stage_ints,
    stage_triples,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The network of the paper's reference code (nnU-Net v2 3d_fullres-like, MAE on 96x128x128).
    "paper": dict(input_channels=2, n_stages=6, features_per_stage=(32, 64, 128, 256, 320, 320),
                  kernel_sizes=3, strides=(1, 2, 2, 2, 2, 2), n_conv_per_stage=2, num_classes=2,
                  n_conv_per_stage_decoder=2, conv_bias=True, deep_supervision=False),
}


class UNetDecoder(nnx.Module):
    """nnU-Net's UNetDecoder: per stage, from the bottleneck up, a transposed conv (kernel =
    stride) to the skip's width, concatenation [upsampled, skip], `n_conv` ConvNormAct, and a
    1x1x1 segmentation layer (all built even without deep supervision, as in torch)."""

    def __init__(self, *, encoder_channels: Sequence[int], encoder_strides: Sequence[Sequence[int]],
                 encoder_kernel_sizes: Sequence[Sequence[int]], num_classes: int,
                 n_conv_per_stage: Sequence[int], deep_supervision: bool, conv_bias: bool,
                 nonlin_first: bool = False, norm_eps: float = 1e-5, negative_slope: float = 1e-2,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        n = len(encoder_channels)
        self.deep_supervision = deep_supervision
        common = dict(dtype=dtype, param_dtype=param_dtype, negative_slope=negative_slope)
        transpconvs, stages = [], []
        for s in range(1, n):
            below, skip = encoder_channels[-s], encoder_channels[-(s + 1)]
            stride = encoder_strides[-s]
            transpconvs.append(ConvTranspose3d(below, skip, stride, stride, use_bias=conv_bias,
                                               rngs=rngs, **common))
            stages.append(StackedConvBlocks(
                n_conv_per_stage[s - 1], 2 * skip, skip, encoder_kernel_sizes[-(s + 1)], 1,
                use_bias=conv_bias, nonlin_first=nonlin_first, norm_eps=norm_eps, rngs=rngs,
                **common))
        self.transpconvs = nnx.List(transpconvs)
        self.stages = nnx.List(stages)
        self.seg_layers = make_seg_layers(encoder_channels, num_classes, rngs=rngs, **common)

    def __call__(self, skips: Sequence[jax.Array], remat: str | None = None) -> list[jax.Array]:
        """Decoder features of every stage, lowest resolution first."""
        x = skips[-1]
        out = []
        for s in range(len(self.stages)):
            x = call_stage(remat, _decoder_stage, self.transpconvs[s], self.stages[s], x,
                           skips[-(s + 2)])
            out.append(x)
        return out

    def segment(self, features: Sequence[jax.Array]) -> jax.Array | list[jax.Array]:
        """Segmentation logits (float32) from `__call__`'s features: the full-resolution output,
        or with deep supervision all of them, highest resolution first (like torch)."""
        if not self.deep_supervision:
            return self.seg_layers[-1](features[-1]).astype(jnp.float32)
        return [self.seg_layers[s](f).astype(jnp.float32) for s, f in enumerate(features)][::-1]


def _decoder_stage(transpconv: ConvTranspose3d, stage: StackedConvBlocks, x: jax.Array,
                   skip: jax.Array) -> jax.Array:
    return stage(jnp.concatenate([transpconv(x), skip.astype(x.dtype)], axis=-1))


def make_seg_layers(encoder_channels: Sequence[int], num_classes: int, *, rngs: nnx.Rngs,
                    **common: Any) -> nnx.List:
    """One 1x1x1 conv (with bias) per decoder stage, lowest resolution first."""
    n = len(encoder_channels)
    return nnx.List([Conv3d(encoder_channels[-(s + 1)], num_classes, 1, use_bias=True, rngs=rngs,
                            **common) for s in range(1, n)])


class UNetBase(nnx.Module):
    """What PlainConvUNet and ResidualEncoderUNet share: the common model interface over an
    `encoder` (returning the skips) and a `UNetDecoder`. Subclasses set `encoder`, `decoder`,
    `remat`, `dtype`, `_config` (constructor arguments as a tuple of pairs, hashable) and
    `_common` (dtype/param_dtype/negative_slope for rebuilding the head)."""

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this network (without dtype/remat/rngs)."""
        return dict(self._config)

    @property
    def head(self) -> nnx.List:
        """The output head: `decoder.seg_layers` (one 1x1x1 conv per decoder stage)."""
        return self.decoder.seg_layers

    def reinit_head(self, rngs: nnx.Rngs, out_channels: int | None = None) -> None:
        """Fresh He-initialised segmentation layers (optionally with a new class count)."""
        cfg = self.config
        if out_channels is not None:
            cfg["num_classes"] = int(out_channels)
            self._config = tuple(cfg.items())
        self.decoder.seg_layers = make_seg_layers(cfg["features_per_stage"], cfg["num_classes"],
                                                  rngs=rngs, **dict(self._common))

    def _forward(self, x: jax.Array) -> tuple[list[jax.Array], list[jax.Array]]:
        check_divisible(x.shape[1:4], self.config["strides"], type(self).__name__)
        skips = self.encoder(x.astype(self.dtype), self.remat)
        return skips, self.decoder(skips, self.remat)

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array | list[jax.Array]:
        _, features = self._forward(x)
        return self.decoder.segment(features)

    def features(self, x: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
        """{"decoder": last decoder stage output (B,Z,Y,X,features_per_stage[0]),
        "bottleneck": last encoder stage output}, in the compute dtype."""
        skips, features = self._forward(x)
        return {"decoder": features[-1], "bottleneck": skips[-1]}

    def apply_head(self, decoder_features: jax.Array) -> jax.Array:
        """Full-resolution logits (float32) from `features(x)["decoder"]`."""
        return self.head[-1](decoder_features).astype(jnp.float32)


class PlainConvUNet(UNetBase):
    """nnU-Net's PlainConvUNet. Input (B, Z, Y, X, input_channels) -> float32 logits
    (B, Z, Y, X, num_classes), or with `deep_supervision` a list of them, highest resolution
    first. Spatial sizes must be divisible by the product of the strides.

    Arguments follow dynamic_network_architectures (per-stage values may be one int for all
    stages; kernel sizes and strides may be ints or (z, y, x) triples); norm/nonlin are fixed
    to nnU-Net's InstanceNorm + LeakyReLU (eps `norm_eps`, slope `negative_slope`).
    `dtype` is the compute dtype (bfloat16 for mixed precision), `param_dtype` that of the
    parameters, `remat` one of None, "stage", "stage_dots" (see `petct_jax.models.layers`).
    """

    def __init__(self, *, input_channels: int = 2, n_stages: int = 6,
                 features_per_stage: int | Sequence[int] = (32, 64, 128, 256, 320, 320),
                 kernel_sizes: int | Sequence[int | Sequence[int]] = 3,
                 strides: int | Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2, 2),
                 n_conv_per_stage: int | Sequence[int] = 2, num_classes: int = 2,
                 n_conv_per_stage_decoder: int | Sequence[int] = 2, conv_bias: bool = True,
                 deep_supervision: bool = False, nonlin_first: bool = False,
                 norm_eps: float = 1e-5, negative_slope: float = 1e-2,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 remat: str | None = None, rngs: nnx.Rngs):
        features = stage_ints(features_per_stage, n_stages, "features_per_stage")
        kernels = stage_triples(kernel_sizes, n_stages, "kernel_sizes")
        strides_ = stage_triples(strides, n_stages, "strides")
        n_conv = stage_ints(n_conv_per_stage, n_stages, "n_conv_per_stage")
        n_conv_dec = stage_ints(n_conv_per_stage_decoder, n_stages - 1, "n_conv_per_stage_decoder")
        self.remat = check_remat(remat)
        self.dtype = dtype
        # Constructor arguments, normalised (tuples keep the module's graph hashable).
        self._config = (
            ("input_channels", int(input_channels)), ("n_stages", int(n_stages)),
            ("features_per_stage", features), ("kernel_sizes", kernels), ("strides", strides_),
            ("n_conv_per_stage", n_conv), ("num_classes", int(num_classes)),
            ("n_conv_per_stage_decoder", n_conv_dec), ("conv_bias", bool(conv_bias)),
            ("deep_supervision", bool(deep_supervision)), ("nonlin_first", bool(nonlin_first)),
            ("norm_eps", float(norm_eps)), ("negative_slope", float(negative_slope)))
        common = dict(dtype=dtype, param_dtype=param_dtype, negative_slope=negative_slope)
        self.encoder = PlainConvEncoder(
            input_channels=input_channels, features=features, kernels=kernels, strides=strides_,
            n_conv=n_conv, conv_bias=conv_bias, nonlin_first=nonlin_first, norm_eps=norm_eps,
            rngs=rngs, **common)
        self.decoder = UNetDecoder(
            encoder_channels=features, encoder_strides=strides_, encoder_kernel_sizes=kernels,
            num_classes=num_classes, n_conv_per_stage=n_conv_dec,
            deep_supervision=deep_supervision, conv_bias=conv_bias, nonlin_first=nonlin_first,
            norm_eps=norm_eps, rngs=rngs, **common)
        self._common = tuple(common.items())



class PlainConvEncoder(nnx.Module):
    """nnU-Net's PlainConvEncoder (pool='conv'): one StackedConvBlocks per stage, strided first
    conv; returns every stage's output (the skips; the last is the bottleneck)."""

    def __init__(self, *, input_channels: int, features: Sequence[int],
                 kernels: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_conv: Sequence[int], conv_bias: bool, nonlin_first: bool, norm_eps: float,
                 negative_slope: float, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        stages = []
        for s in range(len(features)):
            stages.append(StackedConvBlocks(
                n_conv[s], input_channels if s == 0 else features[s - 1], features[s], kernels[s],
                strides[s], use_bias=conv_bias, nonlin_first=nonlin_first, norm_eps=norm_eps,
                negative_slope=negative_slope, dtype=dtype, param_dtype=param_dtype, rngs=rngs))
        self.stages = nnx.List(stages)

    def __call__(self, x: jax.Array, remat: str | None = None) -> list[jax.Array]:
        skips = []
        for stage in self.stages:
            x = call_stage(remat, _apply, stage, x)
            skips.append(x)
        return skips


def _apply(module: nnx.Module, x: jax.Array) -> jax.Array:
    return module(x)
