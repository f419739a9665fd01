"""The pretraining network: imputation of masked voxels in front of a UNet backbone."""

from __future__ import annotations

import jax
from flax import nnx

from petct_jax.mae.masking import MaskToken, impute

IMPUTATIONS = ("zero", "token")


class MaskedAutoencoder(nnx.Module):
    """Backbone that reconstructs all channels from the masked input.

    `imputation="zero"` fills masked voxels with 0, the mean after z-scoring (the
    paper's choice); `"token"` fills them with a learnable value per channel.
    """

    def __init__(self, backbone: nnx.Module, channels: int, imputation: str = "zero"):
        if imputation not in IMPUTATIONS:
            raise ValueError(f"mae.imputation must be one of {IMPUTATIONS}, got {imputation!r}")
        self.backbone = backbone
        self.mask_token = MaskToken(channels) if imputation == "token" else None

    def __call__(self, x: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
        hidden = impute(x, mask) if self.mask_token is None else self.mask_token(x, mask)
        return self.backbone(hidden, deterministic=deterministic)
