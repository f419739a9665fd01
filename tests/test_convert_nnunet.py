"""Weights between petct-jax and nnU-Net's dynamic_network_architectures: the same numbers in
both directions against the real PyTorch classes, every alias key, files, checkpoints, errors,
and `petct convert`."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")

from petct_jax import convert  # noqa: E402
from petct_jax.cli import main  # noqa: E402
from petct_jax.convert import io  # noqa: E402
from petct_jax.errors import PetctError  # noqa: E402
from petct_jax.models.plain_unet import PlainConvUNet  # noqa: E402
from petct_jax.models.resenc_unet import ResidualEncoderUNet  # noqa: E402

nn = torch.nn
TORCH_COMMON = dict(conv_op=nn.Conv3d, norm_op=nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                    dropout_op_kwargs=None, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})

# Small non-default networks: anisotropic kernels and strides, 1-2 convs/blocks, deep supervision.
CASES = {
    "plain_ds": ("plain_unet", dict(
        input_channels=2, n_stages=4, features_per_stage=(4, 8, 12, 16),
        kernel_sizes=((1, 3, 3), 3, 3, (3, 1, 3)), strides=(1, (1, 2, 2), 2, 2),
        n_conv_per_stage=(1, 2, 1, 2), num_classes=3, n_conv_per_stage_decoder=(2, 1, 1),
        conv_bias=True, deep_supervision=True)),
    "plain_nonlin_first_nobias": ("plain_unet", dict(
        input_channels=1, n_stages=3, features_per_stage=(4, 6, 8), kernel_sizes=3,
        strides=(1, 2, (1, 2, 2)), n_conv_per_stage=2, num_classes=2, n_conv_per_stage_decoder=1,
        conv_bias=False, nonlin_first=True)),
    "resenc_ds": ("resenc_unet", dict(
        input_channels=2, n_stages=3, features_per_stage=(4, 8, 16),
        kernel_sizes=((1, 3, 3), 3, 3), strides=(1, (1, 2, 2), 2), n_blocks_per_stage=(1, 2, 2),
        num_classes=2, n_conv_per_stage_decoder=(1, 2), conv_bias=True, deep_supervision=True,
        stem_channels=6)),
}
X_SHAPE = (2, 4, 16, 16)  # batch, z, y, x


def torch_twin(arch: str, cfg: dict) -> nn.Module:
    kw = {**TORCH_COMMON, **cfg}
    if arch == "plain_unet":
        return dna.PlainConvUNet(**kw).eval()
    return dna.ResidualEncoderUNet(**kw).eval()


def ours(arch: str, cfg: dict, seed: int = 0) -> nnx.Module:
    cls = PlainConvUNet if arch == "plain_unet" else ResidualEncoderUNet
    return cls(**cfg, rngs=nnx.Rngs(seed))


def randomize_torch(module: nn.Module, seed: int) -> None:
    """Random values everywhere (norm weights, zero-initialised ones included)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (0.5 if p.ndim == 1 else 0.0))


def randomize_ours(model: nnx.Module, seed: int) -> None:
    # numpy draws: eager jax.random would compile once per parameter shape
    rng = np.random.default_rng(seed)
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    new = [jnp.asarray(0.3 * rng.normal(size=x.shape) + (0.5 if x.ndim == 1 else 0.0), jnp.float32)
           for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, new))


def run_torch(module: nn.Module, x: np.ndarray) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)))
    out = out if isinstance(out, list | tuple) else [out]
    return [o.numpy().transpose(0, 2, 3, 4, 1) for o in out]


_JIT_CACHE: dict = {}


def run_ours(model: nnx.Module, x: np.ndarray) -> list[np.ndarray]:
    graphdef, state = nnx.split(model)
    if graphdef not in _JIT_CACHE:  # one compile per network structure
        _JIT_CACHE[graphdef] = jax.jit(lambda s, xx: nnx.merge(graphdef, s)(xx))
    out = _JIT_CACHE[graphdef](state, jnp.asarray(x))
    return [np.asarray(o) for o in (out if isinstance(out, list) else [out])]


def assert_same_outputs(want: list[np.ndarray], got: list[np.ndarray]) -> None:
    assert [w.shape for w in want] == [g.shape for g in got]
    for w, g in zip(want, got, strict=True):
        assert np.abs(w - g).max() <= 1e-4 * np.abs(w).max()


def params_equal(a: nnx.Module, b: nnx.Module) -> bool:
    leaves_a = jax.tree.leaves(nnx.state(a, nnx.Param))
    leaves_b = jax.tree.leaves(nnx.state(b, nnx.Param))
    return len(leaves_a) == len(leaves_b) and all(
        bool(jnp.array_equal(x, y)) for x, y in zip(leaves_a, leaves_b, strict=True))


def n_params(model: nnx.Module) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def x_input() -> np.ndarray:
    cin = 2
    return np.random.default_rng(0).normal(size=(*X_SHAPE, cin)).astype(np.float32)


@pytest.fixture(scope="module")
def small_case():
    """The plain deep-supervision case: torch twin with random weights and our conversion."""
    arch, cfg = CASES["plain_ds"]
    twin = torch_twin(arch, cfg)
    randomize_torch(twin, 0)
    return arch, cfg, twin, convert.from_torch(twin.state_dict(), arch=arch, deep_supervision=True)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_to_jax_same_outputs(case, x_input):
    arch, cfg = CASES[case]
    twin = torch_twin(arch, cfg)
    randomize_torch(twin, 1)
    x = x_input[..., :cfg["input_channels"]]
    # only what weights cannot tell is passed; the rest is read off the state_dict
    runtime = {k: cfg[k] for k in ("deep_supervision", "nonlin_first") if k in cfg}
    model = convert.from_torch(twin.state_dict(), arch=arch, **runtime)
    assert model.config == ours(arch, cfg).config
    assert n_params(model) == sum(p.numel() for p in twin.parameters())
    assert_same_outputs(run_torch(twin, x), run_ours(model, x))


@pytest.mark.parametrize("case", list(CASES))
def test_jax_to_torch_strict_load_same_outputs(case, x_input):
    arch, cfg = CASES[case]
    model = ours(arch, cfg, seed=2)
    randomize_ours(model, 3)
    state = convert.to_torch(model)
    twin = torch_twin(arch, cfg)
    assert set(state) == set(twin.state_dict())
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x = x_input[..., :cfg["input_channels"]]
    assert_same_outputs(run_torch(twin, x), run_ours(model, x))


def test_default_plain_unet_keys_count_and_outputs():
    twin = dna.PlainConvUNet(2, 6, (32, 64, 128, 256, 320, 320), kernel_sizes=3,
                             strides=(1, 2, 2, 2, 2, 2), n_conv_per_stage=2, num_classes=2,
                             n_conv_per_stage_decoder=2, conv_bias=True, **TORCH_COMMON).eval()
    model = nnx.eval_shape(lambda: PlainConvUNet(rngs=nnx.Rngs(0)))
    randomize_ours(model, 5)  # numpy draws: no compile for the init of 31M parameters
    state = convert.to_torch(model)
    assert len(state) == len(twin.state_dict()) == 292
    assert n_params(model) == sum(p.numel() for p in twin.parameters()) == 31_196_458
    twin.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    # torch's InstanceNorm needs > 1 voxel at the bottleneck: 64x32x32 -> 2x1x1
    x = np.random.default_rng(1).normal(size=(1, 64, 32, 32, 2)).astype(np.float32)
    assert_same_outputs(run_torch(twin, x), run_ours(model, x))


def test_default_resenc_keys_and_strict_load():
    twin = dna.ResidualEncoderUNet(2, 6, (32, 64, 128, 256, 320, 320), kernel_sizes=3,
                                   strides=(1, 2, 2, 2, 2, 2),
                                   n_blocks_per_stage=(1, 3, 4, 6, 6, 6), num_classes=2,
                                   n_conv_per_stage_decoder=1, conv_bias=True, **TORCH_COMMON)
    model = nnx.eval_shape(lambda: ResidualEncoderUNet(rngs=nnx.Rngs(0)))
    assert n_params(model) == sum(p.numel() for p in twin.parameters())
    randomize_torch(twin, 4)
    converted = convert.from_torch(twin.state_dict(), arch="resenc_unet")
    assert converted.config == model.config
    state = convert.to_torch(converted)
    assert set(state) == set(twin.state_dict()) and len(state) == 956
    reloaded = dna.ResidualEncoderUNet(2, 6, (32, 64, 128, 256, 320, 320), kernel_sizes=3,
                                       strides=(1, 2, 2, 2, 2, 2),
                                       n_blocks_per_stage=(1, 3, 4, 6, 6, 6), num_classes=2,
                                       n_conv_per_stage_decoder=1, conv_bias=True, **TORCH_COMMON)
    reloaded.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    expected, got = twin.state_dict(), reloaded.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in expected.items())


def test_pth_and_safetensors_round_trip(small_case, tmp_path):
    arch, _, _, model = small_case
    for name in ("w.pth", "w.safetensors"):
        path = io.save_state_dict(convert.to_torch(model), tmp_path / name)
        again = convert.from_torch(str(path), arch=arch, deep_supervision=True)
        assert params_equal(model, again)


def test_checkpoint_containers_and_prefixes(small_case, tmp_path):
    arch, _, twin, model = small_case
    sd = twin.state_dict()
    # the paper's reference checkpoint: wrapper + DataParallel prefixes, optimizer state around
    reference = {"model_state_dict": {f"module.nnunet.{k}": v for k, v in sd.items()},
                 "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 5e-4}]},
                 "epoch": 7, "loss": 0.1}
    torch.save(reference, tmp_path / "nnunet_v2_mim_best.pth")
    loaded = convert.from_torch(str(tmp_path / "nnunet_v2_mim_best.pth"), arch=arch)
    assert params_equal(model, loaded)
    variants = [
        {"model_state_dict": {f"encoder_decoder.{k}": v for k, v in sd.items()}},
        {"network_weights": dict(sd), "current_epoch": 3, "init_args": {"fold": 0}},  # nnU-Net
        {"network_weights": {f"_orig_mod.{k}": v.numpy() for k, v in sd.items()}},  # nnssl, numpy
        {"state_dict": {"model": {f"module._orig_mod.{k}": v for k, v in sd.items()}}},
    ]
    for checkpoint in variants:
        assert params_equal(model, convert.from_torch(checkpoint, arch=arch))


def test_torch_constructor_kwargs_are_understood(small_case):
    arch, cfg, twin, model = small_case
    loaded = convert.from_torch(twin.state_dict(), arch=arch, **TORCH_COMMON, **cfg)
    assert loaded.config == model.config
    with pytest.raises(PetctError, match="norm_op"):
        convert.from_torch(twin.state_dict(), arch=arch, norm_op=nn.BatchNorm3d)
    bf16 = convert.from_torch(twin.state_dict(), arch=arch, dtype="bfloat16", remat="stage")
    assert bf16.dtype == jnp.bfloat16 and bf16.remat == "stage"


def test_mismatches_are_listed(small_case, tmp_path):
    arch, _, twin, _ = small_case
    sd = dict(twin.state_dict())
    with pytest.raises(PetctError, match=r"shape mismatch.*decoder\.seg_layers\.0\.weight"):
        convert.from_torch(sd, arch=arch, num_classes=5)
    # both names of one norm (norm.* and all_modules.1.*), in encoder and decoder.encoder
    gone = re.compile(r"(decoder\.)?encoder\.stages\.1\.0\.convs\.0\.(norm|all_modules\.1)\.")
    broken = {k: v for k, v in sd.items() if not gone.match(k)}
    broken["decoder.extra.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(PetctError) as info:
        convert.from_torch(str(tmp_path / "broken.pth"), arch=arch)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "broken.pth"))
    assert "2 missing keys: encoder.stages.1.0.convs.0.norm.weight, " in message
    assert "1 unexpected key: decoder.extra.weight" in message
    with pytest.raises(PetctError, match="not a resenc_unet state_dict"):
        convert.from_torch(sd, arch="resenc_unet")
    with pytest.raises(PetctError, match="no state_dict found"):
        convert.from_torch({"epoch": 3}, arch=arch)


def test_converting_safetensors_needs_no_torch(small_case, tmp_path):
    arch, _, _, model = small_case
    path = io.save_state_dict(convert.to_torch(model), tmp_path / "w.safetensors")
    code = (
        "import sys\n"
        "import petct_jax, petct_jax.convert, petct_jax.cli, petct_jax.models.registry\n"
        "assert 'torch' not in sys.modules, 'import petct_jax.convert imported torch'\n"
        "assert 'jax' not in sys.modules, 'import petct_jax.convert imported jax'\n"
        "from petct_jax import convert\n"
        f"model = convert.from_torch({str(path)!r}, arch={arch!r})\n"
        "sd = convert.to_torch(model)\n"
        "assert 'torch' not in sys.modules, 'converting .safetensors imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_torch2jax_and_back(small_case, tmp_path, capsys):
    arch, cfg, twin, model = small_case
    torch.save(twin.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "converted"
    assert main(["convert", "torch2jax", "--arch", arch, "--in", str(tmp_path / "w.pth"),
                 "--out", str(out), "--kwargs-json", '{"deep_supervision": true}']) == 0
    restored = convert.load_converted(out)
    assert restored.config == model.config and params_equal(model, restored)
    assert convert.load_converted(out, dtype="bfloat16").dtype == jnp.bfloat16
    with pytest.raises(PetctError, match="does not rebuild"):  # kwargs must describe the model
        convert.save_converted(model, arch, {"num_classes": 3}, tmp_path / "wrong")
    # a second conversion into the same directory is refused (exit status 2, one-line error)
    assert main(["convert", "torch2jax", "--arch", arch, "--in", str(tmp_path / "w.pth"),
                 "--out", str(out)]) == 2
    assert "already holds a converted model" in capsys.readouterr().err
    assert main(["convert", "jax2torch", "--in", str(out),
                 "--out", str(tmp_path / "back.safetensors")]) == 0
    fresh = torch_twin(arch, cfg)
    state = io.read_state_dict(str(tmp_path / "back.safetensors"))
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    expected, got = twin.state_dict(), fresh.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in expected.items())
