"""The CNN backbones (PlainConvUNet, ResidualEncoderUNet): structure, init, interface,
mixed precision, rematerialisation, and the layers against PyTorch. Equality of whole networks
with their torch twins is in test_convert_nnunet.py."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax.errors import PetctError
from petct_jax.models import registry
from petct_jax.models.layers import Conv3d, ConvTranspose3d
from petct_jax.models.plain_unet import PlainConvUNet
from petct_jax.models.resenc_unet import PRESETS, RECOMMENDED, ResidualEncoderUNet

SMALL = dict(input_channels=2, n_stages=3, features_per_stage=(4, 8, 16),
             kernel_sizes=((1, 3, 3), 3, 3), strides=(1, (1, 2, 2), 2), n_conv_per_stage=(1, 2, 1),
             num_classes=3, n_conv_per_stage_decoder=(1, 2))
X_SHAPE = (2, 8, 16, 16, 2)


def n_params(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def jitted(model: nnx.Module, method: str = "__call__"):
    """(fn(state, x), state): one compile per graph, shared by models of the same structure."""
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x)), state


@pytest.fixture(scope="module")
def x():
    return jax.random.normal(jax.random.key(0), X_SHAPE, jnp.float32)


@pytest.fixture(scope="module")
def small():
    return PlainConvUNet(**SMALL, rngs=nnx.Rngs(0))


def test_default_plain_unet_is_the_papers_31_2m_network():
    model = nnx.eval_shape(lambda: PlainConvUNet(rngs=nnx.Rngs(0)))
    assert n_params(model) == 31_196_458  # == dynamic_network_architectures (test_convert_nnunet)
    cfg = model.config
    assert cfg["features_per_stage"] == (32, 64, 128, 256, 320, 320)
    assert cfg["strides"] == ((1, 1, 1),) + ((2, 2, 2),) * 5
    assert cfg["conv_bias"] and not cfg["deep_supervision"]


def test_resenc_presets():
    def abstract(name):
        return nnx.eval_shape(lambda: registry.build("resenc_unet", name, rngs=nnx.Rngs(0)))

    counts = {name: n_params(abstract(name)) for name in PRESETS}
    assert counts["M"] == counts["L"] == 102_350_634  # == torch default 6-stage ResEnc
    assert counts["XL"] > counts["L"]
    assert registry.presets("resenc_unet").keys() == {"M", "L", "XL"}
    for name, plan in RECOMMENDED.items():  # patches fit the topology (divisible by the strides)
        strides = PRESETS[name]["strides"]
        for axis, size in enumerate(plan["patch_size"]):
            total = math.prod(s if isinstance(s, int) else s[axis] for s in strides)
            assert size % total == 0, (name, plan)


def test_he_init_matches_torch_distribution():
    torch = pytest.importorskip("torch")
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    rngs = nnx.Rngs(3)
    cases = [(Conv3d(48, 64, 3, rngs=rngs), torch.nn.Conv3d(48, 64, 3)),
             (ConvTranspose3d(64, 48, 2, 2, rngs=rngs), torch.nn.ConvTranspose3d(64, 48, 2, 2))]
    for ours, theirs in cases:
        InitWeights_He(1e-2)(theirs)
        std_ours = float(jnp.std(ours.kernel[...]))
        std_torch = float(theirs.weight.detach().std())
        assert std_ours == pytest.approx(std_torch, rel=0.04)
        assert float(jnp.abs(ours.bias[...]).max()) == 0.0
    # normal, not truncated: some draws beyond 2 std
    k = np.asarray(cases[0][0].kernel[...])
    assert (np.abs(k) > 2.5 * k.std()).mean() > 0.005


def test_resenc_zero_inits_last_norm_of_each_block():
    model = ResidualEncoderUNet(input_channels=1, n_stages=2, features_per_stage=(4, 8),
                                strides=(1, 2), n_blocks_per_stage=(1, 2), num_classes=2,
                                rngs=nnx.Rngs(0))
    for stage in model.encoder.stages:
        for block in stage.blocks:
            assert float(jnp.abs(block.conv2.norm.scale[...]).max()) == 0.0
            assert float(jnp.abs(block.conv1.norm.scale[...] - 1).max()) == 0.0
    assert model.encoder.stages[1].blocks[0].skip is not None  # width 4 -> 8 and stride 2
    assert model.encoder.stages[1].blocks[1].skip is None


def test_transposed_conv_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for kernel, stride in [((1, 2, 2), (1, 2, 2)), ((2, 2, 2), (2, 2, 2)), ((3, 3, 2), (2, 1, 2))]:
        layer = ConvTranspose3d(5, 3, kernel, stride, rngs=nnx.Rngs(1))
        layer.bias.set_value(jnp.asarray(rng.normal(size=3), jnp.float32))
        xx = rng.normal(size=(2, 5, 3, 4, 5)).astype(np.float32)
        weight = np.array(layer.kernel[...]).transpose(3, 4, 0, 1, 2)  # (I, O, kD, kH, kW)
        bias = np.array(layer.bias[...])
        want = torch.nn.functional.conv_transpose3d(
            torch.from_numpy(xx), torch.from_numpy(weight), torch.from_numpy(bias),
            stride=stride).numpy().transpose(0, 2, 3, 4, 1)
        got = np.asarray(layer(jnp.asarray(xx.transpose(0, 2, 3, 4, 1))))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())


def test_forward_features_and_head(small, x):
    forward, state = jitted(small)
    y = forward(state, x)
    assert y.shape == (*X_SHAPE[:4], 3) and y.dtype == jnp.float32
    feats, _ = jitted(small, "features")
    f = feats(state, x)
    assert f["decoder"].shape == (*X_SHAPE[:4], 4)
    assert f["bottleneck"].shape == (2, 4, 4, 4, 16)  # z / 2, y and x / 4
    np.testing.assert_allclose(small.apply_head(f["decoder"]), y, rtol=1e-5, atol=1e-5)


def test_deep_supervision_outputs_highest_resolution_first(x):
    model = PlainConvUNet(**{**SMALL, "deep_supervision": True}, rngs=nnx.Rngs(0))
    forward, state = jitted(model)
    ys = forward(state, x)
    assert [y.shape[1:4] for y in ys] == [(8, 16, 16), (8, 8, 8)]
    assert all(y.dtype == jnp.float32 and y.shape[-1] == 3 for y in ys)


def test_reinit_head_changes_only_the_head(x):
    model = PlainConvUNet(**SMALL, rngs=nnx.Rngs(0))
    before = nnx.to_flat_state(nnx.state(model, nnx.Param))
    model.reinit_head(nnx.Rngs(7))
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, value in before:
        same = bool(jnp.array_equal(value[...], after[path][...]))
        is_head = path[:2] == ("decoder", "seg_layers")
        assert same != (is_head and path[-1] == "kernel"), path  # head biases stay 0
    model.reinit_head(nnx.Rngs(8), out_channels=5)
    assert model.config["num_classes"] == 5
    assert all(layer.kernel.shape[-1] == 5 for layer in model.head)
    assert model.apply_head(jnp.zeros((1, 2, 2, 2, 4))).shape == (1, 2, 2, 2, 5)


def test_bfloat16_compute_is_close_to_float32(small, x):
    bf16 = PlainConvUNet(**SMALL, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))  # same params
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16, nnx.Param)))
    f32_fn, f32_state = jitted(small)
    bf_fn, bf_state = jitted(bf16)
    y32, y16 = f32_fn(f32_state, x), bf_fn(bf_state, x)
    assert y16.dtype == jnp.float32
    err = float(jnp.max(jnp.abs(y16 - y32)) / jnp.max(jnp.abs(y32)))
    assert 0 < err < 0.05


@pytest.mark.parametrize("cls,extra", [(PlainConvUNet, {}),
                                       (ResidualEncoderUNet, {"n_blocks_per_stage": (1, 2)})])
def test_remat_gives_the_same_gradients(cls, extra, x):
    kwargs = dict(input_channels=2, n_stages=2, features_per_stage=(4, 8), strides=(1, 2),
                  num_classes=2, **extra)

    def grads(remat):
        model = cls(**kwargs, remat=remat, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(jnp.square(nnx.merge(graphdef, p)(x[:1, :4, :8, :8])))  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    reference = grads(None)
    for remat in ("stage", "stage_dots"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     reference, grads(remat))


def test_bad_settings_raise_petct_error(small):
    with pytest.raises(PetctError, match="divisible"):
        small(jnp.zeros((1, 8, 10, 16, 2)))
    with pytest.raises(PetctError, match="remat"):
        PlainConvUNet(**SMALL, remat="everything", rngs=nnx.Rngs(0))
    with pytest.raises(PetctError, match="features_per_stage"):
        PlainConvUNet(**{**SMALL, "features_per_stage": (4, 8)}, rngs=nnx.Rngs(0))


def test_registry_builds_from_config_values():
    model = registry.build("plain_unet", "paper", rngs=nnx.Rngs(0), n_stages=2,
                           features_per_stage=[4, 8], strides=[1, [1, 2, 2]], dtype="bfloat16",
                           remat="stage")
    assert isinstance(model, PlainConvUNet)
    assert model.dtype == jnp.bfloat16 and model.remat == "stage"
    assert model.config["strides"] == ((1, 1, 1), (1, 2, 2))
    assert registry.name_of(model) == "plain_unet"
    assert registry.MODELS["swin_unetr"][0] == "petct_jax.models.swin_unetr:SwinUNETR"
    with pytest.raises(PetctError, match="unknown model"):
        registry.build("vnet", rngs=nnx.Rngs(0))
    with pytest.raises(PetctError, match="no preset"):
        registry.build("resenc_unet", "XXL", rngs=nnx.Rngs(0))
