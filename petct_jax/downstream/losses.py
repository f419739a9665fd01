"""Segmentation losses: Dice + cross-entropy (MONAI's DiceCELoss), deep supervision, hard Dice.

`dice_ce_loss` with its defaults is MONAI's `DiceCELoss(softmax=True, to_onehot_y=True)`,
the reference's fine-tuning loss, restated:

- probabilities p = softmax(logits) over the class axis, one-hot targets g;
- soft Dice per (sample, class): 1 - (2 sum(p g) + 1e-5) / (sum(p) + sum(g) + 1e-5), sums
  over the voxels; averaged over samples and classes, background included;
- cross-entropy: the mean over all voxels of -log p[label];
- loss = dice_weight * Dice + ce_weight * CE.

`batch_dice=True` sums over the batch before the ratio (nnU-Net's batch Dice, MONAI's
`batch=True`): one Dice per class for the whole batch, which is less noisy on patches with
little or no foreground. `include_background=False` drops class 0 from the Dice term.

Deep supervision (nnU-Net): the outputs of the decoder stages, highest resolution first,
are weighted 1, 1/2, 1/4, ... with the lowest resolution weighted 0 and the weights
normalised to sum 1; each level's labels are the full-resolution labels downsampled by the
level's integer factor, by nearest neighbour (voxel i*f + f//2 of each block, torch's
"nearest-exact") or by max pooling ("max": a block is foreground if any voxel is).

Arrays are channels-last: logits (B, Z, Y, X, K), labels (B, Z, Y, X) integer classes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, dice_weight: float = 1.0,
                 ce_weight: float = 1.0, batch_dice: bool = False,
                 include_background: bool = True, smooth_nr: float = 1e-5,
                 smooth_dr: float = 1e-5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, {"dice_loss", "ce"}) for logits (B, ..., K) and integer labels (B, ...)."""
    logits = logits.astype(jnp.float32)
    k = logits.shape[-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    onehot = jax.nn.one_hot(labels.astype(jnp.int32), k, dtype=jnp.float32)
    ce = -jnp.mean(jnp.sum(onehot * logp, axis=-1))
    p = jnp.exp(logp)
    axes = tuple(range(0 if batch_dice else 1, logits.ndim - 1))  # voxels (and the batch)
    inter = jnp.sum(p * onehot, axis=axes)
    denom = jnp.sum(p, axis=axes) + jnp.sum(onehot, axis=axes)
    dice = 1.0 - (2.0 * inter + smooth_nr) / (denom + smooth_dr)  # (B, K) or (K,)
    if not include_background:
        dice = dice[..., 1:]
    dice = jnp.mean(dice)
    return dice_weight * dice + ce_weight * ce, {"dice_loss": dice, "ce": ce}


def deep_supervision_weights(n: int) -> list[float]:
    """nnU-Net's weights for n outputs (highest resolution first): 1/2^i, last 0, sum 1."""
    if n == 1:
        return [1.0]
    w = [0.5 ** i for i in range(n)]
    w[-1] = 0.0
    total = sum(w)
    return [x / total for x in w]


def downsample_labels(labels: jax.Array, factors: Sequence[int], mode: str = "nearest") -> jax.Array:
    """Labels (B, Z, Y, X) reduced by integer `factors` (z, y, x): "nearest" or "max"."""
    fz, fy, fx = (int(f) for f in factors)
    if (fz, fy, fx) == (1, 1, 1):
        return labels
    if mode == "nearest":
        return labels[:, fz // 2::fz, fy // 2::fy, fx // 2::fx]
    if mode == "max":
        b, z, y, x = labels.shape
        blocks = labels.reshape(b, z // fz, fz, y // fy, fy, x // fx, fx)
        return blocks.max(axis=(2, 4, 6))
    raise ValueError(f"loss.ds_label_mode={mode!r}: choose 'nearest' or 'max'")


def segmentation_loss(outputs: jax.Array | Sequence[jax.Array], labels: jax.Array, *,
                      ds_label_mode: str = "nearest", **dice_ce: float | bool
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Dice + CE on one output, or the deep-supervision weighted sum over a list of outputs
    (highest resolution first). Aux metrics (`dice_loss`, `ce`) are those of the
    full-resolution output."""
    outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
    weights = deep_supervision_weights(len(outputs))
    total, aux = 0.0, {}
    for i, (w, out) in enumerate(zip(weights, outputs)):
        if w == 0.0 and i > 0:
            continue
        factors = [a // b for a, b in zip(labels.shape[1:4], out.shape[1:4])]
        if any(a != b * f for a, b, f in zip(labels.shape[1:4], out.shape[1:4], factors)):
            raise ValueError(f"deep supervision: output {out.shape[1:4]} does not divide the "
                             f"label shape {labels.shape[1:4]}")
        loss, parts = dice_ce_loss(out, downsample_labels(labels, factors, ds_label_mode), **dice_ce)
        total = total + w * loss
        if i == 0:
            aux = parts
    return total, aux


def hard_dice(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Foreground Dice of argmax(logits) against labels > 0, pooled over the batch
    (2|P∩G| / (|P|+|G|); 0 when both are empty)."""
    pred = jnp.argmax(logits, axis=-1) > 0
    gt = labels > 0
    inter = jnp.sum(pred & gt).astype(jnp.float32)
    total = (jnp.sum(pred) + jnp.sum(gt)).astype(jnp.float32)
    return 2.0 * inter / jnp.maximum(total, 1.0)
