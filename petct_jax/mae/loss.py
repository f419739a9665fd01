"""The weighted global reconstruction loss of the paper (method.md)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reconstruction_loss(pred: jax.Array, target: jax.Array, mask: jax.Array,
                        visible_weight: float = 0.2) -> jax.Array:
    """MSE over masked voxels + `visible_weight` x MSE over visible voxels.

    Each term is a mean over its voxels with all channels and the batch pooled, as
    in the reference code. `visible_weight=0` gives the masked-only loss (nnssl).
    Computed in float32 whatever the prediction dtype.
    """
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    mask = mask.astype(jnp.float32)
    masked = jnp.sum(err * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if visible_weight == 0:
        return masked
    visible = 1.0 - mask
    return masked + visible_weight * jnp.sum(err * visible) / jnp.maximum(jnp.sum(visible), 1.0)
