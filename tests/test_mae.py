"""MAE block masks, imputation and the weighted reconstruction loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax import mae


def _block_values(mask, block):
    """(B, gz, gy, gx, C, voxels-per-block) view of a mask whose sides are block multiples."""
    b, z, y, x, c = mask.shape
    bz, by, bx = block
    m = mask.reshape(b, z // bz, bz, y // by, by, x // bx, bx, c)
    return m.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, z // bz, y // by, x // bx, c, -1)


def test_mask_is_constant_inside_blocks_and_binary():
    mask = np.asarray(mae.block_mask(jax.random.key(0), (2, 24, 32, 32, 2), (12, 16, 16), 0.5))
    assert set(np.unique(mask)) <= {0.0, 1.0}
    per_block = _block_values(mask, (12, 16, 16))
    assert (per_block.min(-1) == per_block.max(-1)).all()


def test_mask_ratio_matches_probability():
    shape = (64, 24, 32, 32, 2)  # 64 * 2*2*2 * 2 = 1024 independent blocks
    for ratio in (0.25, 0.5, 0.75):
        mask = np.asarray(mae.block_mask(jax.random.key(1), shape, (12, 16, 16), ratio))
        # Binomial(1024, ratio): 5 standard deviations is < 0.07.
        assert abs(mask.mean() - ratio) < 0.07, (ratio, mask.mean())


def test_channels_independent_by_default_and_shared_on_request():
    shape = (32, 24, 32, 32, 2)
    mask = np.asarray(mae.block_mask(jax.random.key(2), shape, (12, 16, 16), 0.5))
    pet, ct = mask[..., 0].ravel(), mask[..., 1].ravel()
    # Independent Bernoulli(0.5) blocks agree half the time; identical masks always.
    agreement = (pet == ct).mean()
    assert 0.4 < agreement < 0.6
    shared = np.asarray(mae.block_mask(jax.random.key(2), shape, (12, 16, 16), 0.5, per_channel=False))
    np.testing.assert_array_equal(shared[..., 0], shared[..., 1])


def test_partial_blocks_at_the_far_edge():
    # 30 = 12 + 12 + 6: the last block along z is 6 voxels and still constant.
    mask = np.asarray(mae.block_mask(jax.random.key(3), (4, 30, 20, 16, 1), (12, 16, 16), 0.5))
    assert mask.shape == (4, 30, 20, 16, 1)
    tail = mask[:, 24:30, 16:20, :, 0]
    assert (tail.min(axis=(1, 2, 3)) == tail.max(axis=(1, 2, 3))).all()
    # The cut block is its own block, not a copy of its neighbour in every batch element.
    assert (mask[:, 24, 0, 0, 0] != mask[:, 23, 0, 0, 0]).any() or (mask[:, 0, 16, 0, 0] != mask[:, 0, 15, 0, 0]).any()


def test_mask_is_reproducible_from_the_key():
    a = mae.block_mask(jax.random.key(7), (2, 24, 32, 32, 2))
    b = mae.block_mask(jax.random.key(7), (2, 24, 32, 32, 2))
    c = mae.block_mask(jax.random.key(8), (2, 24, 32, 32, 2))
    np.testing.assert_array_equal(a, b)
    assert (np.asarray(a) != np.asarray(c)).any()


def _numpy_loss(pred, target, mask, w):
    err = (pred.astype(np.float64) - target) ** 2
    masked = err[mask == 1].mean() if (mask == 1).any() else 0.0
    visible = err[mask == 0].mean() if (mask == 0).any() else 0.0
    return masked + w * visible


@pytest.mark.parametrize("w", [0.0, 0.2, 1.0])
def test_loss_equals_numpy_transcription(w):
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(2, 8, 8, 8, 2)).astype(np.float32)
    target = rng.normal(size=(2, 8, 8, 8, 2)).astype(np.float32)
    mask = np.asarray(mae.block_mask(jax.random.key(4), pred.shape, (4, 4, 4), 0.5))
    got = float(mae.reconstruction_loss(pred, target, mask, visible_weight=w))
    assert got == pytest.approx(_numpy_loss(pred, target, mask, w), rel=1e-5)


def test_loss_weights_masked_and_visible_errors_differently():
    target = np.zeros((1, 4, 4, 4, 2), np.float32)
    mask = np.zeros_like(target)
    mask[:, :2] = 1.0
    pred = np.zeros_like(target)
    pred[:, :2] = 1.0  # error 1 on masked voxels only
    assert float(mae.reconstruction_loss(pred, target, mask, 0.2)) == pytest.approx(1.0)
    pred = np.zeros_like(target)
    pred[:, 2:] = 1.0  # error 1 on visible voxels only
    assert float(mae.reconstruction_loss(pred, target, mask, 0.2)) == pytest.approx(0.2)
    assert float(mae.reconstruction_loss(pred, target, mask, 0.0)) == pytest.approx(0.0)


def test_zero_imputation_and_mask_token():
    x = jnp.arange(1, 17, dtype=jnp.float32).reshape(1, 2, 2, 2, 2)
    mask = jnp.zeros_like(x).at[:, 0].set(1.0)
    hidden = mae.impute(x, mask)
    np.testing.assert_array_equal(hidden[:, 0], 0.0)
    np.testing.assert_array_equal(hidden[:, 1], x[:, 1])
    token = mae.MaskToken(2)
    token.value[...] = jnp.array([5.0, -3.0])
    filled = token(x, mask)
    np.testing.assert_array_equal(filled[:, 0, ..., 0], 5.0)
    np.testing.assert_array_equal(filled[:, 0, ..., 1], -3.0)
    np.testing.assert_array_equal(filled[:, 1], x[:, 1])


def test_mask_token_receives_gradient():
    token = mae.MaskToken(2)
    x = jnp.ones((1, 4, 4, 4, 2))
    mask = mae.block_mask(jax.random.key(5), x.shape, (2, 2, 2), 0.5)

    def loss_fn(t):
        return mae.reconstruction_loss(t(x, mask), x, mask)

    grads = nnx.grad(loss_fn)(token)
    assert np.abs(np.asarray(grads.value[...])).min() > 0
