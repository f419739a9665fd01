"""Backbones from a config's `model` group: registry name, preset, channels, precision.

The torch twins name their channel arguments differently (nnU-Net: `input_channels`,
`num_classes`; MONAI: `in_channels`, `out_channels`); configs only say how many
channels go in and out, and this module speaks each constructor's language.
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from petct_jax.models import registry

_CHANNEL_ARGS = {
    "plain_unet": ("input_channels", "num_classes"),
    "resenc_unet": ("input_channels", "num_classes"),
    "swin_unetr": ("in_channels", "out_channels"),
}


def channel_kwargs(name: str, in_channels: int, out_channels: int) -> dict:
    cin, cout = _CHANNEL_ARGS[name]
    return {cin: in_channels, cout: out_channels}


def build_backbone(model_cfg: ml_collections.ConfigDict, in_channels: int, out_channels: int,
                   rngs: nnx.Rngs) -> nnx.Module:
    overrides = dict(model_cfg.overrides.to_dict() if hasattr(model_cfg.overrides, "to_dict")
                     else model_cfg.overrides)
    overrides.update(channel_kwargs(model_cfg.name, in_channels, out_channels))
    overrides["dtype"] = model_cfg.dtype
    overrides["remat"] = model_cfg.remat or None
    return registry.build(model_cfg.name, model_cfg.preset or None, rngs=rngs, **overrides)
