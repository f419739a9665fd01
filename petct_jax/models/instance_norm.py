"""InstanceNorm fused with its LeakyReLU, with a backward pass that keeps only its input.

torch.nn.InstanceNorm3d(affine=True) followed (or preceded, `act_first`) by LeakyReLU: per
sample and channel over (z, y, x), biased variance, eps inside the square root, statistics
in float32 whatever the compute dtype.

Why a custom VJP: differentiated as written, the norm keeps three full-size float32 arrays
for its backward pass (the centred input, the normalised input, the pre-activation) and the
activation a boolean mask: about 15 bytes per activation element in a bfloat16 network,
where the convolutions need 2. Here the backward pass keeps the input in the compute dtype
and two float32 numbers per sample and channel (mean, 1/std) and recomputes the rest, which
is elementwise work an accelerator does at memory speed.

Statistics in one pass over the data: the mean and mean square of `x - shift` are
independent reductions (one read of `x`), and the shift, the mean of a 1/64 subsample,
lies close to the mean, so `E[d^2] - E[d]^2` does not cancel catastrophically as it would
for raw values far from zero (a CT in HU). On XLA:CPU the two reductions are contractions
with a weight vector instead (`conv_cpu.resolve_impl() == "cpu"`), which it runs far closer
to memory bandwidth than reductions that keep the channel axis.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp

from petct_jax.models.conv_cpu import resolve_impl

_SPATIAL = (1, 2, 3)


def instance_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-5,
                      negative_slope: float | None = 1e-2, act_first: bool = False) -> jax.Array:
    """LeakyReLU(InstanceNorm(x)) (`act_first`: InstanceNorm(LeakyReLU(x))) in x's dtype;
    `negative_slope=None`: no activation. x (b, z, y, x, c); scale, bias (c,)."""
    slope = 1.0 if negative_slope is None else float(negative_slope)
    return _fused(x, scale.astype(jnp.float32), bias.astype(jnp.float32), float(eps), slope,
                  bool(act_first and negative_slope is not None), resolve_impl() == "cpu")


def _leaky(v: jax.Array, slope: float) -> jax.Array:
    return v if slope == 1.0 else jnp.where(v >= 0, v, slope * v)


def _spatial_mean(v: jax.Array, contract: bool) -> jax.Array:
    """Mean over (z, y, x) per sample and channel, as (b, 1, 1, 1, c) float32."""
    if not contract:
        return jnp.mean(v, axis=_SPATIAL, keepdims=True)
    # The sample axis is the dot's batch axis, so the activation is read in place.
    flat = v.reshape(v.shape[0], -1, v.shape[-1])
    weights = jnp.full(flat.shape[:2], 1.0 / flat.shape[1], jnp.float32)
    return jnp.einsum("bn,bnc->bc", weights, flat)[:, None, None, None, :]


def _moments(a: jax.Array, eps: float, contract: bool) -> tuple[jax.Array, jax.Array]:
    """(mean, 1/sqrt(var + eps)) of float32 `a` over (z, y, x), in one pass."""
    shift = jnp.mean(a[:, ::4, ::4, ::4], axis=_SPATIAL, keepdims=True)
    d = a - shift
    m1 = _spatial_mean(d, contract)
    m2 = _spatial_mean(d * d, contract)
    var = jnp.maximum(m2 - m1 * m1, 0.0)
    return shift + m1, jax.lax.rsqrt(var + eps)


def _forward(x, scale, bias, eps, slope, act_first, contract):
    a = x.astype(jnp.float32)
    if act_first:
        a = _leaky(a, slope)
    mean, rstd = _moments(a, eps, contract)
    y = (a - mean) * (rstd * scale) + bias
    if not act_first:
        y = _leaky(y, slope)
    return y.astype(x.dtype), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _fused(x, scale, bias, eps, slope, act_first, contract):
    return _forward(x, scale, bias, eps, slope, act_first, contract)[0]


def _fused_fwd(x, scale, bias, eps, slope, act_first, contract):
    y, (mean, rstd) = _forward(x, scale, bias, eps, slope, act_first, contract)
    return y, (x, mean, rstd, scale, bias)


def _fused_bwd(eps, slope, act_first, contract, residuals, dy):
    x, mean, rstd, scale, bias = residuals
    xf = x.astype(jnp.float32)
    a = _leaky(xf, slope) if act_first else xf
    xhat = (a - mean) * rstd
    g = dy.astype(jnp.float32)
    if not act_first and slope != 1.0:
        g = jnp.where(xhat * scale + bias >= 0, g, slope * g)
    dscale = jnp.sum(g * xhat, axis=(0, *_SPATIAL))
    dbias = jnp.sum(g, axis=(0, *_SPATIAL))
    dxhat = g * scale
    da = rstd * (dxhat - _spatial_mean(dxhat, contract) - xhat * _spatial_mean(dxhat * xhat, contract))
    if act_first and slope != 1.0:
        da = jnp.where(xf >= 0, da, slope * da)
    return da.astype(x.dtype), dscale, dbias


_fused.defvjp(_fused_fwd, _fused_bwd)

