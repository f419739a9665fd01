"""Block masks and imputation for masked-autoencoder pretraining (method.md).

A mask is 1 where a voxel is hidden from the network. Blocks tile the patch from its
origin; when a side is not a multiple of the block, the last block along that side
is cut short (the grid is ceil(side / block) blocks and the upsampled mask is cropped),
so every voxel belongs to exactly one block and partial blocks are masked with the
same probability as whole ones.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def block_mask(key: jax.Array, shape: Sequence[int], block: Sequence[int] = (12, 16, 16),
               ratio: float = 0.5, per_channel: bool = True) -> jax.Array:
    """Random block mask of `shape` = (B, Z, Y, X, C); 1.0 = masked voxel.

    Each block is masked with probability `ratio`, independently per channel when
    `per_channel` (the paper's default: PET and CT see different masks) or shared
    across channels otherwise. Constant inside a block.
    """
    b, z, y, x, c = shape
    grid = tuple(-(-side // blk) for side, blk in zip((z, y, x), block))
    draw_channels = c if per_channel else 1
    blocks = jax.random.bernoulli(key, ratio, (b, *grid, draw_channels)).astype(jnp.float32)
    for axis, blk in zip((1, 2, 3), block):
        blocks = jnp.repeat(blocks, blk, axis=axis)
    blocks = blocks[:, :z, :y, :x, :]
    return jnp.broadcast_to(blocks, (b, z, y, x, c))


def impute(x: jax.Array, mask: jax.Array, token: jax.Array | None = None) -> jax.Array:
    """Hide masked voxels: zero (= the mean after z-scoring) or a learnable per-channel token."""
    visible = x * (1.0 - mask)
    if token is None:
        return visible
    return visible + mask * token.astype(x.dtype)


class MaskToken(nnx.Module):
    """One learnable value per channel filling masked voxels: the ablation the paper argues against."""

    def __init__(self, channels: int):
        self.value = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return impute(x, mask, self.value[...])
