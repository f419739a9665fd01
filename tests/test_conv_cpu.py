"""The CPU fast path for 3D convolutions (petct_jax/models/conv_cpu.py): the same numbers as
`lax.conv_general_dilated`, forward and gradients, for every layer shape the CNN backbones
use, in float32 and bfloat16; and `Conv3d` takes that path on CPU (no 3D convolution left in
its HLO, forward or backward)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax.models import conv_cpu
from petct_jax.models.layers import Conv3d

DN = ("NDHWC", "DHWIO", "NDHWC")
P1 = ((1, 1),) * 3

# (x shape (B, D, H, W, C), kernel (KD, KH, KW, C, O), strides, padding): torch's k // 2 padding.
CASES = {
    "3x3x3_s1": ((2, 6, 8, 8, 6), (3, 3, 3, 6, 5), (1, 1, 1), P1),
    "3x3x3_s1_odd": ((1, 5, 7, 9, 6), (3, 3, 3, 6, 4), (1, 1, 1), P1),
    "3x3x3_s2": ((1, 8, 8, 8, 6), (3, 3, 3, 6, 8), (2, 2, 2), P1),
    "3x3x3_s2_odd": ((2, 7, 9, 5, 5), (3, 3, 3, 5, 7), (2, 2, 2), P1),
    "1x3x3_s122": ((2, 4, 8, 8, 6), (1, 3, 3, 6, 4), (1, 2, 2), ((0, 0), (1, 1), (1, 1))),
    "3x1x3_s1": ((1, 4, 6, 8, 6), (3, 1, 3, 6, 4), (1, 1, 1), ((1, 1), (0, 0), (1, 1))),
    "1x1x1": ((2, 5, 7, 9, 6), (1, 1, 1, 6, 3), (1, 1, 1), ((0, 0),) * 3),
    "stem_2ch": ((2, 5, 7, 9, 2), (3, 3, 3, 2, 4), (1, 1, 1), P1),  # 2 input channels (PET, CT)
    "1x1x1_s2_pad": ((1, 5, 6, 7, 4), (1, 1, 1, 4, 3), (2, 2, 2), ((1, 1),) * 3),
    "bottleneck_1x2x2": ((1, 1, 2, 2, 9), (3, 3, 3, 9, 5), (1, 1, 1), P1),  # taps in padding
    "bottleneck_s2": ((1, 2, 2, 2, 9), (3, 3, 3, 9, 5), (2, 2, 2), P1),
}


def _value_and_grads(impl: str):
    def f(x, k, cot, strides, padding):
        if impl == "xla":
            fn = lambda a, b: jax.lax.conv_general_dilated(a, b, strides, padding,  # noqa: E731
                                                           dimension_numbers=DN)
        else:
            fn = lambda a, b: conv_cpu.conv3d(a, b, strides, padding, impl="cpu")  # noqa: E731
        y, vjp = jax.vjp(fn, x, k)
        return (y, *vjp(cot.astype(y.dtype)))

    return jax.jit(f, static_argnums=(3, 4))


@pytest.fixture(scope="module")
def fns():
    return {"xla": _value_and_grads("xla"), "cpu": _value_and_grads("cpu")}


def _arrays(case: str, dtype):
    xs, ks, strides, padding = CASES[case]
    rng = np.random.default_rng(sorted(CASES).index(case))  # numpy: no compile per shape
    d_out = [conv_cpu.out_size(n, kn, s, p) for n, kn, s, p in zip(xs[1:4], ks[:3], strides, padding)]
    x = jnp.asarray(rng.normal(size=xs), jnp.float32).astype(dtype)
    k = jnp.asarray(0.3 * rng.normal(size=ks), jnp.float32).astype(dtype)
    cot = jnp.asarray(rng.normal(size=(xs[0], *d_out, ks[-1])), jnp.float32)
    return x, k, cot, strides, padding


def _rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_and_gradients_equal_lax_float32(fns, case):
    args = _arrays(case, jnp.float32)
    ref, ours = fns["xla"](*args), fns["cpu"](*args)
    for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert _rel_err(a, b) < 2e-6, (case, name, _rel_err(a, b))


@pytest.mark.parametrize("case", ["3x3x3_s1_odd", "3x3x3_s2_odd", "1x3x3_s122"])
def test_forward_and_gradients_equal_lax_bfloat16(fns, case):
    """bf16 inputs and outputs: both sides accumulate in float32 and round once at the end,
    except that the pieces here are summed before that rounding; a bf16 rounding (2^-8 = 4e-3
    relative to the largest value) or two apart."""
    args = _arrays(case, jnp.bfloat16)
    ref, ours = fns["xla"](*args), fns["cpu"](*args)
    for name, a, b in zip(("y", "dx", "dkernel"), ours, ref):
        assert a.dtype == jnp.bfloat16 and a.shape == b.shape, name
        assert _rel_err(a, b) < 1.6e-2, (case, name, _rel_err(a, b))


def test_zero_output_when_every_tap_is_padding():
    # 1 slice deep, kernel 3 deep with depth padding 3: output rows 0 and 4 see only zeros
    x = jnp.ones((1, 1, 3, 3, 2))
    k = jnp.ones((3, 3, 3, 2, 1))
    pad = ((3, 3), (1, 1), (1, 1))
    ours = conv_cpu.conv3d(x, k, (1, 1, 1), pad, impl="cpu")
    ref = jax.lax.conv_general_dilated(x, k, (1, 1, 1), pad, dimension_numbers=DN)
    np.testing.assert_allclose(ours, ref, rtol=1e-6)
    assert ours.shape[1] == 5
    assert float(jnp.abs(ours[:, 0]).max()) == 0.0 and float(jnp.abs(ours[:, -1]).max()) == 0.0
    assert float(ours[0, 2, 1, 1, 0]) == 18.0  # 9 taps x 2 channels inside the volume


def _conv3d_dims(text: str) -> int:
    """Number of convolutions with three spatial dimensions in StableHLO text."""
    return text.count("[b, 0, 1, 2, f]x[0, 1, 2, i, o]")


def test_conv3d_module_takes_the_fast_path_on_cpu():
    assert jax.default_backend() == "cpu"
    layer = Conv3d(4, 6, 3, 1, use_bias=True, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jnp.ones((1, 6, 8, 8, 4))

    def loss(p, xx):
        return jnp.sum(nnx.merge(graphdef, p)(xx) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    before = conv_cpu.stats["fast"]
    text = step.lower(params, x).as_text()
    assert conv_cpu.stats["fast"] > before
    assert _conv3d_dims(text) == 0 and "convolution" in text  # 2D convolutions only
    with conv_cpu.use_impl("xla"):  # the check can fail: XLA's path has 3D convolutions
        assert _conv3d_dims(jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x)
                            .as_text()) >= 1


def _module_level_conv(x, k):  # one function object, as a training step is
    return conv_cpu.conv3d(x, k, padding=P1)


def test_a_trace_made_inside_use_impl_does_not_leak_out():
    """JAX caches traces by function, not by the override: a step lowered under
    use_impl("xla") (to count its FLOPs) and jitted again afterwards must take the CPU path
    (it silently ran XLA's 3D convolutions, 5x slower, in benchmarks/train_step.py)."""
    x, k = jnp.ones((1, 6, 8, 8, 4)), jnp.ones((3, 3, 3, 4, 6))
    with conv_cpu.use_impl("xla"):
        assert _conv3d_dims(jax.jit(_module_level_conv).lower(x, k).as_text()) == 1
    assert _conv3d_dims(jax.jit(_module_level_conv).lower(x, k).as_text()) == 0
    with conv_cpu.use_impl("xla"):  # and the other way round
        assert _conv3d_dims(jax.jit(_module_level_conv).lower(x, k).as_text()) == 1


def test_conv3d_module_matches_lax_with_bias():
    layer = Conv3d(3, 5, 3, 2, use_bias=True, rngs=nnx.Rngs(1))
    layer.bias.set_value(jnp.arange(5, dtype=jnp.float32))
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 7, 6, 9, 3)), jnp.float32)
    y = layer(x)
    ref = jax.lax.conv_general_dilated(x, layer.kernel[...], (2, 2, 2), P1,
                                       dimension_numbers=DN) + jnp.arange(5.0)
    assert y.shape == (2, 4, 3, 5, 5)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_impl_selection(monkeypatch):
    assert conv_cpu.resolve_impl() == "cpu"  # CPU backend here
    with conv_cpu.use_impl("xla"):
        assert conv_cpu.resolve_impl() == "xla"
        assert conv_cpu.resolve_impl("cpu") == "xla"  # the override wins
    monkeypatch.setenv("PETCT_CONV3D", "xla")
    assert conv_cpu.resolve_impl() == "xla"
    assert conv_cpu.resolve_impl("cpu") == "cpu"  # an explicit argument beats the environment
    monkeypatch.setenv("PETCT_CONV3D", "bogus")
    with pytest.raises(ValueError, match="PETCT_CONV3D"):
        conv_cpu.resolve_impl()


def test_instance_norm_cpu_statistics_equal_the_reduction_form():
    """InstanceNorm sums its statistics as dots on CPU and as reductions elsewhere: the same
    numbers (float32 rounding apart), forward and gradients, with a mean far from zero."""
    from petct_jax.models.layers import InstanceNorm

    norm = InstanceNorm(5)
    norm.scale.set_value(jnp.linspace(0.5, 1.5, 5))
    norm.bias.set_value(jnp.linspace(-1.0, 1.0, 5))
    x = jnp.asarray(np.random.default_rng(4).normal(3.0, 2.0, size=(2, 6, 8, 10, 5)), jnp.float32)
    cot = jnp.asarray(np.random.default_rng(5).normal(size=x.shape), jnp.float32)
    graphdef, params = nnx.split(norm)

    def value_and_grads():
        y, vjp = jax.vjp(lambda p, xx: nnx.merge(graphdef, p)(xx), params, x)
        return y, *vjp(cot)

    ours = value_and_grads()
    with conv_cpu.use_impl("xla"):
        ref = value_and_grads()
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
        assert _rel_err(a, b) < 1e-5
    y = np.asarray(ours[0]).reshape(2, -1, 5)
    np.testing.assert_allclose((y.mean(1) - np.linspace(-1, 1, 5)), 0, atol=1e-5)  # bias = mean


def test_materialize_is_the_identity_with_its_gradient():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 3, 4)), jnp.float32)
    y, vjp = jax.vjp(conv_cpu.materialize, x)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(vjp(2 * x)[0], 2 * x)
    # a non-finite first element takes the other branch: still the identity
    z = x.at[0, 0, 0].set(jnp.nan).at[0, 0, 1].set(jnp.inf)
    np.testing.assert_array_equal(conv_cpu.materialize(z), z)


def test_conv_input_and_tap_sum_are_materialized():
    """The convolution's input and its depth-tap sum each pass through a conditional, which
    XLA:CPU cannot fuse through: the kernel gradient's transposing copy then reads the stored
    activation instead of recomputing it from the producers (module docstring). The check can
    fail: without `materialize` the compiled step has no conditional at all."""
    def loss(a, b, k):
        x = jnp.where(a + b >= 0, a + b, 0.01 * (a + b))  # an elementwise producer
        return jnp.sum(conv_cpu.conv3d(x, k, (1, 1, 1), P1, impl="cpu") ** 2)

    a, b = jnp.ones((1, 4, 6, 6, 8)), jnp.zeros((1, 4, 6, 6, 8))  # 8 channels: depth taps
    k = jnp.ones((3, 3, 3, 8, 2))
    text = jax.jit(jax.grad(loss, argnums=2)).lower(a, b, k).compile().as_text()
    assert text.count("conditional(") >= 2
