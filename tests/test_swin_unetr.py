"""SwinUNETR (v2) against MONAI 1.6.1: forward parity both ways, keys, parameter counts.

Tiny networks (feature_size 12, heads 3-6-12-24) on a (1, 32, 64, 96) input: the first
two stages (16x32x48 and 8x16x24 maps) are padded to window multiples and shifted with
the attention mask; the third (4x8x12) has a window shrunk to 4 on z (index slicing, no
shift on that axis only). Distinct z/y/x sizes catch any axis mix-up; the bf16 test runs
batch 2. One jitted forward per configuration, shared by module fixtures.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax.convert.monai import from_torch_state, monai_kwargs, to_torch_state
from petct_jax.errors import PetctError
from petct_jax.models.swin_unetr import PRESETS, SwinUNETR

KW = dict(in_channels=2, out_channels=3, feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
          use_v2=True, downsample="mergingv2")
SHAPE = (1, 32, 64, 96)  # batch, z, y, x
TOL = 1e-4  # max |ours - MONAI| / max |MONAI|


def _monai():
    return pytest.importorskip("monai.networks.nets")


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _jit_forward(model: nnx.Module, deterministic: bool = True):
    """jit a pure (state, x[, key]) -> y for one graphdef; models of the same config share it."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def fwd(state, x, key=None):
        return nnx.merge(graphdef, state)(x, deterministic=deterministic, rngs=key)

    return fwd


def _torch_forward(tm, x_cl: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        y = tm(torch.from_numpy(np.ascontiguousarray(x_cl.transpose(0, 4, 1, 2, 3)))).numpy()
    return y.transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((*SHAPE, 2)).astype(np.float32)


@pytest.fixture(scope="module")
def torch_model():
    import torch

    nets = _monai()
    torch.manual_seed(0)
    tm = nets.SwinUNETR(**KW).eval()
    with torch.no_grad():  # make norms and position biases matter
        for name, p in tm.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            if "relative_position_bias_table" in name:
                p.normal_(0.0, 0.5)
    return tm


@pytest.fixture(scope="module")
def torch_state(torch_model) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in torch_model.state_dict().items()}


@pytest.fixture(scope="module")
def jax_model(torch_state):
    return from_torch_state(torch_state, **KW)


@pytest.fixture(scope="module")
def fwd(jax_model):
    return _jit_forward(jax_model)


@pytest.fixture(scope="module")
def y_f32(fwd, jax_model, x) -> np.ndarray:
    return np.asarray(fwd(nnx.state(jax_model), jnp.asarray(x)))


# ------------------------------------------------------------------ parity


def test_torch_to_jax_forward_matches_monai(torch_model, y_f32, x):
    y_ref = _torch_forward(torch_model, x)
    assert y_f32.dtype == np.float32 and y_f32.shape == (*SHAPE, 3)
    assert _rel(y_f32, y_ref) <= TOL, _rel(y_f32, y_ref)


def test_jax_to_torch_forward_matches_monai(fwd, x):
    import torch

    nets = _monai()
    model = SwinUNETR(**KW, rngs=nnx.Rngs(1))
    # Perturb everything (norm scales are 1 at init) so every mapping is exercised.
    rng = np.random.default_rng(2)
    params = jax.tree.map(lambda p: jnp.asarray(p + 0.05 * rng.standard_normal(p.shape, np.float32)),
                          nnx.state(model, nnx.Param))
    nnx.update(model, params)

    sd = to_torch_state(model)
    tm = nets.SwinUNETR(**monai_kwargs(model)).eval()
    assert list(sd) == list(tm.state_dict())  # same keys, same order
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    y = np.asarray(fwd(nnx.state(model), jnp.asarray(x)))
    y_ref = _torch_forward(tm, x)
    assert _rel(y, y_ref) <= TOL, _rel(y, y_ref)


def test_round_trip_is_exact(torch_state, jax_model):
    back = to_torch_state(jax_model)
    assert set(back) == set(torch_state)
    for k, v in torch_state.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
        assert back[k].dtype == v.dtype, k


def test_patch_merging_orders_match_monai():
    import torch

    pytest.importorskip("monai")
    from monai.networks.nets.swin_unetr import PatchMerging, PatchMergingV2

    from petct_jax.models.swin_unetr import _PatchMerging

    xs = np.random.default_rng(1).standard_normal((1, 4, 6, 2, 3)).astype(np.float32)
    for cls, v2 in ((PatchMergingV2, True), (PatchMerging, False)):
        torch.manual_seed(0)
        tm = cls(dim=3)
        ours = _PatchMerging(3, v2=v2, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        ours.reduction.kernel.set_value(jnp.asarray(tm.reduction.weight.detach().numpy().T))
        with torch.no_grad():
            ref = tm(torch.from_numpy(xs)).numpy()
        np.testing.assert_allclose(np.asarray(ours(jnp.asarray(xs))), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(use_v2=False), dict(norm_name=("instance", {"affine": True})),
                                     dict(downsample="merging", depths=(1, 2, 3, 1))])
def test_variants_load_strictly(variant):
    import torch

    nets = _monai()
    kw = {**KW, **variant}
    model = nnx.eval_shape(lambda: SwinUNETR(**kw, rngs=nnx.Rngs(0)))  # keys only: no weights needed
    tm = nets.SwinUNETR(**kw)
    sd = {k: v.numpy() for k, v in tm.state_dict().items()}
    loaded = from_torch_state(sd, downsample=kw["downsample"])  # the rest is read off the weights
    assert monai_kwargs(loaded) == {**monai_kwargs(model), "dropout_path_rate": 0.0}
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in to_torch_state(loaded).items()}, strict=True)


def test_front_end_round_trip(tmp_path):
    """petct_jax.convert dispatches here: prefixed checkpoint in, strict state_dict and model.json out."""
    from petct_jax import convert

    nets = _monai()
    kw = {**KW, "depths": (1, 1, 1, 1), "norm_name": ("instance", {"affine": True})}
    ref = {k: v.numpy() for k, v in nets.SwinUNETR(**kw).state_dict().items()}
    ckpt = {"model_state_dict": {f"module.encoder_decoder.{k}": v for k, v in ref.items()}}
    model = convert.from_torch(ckpt, arch="swin_unetr")
    back = convert.to_torch(model)
    assert back.keys() == ref.keys() and all(np.array_equal(back[k], ref[k]) for k in ref)
    convert.save_converted(model, "swin_unetr", None, tmp_path)
    again = convert.to_torch(convert.load_converted(tmp_path))
    assert all(np.array_equal(again[k], ref[k]) for k in ref)


# ------------------------------------------------------------------ conversion errors


def test_bad_state_dicts_raise(torch_state):
    sd = dict(torch_state)
    del sd["encoder2.layer.conv1.conv.weight"]
    sd["foo.bar"] = np.zeros(3, np.float32)
    sd["out.conv.conv.bias"] = np.zeros(5, np.float32)
    with pytest.raises(PetctError) as err:
        from_torch_state(sd, **KW)
    msg = str(err.value)
    assert "encoder2.layer.conv1.conv.weight" in msg and "foo.bar" in msg and "out.conv.conv.bias" in msg

    sd = dict(torch_state)
    sd["swinViT.layers1.0.blocks.0.attn.relative_position_index"] = np.zeros((343, 343), np.int64)
    with pytest.raises(PetctError, match="relative_position_index"):
        from_torch_state(sd, **KW)
    with pytest.raises(PetctError, match="drop_rate"):
        from_torch_state(torch_state, **KW, drop_rate=0.1)


# ------------------------------------------------------------------ model behaviour


def test_parameter_counts_equal_monai():
    import torch

    nets = _monai()
    linspace = torch.linspace
    from unittest import mock

    counts = {}
    for name, preset in PRESETS.items():
        # meta device: counted, never allocated; MONAI calls .item() on a linspace.
        with torch.device("meta"), mock.patch.object(
                torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"})):
            tm = nets.SwinUNETR(in_channels=2, out_channels=2, use_v2=True, downsample="mergingv2",
                                feature_size=preset["feature_size"], depths=preset["depths"],
                                num_heads=preset["num_heads"], dropout_path_rate=preset["drop_path_rate"])
        ours = nnx.eval_shape(lambda preset=preset: SwinUNETR(in_channels=2, out_channels=2, **preset,
                                                              rngs=nnx.Rngs(0)))
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(ours, nnx.Param)))
        assert n == sum(p.numel() for p in tm.parameters()), name
        counts[name] = n
    # method.md: ~18.3M / ~74.6M / ~319.2M
    assert [round(c / 1e5) / 10 for c in counts.values()] == [18.3, 74.6, 319.2]


def test_features_shapes_and_head():
    model = nnx.eval_shape(lambda: SwinUNETR(**KW, rngs=nnx.Rngs(0)))
    xs = jax.ShapeDtypeStruct((*SHAPE, 2), jnp.float32)
    feats = nnx.eval_shape(lambda m, v: m.features(v), model, xs)
    assert feats["decoder"].shape == (*SHAPE, 12)
    assert feats["bottleneck"].shape == (1, 1, 2, 3, 192)
    y = nnx.eval_shape(lambda m, v: m(v), model, xs)
    assert y.shape == (*SHAPE, 3) and y.dtype == jnp.float32
    rebuilt = nnx.eval_shape(lambda: SwinUNETR(**model.config, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda p: p.shape, nnx.state(rebuilt, nnx.Param))
    assert shapes == jax.tree.map(lambda p: p.shape, nnx.state(model, nnx.Param))
    for bad in [(1, 32, 32, 48, 2), (1, 32, 32, 64, 3), (32, 32, 64, 2), (1, 32, 32, 32, 2)]:
        with pytest.raises(PetctError):
            nnx.eval_shape(lambda m, v: m(v), model, jax.ShapeDtypeStruct(bad, jnp.float32))


def test_reinit_head_changes_only_head():
    model = SwinUNETR(**KW, rngs=nnx.Rngs(0))
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    model.reinit_head(nnx.Rngs(7))
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    flat_b, flat_a = dict(nnx.traversals.flatten_mapping(before)), dict(nnx.traversals.flatten_mapping(after))
    assert flat_b.keys() == flat_a.keys()
    changed = {k for k in flat_b if not np.array_equal(flat_b[k], flat_a[k])}
    assert changed == {("head", "conv", "kernel"), ("head", "conv", "bias")}
    model.reinit_head(nnx.Rngs(8), out_channels=5)
    assert model.head.conv.kernel.shape == (1, 1, 1, 12, 5) and model.out_channels == 5
    assert to_torch_state(model)["out.conv.conv.weight"].shape == (5, 12, 1, 1, 1)


def _primitives(jaxpr) -> list[str]:
    """Primitive names of a jaxpr, nested jaxprs (jit, checkpoint, ...) included."""
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, list | tuple) else (value,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    names += _primitives(sub)
    return names


def test_drop_path_only_when_not_deterministic():
    # Traced, not compiled: random bits are drawn only with deterministic=False, twice per
    # block with a non-zero rate (rates 0, 1/6, 1/3, 1/2 over the four blocks).
    model = nnx.eval_shape(lambda: SwinUNETR(**{**KW, "depths": (1, 1, 1, 1)}, drop_path_rate=0.5,
                                             rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    xs = jax.ShapeDtypeStruct((1, 32, 32, 64, 2), jnp.float32)
    for det, n_random in ((True, 0), (False, 6)):
        jaxpr = jax.make_jaxpr(lambda st, v, k, det=det: nnx.merge(graphdef, st)(v, deterministic=det, rngs=k))(
            state, xs, jax.random.key(0)).jaxpr
        assert _primitives(jaxpr).count("random_bits") == n_random, det

    # The mask is per sample, scaled by 1/keep.
    from petct_jax.models.swin_unetr import _drop_path

    y = np.asarray(_drop_path(jnp.ones((400, 2, 2, 2, 3)), 0.25, jax.random.key(1)))
    per_sample = y.reshape(400, -1)
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert 0.65 < np.mean(per_sample[:, 0] > 0) < 0.85
    ones = jnp.ones(3)
    assert _drop_path(ones, 0.25, None) is ones and _drop_path(ones, 0.0, jax.random.key(1)) is ones

    # Without a key, the stream kept at construction is used and advances call to call.
    model = SwinUNETR(**{**KW, "depths": (1, 1, 1, 1)}, drop_path_rate=0.5, rngs=nnx.Rngs(0))
    ka, kb = model._drop_path_keys(False, None), model._drop_path_keys(False, None)
    assert not np.array_equal(jax.random.key_data(ka[0][0]), jax.random.key_data(kb[0][0]))
    assert model._drop_path_keys(True, None) == [None] * 4


def test_bf16_close_to_f32(torch_model, torch_state):
    # Batch 2 here (the f32 parity runs batch 1): windows must not mix across samples.
    x_small = np.random.default_rng(3).standard_normal((2, 32, 32, 64, 2)).astype(np.float32)
    model = from_torch_state(torch_state, **KW, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    y = np.asarray(_jit_forward(model)(nnx.state(model), jnp.asarray(x_small)))
    assert y.dtype == np.float32
    err = _rel(y, _torch_forward(torch_model, x_small))
    assert 1e-6 < err < 5e-2, err  # bf16 is really used, and close


def _stage_grads(remat: str | None, h: jax.Array) -> list[jax.Array]:
    """Gradients (parameters and input) of a loss through the second Swin stage (padded windows)."""
    model = SwinUNETR(**{**KW, "depths": (1, 1, 1, 1)}, remat=remat, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model.stages[1])

    def loss(state, h):
        return jnp.sum(jnp.sin(model._apply(nnx.merge(graphdef, state), h, None)))

    return jax.tree.leaves(jax.jit(jax.grad(loss, argnums=(0, 1)))(state, h))


def test_remat_modes():
    xs = jax.ShapeDtypeStruct((1, 32, 32, 64, 2), jnp.float32)
    dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    for mode, policy in (("stage", None), ("stage_dots", dots)):
        graphdef, state = nnx.split(nnx.eval_shape(lambda mode=mode: SwinUNETR(**KW, remat=mode, rngs=nnx.Rngs(0))))
        jaxpr = jax.make_jaxpr(lambda st, v, graphdef=graphdef: nnx.merge(graphdef, st)(v))(state, xs)
        ckpt = [e for e in jaxpr.eqns if e.primitive.name in ("remat2", "checkpoint", "remat")]
        assert len(ckpt) == 14  # 4 Swin stages, 5 encoder blocks, 5 decoder blocks
        assert all(e.params["policy"] is policy for e in ckpt)
    with pytest.raises(PetctError):
        SwinUNETR(**KW, remat="everything", rngs=nnx.Rngs(0))

    # Same gradients with and without remat, parameters included (split/merge inside checkpoint).
    h = jnp.asarray(np.random.default_rng(4).standard_normal((1, 8, 8, 16, 24)).astype(np.float32))
    grads = [_stage_grads(mode, h) for mode in (None, "stage_dots")]
    for a, b in zip(*grads):  # recomputation may reassociate float sums
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()


def test_import_does_not_pull_torch():
    code = ("import sys, petct_jax.models.swin_unetr, petct_jax.convert.monai; "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
