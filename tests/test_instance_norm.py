"""The fused InstanceNorm + LeakyReLU (petct_jax/models/instance_norm.py): values and gradients
equal to the two-pass formulation it replaced and to torch's InstanceNorm3d + LeakyReLU, and a
backward pass that keeps only the compute-dtype input and float32 per-channel statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax.models.instance_norm import instance_norm_act
from petct_jax.models.plain_unet import PlainConvUNet

SLOPE = 1e-2
ORDERS = [dict(), dict(act_first=True), dict(negative_slope=None)]


def two_pass(x, scale, bias, *, eps=1e-5, negative_slope=SLOPE, act_first=False):
    """The layer as autodiff saw it before: two-pass mean and biased variance in float32."""
    act = (lambda v: v) if negative_slope is None else (
        lambda v: jnp.where(v >= 0, v, negative_slope * v))
    a = x.astype(jnp.float32)
    if act_first:
        a = act(a)
    mean = jnp.mean(a, axis=(1, 2, 3), keepdims=True)
    var = jnp.mean(jnp.square(a - mean), axis=(1, 2, 3), keepdims=True)
    y = (a - mean) * jax.lax.rsqrt(var + eps) * scale + bias
    return (y if act_first else act(y)).astype(x.dtype)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    # CT-like values far from zero: where a naive one-pass E[x^2] - E[x]^2 would cancel.
    x = (rng.normal(size=(2, 6, 7, 5, 4)) * 50 - 1000).astype(np.float32)
    scale = rng.normal(size=4).astype(np.float32)
    bias = rng.normal(size=4).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    return x, scale, bias, cotangent


def _value_and_grads(fn, x, scale, bias, cotangent, **kw):
    loss = lambda *a: jnp.sum(fn(*a, **kw).astype(jnp.float32) * cotangent)  # noqa: E731
    return fn(x, scale, bias, **kw), jax.grad(loss, (0, 1, 2))(x, scale, bias)


@pytest.mark.parametrize("kw", ORDERS, ids=["norm_act", "act_norm", "norm_only"])
def test_equals_the_two_pass_layer_in_value_and_gradient(data, kw):
    x, scale, bias, cotangent = data
    y, grads = _value_and_grads(instance_norm_act, x, scale, bias, cotangent, **kw)
    y_ref, grads_ref = _value_and_grads(two_pass, x, scale, bias, cotangent, **kw)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=2e-5)
    for g, g_ref in zip(grads, grads_ref):
        np.testing.assert_allclose(g, g_ref, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(g_ref))))


@pytest.mark.parametrize("kw", ORDERS, ids=["norm_act", "act_norm", "norm_only"])
def test_equals_torch_instancenorm3d_and_leakyrelu(data, kw):
    torch = pytest.importorskip("torch")
    x, scale, bias, cotangent = data
    norm = torch.nn.InstanceNorm3d(4, eps=1e-5, affine=True).double()
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(scale.astype(np.float64)))
        norm.bias.copy_(torch.from_numpy(bias.astype(np.float64)))
    act = torch.nn.LeakyReLU(SLOPE) if kw.get("negative_slope", SLOPE) is not None else torch.nn.Identity()
    layers = [act, norm] if kw.get("act_first") else [norm, act]
    xt = torch.from_numpy(x.astype(np.float64).transpose(0, 4, 1, 2, 3)).requires_grad_()
    yt = torch.nn.Sequential(*layers)(xt)
    (yt * torch.from_numpy(cotangent.astype(np.float64).transpose(0, 4, 1, 2, 3))).sum().backward()

    y, (gx, gscale, gbias) = _value_and_grads(instance_norm_act, x, scale, bias, cotangent, **kw)
    np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 4, 1), rtol=0, atol=3e-5)
    gx_t = xt.grad.numpy().transpose(0, 2, 3, 4, 1)
    np.testing.assert_allclose(gx, gx_t, rtol=0, atol=3e-5 * np.abs(gx_t).max())
    np.testing.assert_allclose(gscale, norm.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gbias, norm.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_bfloat16_input_gives_the_float32_statistics_result_rounded(data):
    x, scale, bias, _ = data
    xb = jnp.asarray(x, jnp.bfloat16)
    y = instance_norm_act(xb, scale, bias)
    assert y.dtype == jnp.bfloat16
    # Statistics in float32 from the bf16 values: the result differs only by the final rounding.
    expected = two_pass(xb.astype(jnp.float32), scale, bias)
    np.testing.assert_allclose(np.asarray(y, np.float32), expected, rtol=2 ** -7, atol=2 ** -7)


def _residuals(fn, *args):
    """What the backward pass of `fn` keeps: the leaves of its VJP closure, abstractly."""
    return jax.tree.leaves(jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args))


@pytest.mark.parametrize("kw", ORDERS, ids=["norm_act", "act_norm", "norm_only"])
def test_backward_keeps_the_bf16_input_and_float32_statistics_only(kw):
    x = jax.ShapeDtypeStruct((2, 8, 8, 8, 4), jnp.bfloat16)
    p = jax.ShapeDtypeStruct((4,), jnp.float32)
    kept = _residuals(lambda *a: instance_norm_act(*a, **kw), x, p, p)
    full = [r for r in kept if r.size == np.prod(x.shape)]
    assert [(r.shape, r.dtype) for r in full] == [(x.shape, jnp.bfloat16)]
    assert all(r.dtype == jnp.float32 and r.size <= 2 * 4 for r in kept if r.size != np.prod(x.shape))


def test_network_backward_keeps_no_full_size_float32_or_mask_arrays():
    """In a bfloat16 PlainConvUNet every activation autodiff keeps is bf16: the norms' float32
    working arrays and the LeakyReLU masks are recomputed, not stored."""
    model = PlainConvUNet(input_channels=2, n_stages=3, features_per_stage=(4, 8, 16), strides=(1, 2, 2),
                          n_conv_per_stage=(2, 2, 2), num_classes=2, n_conv_per_stage_decoder=(1, 1),
                          dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    x = jax.ShapeDtypeStruct((2, 8, 16, 16, 2), jnp.float32)

    def forward(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32))

    smallest_activation = 2 * 2 * 4 * 4 * 4  # (b, z, y, x, c) of the coarsest stage
    big = [(r.shape, r.dtype) for r in _residuals(forward, params, x) if r.size >= smallest_activation
           and len(r.shape) == 5 and r.shape[0] == 2]
    assert big, "the network keeps activations for its backward pass"
    assert {dtype for _, dtype in big} == {jnp.dtype(jnp.bfloat16)}, big
