"""Sliding-window inference: tile placement, Gaussian map, equality with a naive numpy loop,
padding, mirroring, one compile for every scan size, sharding, and MONAI for comparison."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.ndimage import gaussian_filter

from petct_jax.downstream import inference
from petct_jax.downstream.inference import (gaussian_importance_map, make_predict_fn,
                                            sliding_window_predict, tile_starts)
from petct_jax.errors import PetctError

C, K = 2, 3
WINDOW = (8, 8, 8)
RNG = np.random.default_rng(0)
W = RNG.normal(size=(C, K)).astype(np.float32)
B = RNG.normal(size=(K,)).astype(np.float32)
V = RNG.normal(size=(C, K)).astype(np.float32)
# depends on the position in the window, differently along z, y, x and per class
_r = np.linspace(-1.0, 1.0, WINDOW[0], dtype=np.float32)
RAMP = (_r[:, None, None, None] * np.float32([1.0, 0.2, -0.5])
        + (_r ** 2)[None, :, None, None] * np.float32([0.3, -1.0, 0.1])
        + np.sin(3 * _r)[None, None, :, None] * np.float32([-0.4, 0.6, 1.0])).astype(np.float32)


def f_equivariant(x, xp=np):
    """1x1x1 linear map + tanh + a window-mean term: flip-equivariant, but window-dependent,
    so the blending weights matter."""
    local = xp.tanh(x @ W + B)
    pooled = x.mean(axis=(1, 2, 3), keepdims=True) @ V
    return local + pooled


def f_position(x, xp=np):
    """As f_equivariant plus a term that depends on the position in the window (an odd
    ramp along z, an even one along y, an odd one along x): not flip-equivariant."""
    return f_equivariant(x, xp) + RAMP[None]


@pytest.fixture(scope="module")
def jitted():
    return {"equivariant": jax.jit(lambda x: f_equivariant(x, jnp)),
            "position": jax.jit(lambda x: f_position(x, jnp))}


def naive_reference(f, image, window, overlap=0.5, mirror=False, mirror_axes=(0, 1, 2)):
    """Straightforward numpy: pad centred, nnU-Net tiles, Gaussian from scipy's nD filter."""
    shape = image.shape[:3]
    pads = [((max(w - s, 0)) // 2, max(w - s, 0) - (max(w - s, 0)) // 2) for s, w in zip(shape, window)]
    img = np.pad(image, pads + [(0, 0)])
    starts = []
    for s, w in zip(img.shape[:3], window):
        n = math.ceil((s - w) / (w * (1 - overlap))) + 1
        starts.append([0] if n == 1 else [int(np.round((s - w) / (n - 1) * i)) for i in range(n)])
    delta = np.zeros(window)
    delta[tuple(w // 2 for w in window)] = 1
    g = gaussian_filter(delta, [w / 8 for w in window], 0, mode="constant", cval=0)
    g /= g.max()
    acc = np.zeros(img.shape[:3] + (K,))
    den = np.zeros(img.shape[:3])
    axes = [a + 1 for a in mirror_axes]
    flips = [()] + ([c for r in (1, 2, 3) for c in itertools.combinations(axes, r)] if mirror else [])
    for z, y, x in itertools.product(*starts):
        sl = (slice(z, z + window[0]), slice(y, y + window[1]), slice(x, x + window[2]))
        patch = img[sl][None]
        out = np.mean([np.flip(f(np.flip(patch, ax)), ax) for ax in flips], axis=0)[0]
        acc[sl] += out * g[..., None]
        den[sl] += g
    res = acc / den[..., None]
    return res[tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))]


def _image(shape, seed=1):
    return np.random.default_rng(seed).normal(size=(*shape, C)).astype(np.float32)


def test_tile_starts_follow_nnunet():
    assert tile_starts(20, 8) == [0, 4, 8, 12]
    assert tile_starts(19, 8) == [0, 4, 7, 11]   # 11/3 = 3.67 per step, spread evenly
    assert tile_starts(8, 8) == [0]
    assert tile_starts(9, 8) == [0, 1]
    assert tile_starts(30, 16) == [0, 7, 14]
    assert tile_starts(30, 16, overlap=0.0) == [0, 14]
    for size in range(8, 40):
        s = tile_starts(size, 8)
        assert s[0] == 0 and s[-1] == size - 8
        assert max(np.diff(s), default=0) <= 4  # never a step above window * (1 - overlap)
    with pytest.raises(PetctError):
        tile_starts(7, 8)


def test_gaussian_map_properties():
    g = gaussian_importance_map((8, 12, 10))
    assert g.shape == (8, 12, 10) and g.dtype == np.float32
    assert g.max() == 1.0 and g[4, 6, 5] == 1.0 and np.unravel_index(g.argmax(), g.shape) == (4, 6, 5)
    assert (g > 0).all()
    delta = np.zeros((8, 12, 10))
    delta[4, 6, 5] = 1
    ref = gaussian_filter(delta, [1.0, 1.5, 1.25], 0, mode="constant", cval=0)
    np.testing.assert_allclose(g, ref / ref.max(), rtol=1e-6, atol=1e-12)
    # symmetric about the centre voxel (the window's last voxel has no mirror partner)
    np.testing.assert_allclose(g[4 - 3, 6, 5], g[4 + 3, 6, 5], rtol=1e-6)
    # the profile is a sampled Gaussian with sigma = window / 8: exp(-d²/2σ²)
    assert g[6, 6, 5] == pytest.approx(math.exp(-4 / 2), rel=1e-3)
    # a narrow kernel truncates to zero far away: zeros become the smallest non-zero value
    narrow = gaussian_importance_map((16, 16, 16), sigma_scale=1 / 64)
    assert (narrow > 0).all()
    delta = np.zeros((16, 16, 16))
    delta[8, 8, 8] = 1
    raw = gaussian_filter(delta, 0.25, 0, mode="constant", cval=0)
    assert (raw == 0).any()
    np.testing.assert_allclose(narrow[raw > 0], (raw / raw.max())[raw > 0], rtol=1e-5)
    assert np.all(narrow[raw == 0] == np.float32((raw / raw.max())[raw > 0].min()))


@pytest.mark.parametrize("shape,batch_windows", [((19, 13, 22), 3), ((16, 11, 9), 2)])
def test_equals_naive_reference(jitted, shape, batch_windows):
    image = _image(shape)
    out = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K,
                                 batch_windows=batch_windows)
    assert out.shape == (*shape, K) and out.dtype == np.float32
    ref = naive_reference(f_equivariant, image, WINDOW)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # the weighting matters for this predictor: plain averaging gives something else
    flat = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K,
                                  batch_windows=batch_windows, use_gaussian=False)
    assert np.abs(flat - ref).max() > 1e-3


def test_volume_smaller_than_window(jitted):
    image = _image((5, 13, 7), seed=2)  # z and x padded (centred), y tiled
    out = sliding_window_predict(jitted["position"], image, WINDOW, num_classes=K, batch_windows=2)
    assert out.shape == (5, 13, 7, K)
    np.testing.assert_allclose(out, naive_reference(f_position, image, WINDOW), rtol=1e-5, atol=1e-5)
    tiny = _image((3, 4, 5), seed=3)  # one window, padded on every axis
    out = sliding_window_predict(jitted["position"], tiny, WINDOW, num_classes=K, batch_windows=2)
    padded = np.pad(tiny, [(2, 3), (2, 2), (1, 2), (0, 0)])
    np.testing.assert_allclose(out, f_position(padded[None])[0][2:5, 2:6, 1:6], rtol=1e-5, atol=1e-5)


def test_mirroring(jitted):
    image = _image((12, 10, 9), seed=4)
    plain = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K)
    mirrored = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K, mirror=True)
    np.testing.assert_allclose(mirrored, plain, rtol=1e-5, atol=1e-5)
    # not equivariant: the 8 flipped predictions are averaged (the odd ramps cancel)
    plain = sliding_window_predict(jitted["position"], image, WINDOW, num_classes=K)
    mirrored = sliding_window_predict(jitted["position"], image, WINDOW, num_classes=K, mirror=True)
    assert np.abs(mirrored - plain).max() > 0.1
    np.testing.assert_allclose(mirrored, naive_reference(f_position, image, WINDOW, mirror=True),
                               rtol=1e-5, atol=1e-5)
    assert len(inference.mirror_combinations((0, 1, 2))) == 7
    only_x = sliding_window_predict(jitted["position"], image, WINDOW, num_classes=K, mirror=True,
                                    mirror_axes=(2,))
    ref = naive_reference(f_position, image, WINDOW, mirror=True, mirror_axes=(2,))
    np.testing.assert_allclose(only_x, ref, rtol=1e-5, atol=1e-5)


class _TinyModel(nnx.Module):
    """1x1x1 linear map (nnx.Linear on channels) plus a window-mean term; counts its traces."""

    traces = 0

    def __init__(self, rngs: nnx.Rngs):
        self.local = nnx.Linear(C, K, rngs=rngs)
        self.pooled = nnx.Linear(C, K, use_bias=False, rngs=rngs)

    def __call__(self, x, *, deterministic: bool = True):
        type(self).traces += 1  # Python side effect: runs once per trace only
        return jnp.tanh(self.local(x)) + self.pooled(x.mean(axis=(1, 2, 3), keepdims=True))


def test_one_compile_for_all_scan_sizes():
    model = _TinyModel(nnx.Rngs(0))
    _TinyModel.traces = 0
    predict = make_predict_fn(model)
    a = sliding_window_predict(predict, _image((19, 13, 22)), WINDOW, num_classes=K, batch_windows=2)
    b = sliding_window_predict(predict, _image((9, 30, 8), seed=5), WINDOW, num_classes=K, batch_windows=2,
                               mirror=True)
    c = sliding_window_predict(predict, _image((4, 4, 4), seed=6).astype(np.float64), WINDOW,
                               num_classes=K, batch_windows=2)  # float64 is cast: no new compile
    assert _TinyModel.traces == 1
    if hasattr(predict.apply, "_cache_size"):  # private, but present in jax 0.4 - 0.10
        assert predict.apply._cache_size() == 1
    assert a.shape == (19, 13, 22, K) and b.shape == (9, 30, 8, K) and c.shape == (4, 4, 4, K)
    # same numbers as the model applied directly, through the naive loop
    f = lambda x: np.asarray(model(jnp.asarray(x)))
    np.testing.assert_allclose(a, naive_reference(f, _image((19, 13, 22)), WINDOW), rtol=1e-5, atol=1e-5)
    probs = make_predict_fn(model, probabilities=True)(jnp.asarray(_image((8, 8, 8))[None]))
    np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)


def test_one_device_mesh_and_errors(jitted):
    image = _image((12, 10, 9), seed=7)
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    plain = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K)
    sharded = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K, mesh=mesh)
    np.testing.assert_allclose(sharded, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(PetctError, match="num_classes"):
        sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K + 1)
    with pytest.raises(PetctError, match="Z, Y, X, C"):
        sliding_window_predict(jitted["equivariant"], image[..., 0], WINDOW, num_classes=K)
    bad = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    with pytest.raises(PetctError, match="'data' axis"):
        sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K, mesh=bad)


_TWO_DEVICES = r"""
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from petct_jax.downstream.inference import sliding_window_predict, make_predict_fn
from petct_jax.errors import PetctError
assert jax.device_count() == 2, jax.devices()
model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
seen = []
jitted = jax.jit(lambda x: jnp.tanh(model(x)) + x.mean(axis=(1, 2, 3), keepdims=True).sum(-1, keepdims=True))
def predict(x):
    seen.append(x.sharding)
    return jitted(x)
image = np.random.default_rng(0).normal(size=(12, 10, 9, 2)).astype(np.float32)
a = sliding_window_predict(predict, image, (8, 8, 8), num_classes=3, batch_windows=2, mesh=mesh)
assert len(seen[0].device_set) == 2, seen[0]
b = sliding_window_predict(predict, image, (8, 8, 8), num_classes=3, batch_windows=2)
np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
c = sliding_window_predict(make_predict_fn(model, mesh=mesh), image, (8, 8, 8), num_classes=3,
                           batch_windows=4, mesh=mesh)
try:
    sliding_window_predict(predict, image, (8, 8, 8), num_classes=3, batch_windows=3, mesh=mesh)
except PetctError as e:
    assert "multiple" in str(e)
else:
    raise AssertionError("batch_windows=3 on 2 devices must fail")
print("OK")
"""


def test_two_cpu_devices_subprocess():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                          + " --xla_force_host_platform_device_count=2").strip())
    proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


def test_against_monai(jitted):
    """MONAI's sliding_window_inference (mode="gaussian", sigma_scale=0.125, overlap=0.5).

    Known differences: MONAI steps by int(window / 2) and shifts only the last window back
    (nnU-Net spreads windows evenly), and its Gaussian is centred at (window - 1) / 2,
    untruncated and floored at 1e-3 (nnU-Net: centred at window // 2, scipy-truncated).
    So: (1) with a window-independent per-voxel predictor any weighting cancels, and the
    two must agree exactly on any size, padding included; (2) on a size where the tile
    placements coincide, MONAI given our Gaussian as `roi_weight_map` must reproduce our
    result; (3) with its own Gaussian the result differs (a lot for 8-voxel windows, where
    the half-voxel shift of the centre is half a sigma), but stays nearer to ours than
    plain averaging does.
    """
    torch = pytest.importorskip("torch")
    monai_utils = pytest.importorskip("monai.inferers.utils")
    from monai.data.utils import dense_patch_slices

    def monai_predict(f, image, window=WINDOW, **kw):
        x = torch.from_numpy(np.moveaxis(image, -1, 0)[None].copy())
        torch_fn = lambda t: torch.from_numpy(np.moveaxis(
            f(np.moveaxis(t.numpy(), 1, -1)), -1, 1).copy())
        out = monai_utils.sliding_window_inference(x, window, 2, torch_fn, overlap=0.5, **kw)
        return np.moveaxis(out[0].numpy(), 0, -1)

    local = lambda x: np.tanh(x @ W + B).astype(np.float32)
    image = _image((19, 5, 22), seed=8)  # placements differ along z and x, y is padded
    ours = sliding_window_predict(jax.jit(lambda x: jnp.tanh(x @ W + B)), image, WINDOW, num_classes=K)
    theirs = monai_predict(local, image, mode="gaussian", sigma_scale=0.125)
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    monai_z = [s[0].start for s in dense_patch_slices((19, 8, 8), WINDOW, (4, 4, 4))]
    assert sorted(set(monai_z)) == [0, 4, 8, 11] and tile_starts(19, 8) == [0, 4, 7, 11]

    image = _image((16, 12, 20), seed=9)  # size - window a multiple of 4 on every axis: same tiles
    f = lambda x: f_position(x).astype(np.float32)
    ours = sliding_window_predict(jitted["position"], image, WINDOW, num_classes=K)
    same_map = monai_predict(f, image, mode="gaussian",
                             roi_weight_map=torch.from_numpy(gaussian_importance_map(WINDOW)))
    np.testing.assert_allclose(ours, same_map, rtol=1e-5, atol=1e-5)
    # constant weights (eval.window_weights="constant", finetune.py:paper) are MONAI's default,
    # which the reference's sliding_window_inference calls use
    flat = sliding_window_predict(jitted["position"], image, WINDOW, num_classes=K, use_gaussian=False)
    np.testing.assert_allclose(flat, monai_predict(f, image), rtol=1e-5, atol=1e-5)
    assert np.abs(flat - ours).max() > 1e-3

    window = (16, 16, 16)  # MONAI's own map: differs, but is nearer to ours than plain averaging
    image = _image((24, 32, 40), seed=10)
    predict = jax.jit(lambda x: f_equivariant(x, jnp))
    ours = sliding_window_predict(predict, image, window, num_classes=K)
    flat = sliding_window_predict(predict, image, window, num_classes=K, use_gaussian=False)
    own_map = monai_predict(lambda x: f_equivariant(x).astype(np.float32), image, window=window,
                            mode="gaussian", sigma_scale=0.125)
    diff = np.abs(ours - own_map).mean()  # measured 0.0036, against 0.0083 for plain averaging
    assert 0 < diff < 0.6 * np.abs(ours - flat).mean()


def test_accumulation_runs_on_the_device_in_a_donated_buffer(jitted):
    shape = (19, 13, 22)
    image = _image(shape)
    ref = naive_reference(f_equivariant, image, WINDOW)
    # reduced-precision accumulation: the same result to bfloat16's ~3 digits
    low = sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K,
                                 batch_windows=3, accumulate_dtype=jnp.bfloat16)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, ref, rtol=2e-2, atol=2e-2)
    assert np.abs(low - ref).max() > 0  # it really accumulated in bfloat16
    with pytest.raises(PetctError, match="accumulate_dtype must be float32, bfloat16 or float16"):
        sliding_window_predict(jitted["equivariant"], image, WINDOW, num_classes=K,
                               accumulate_dtype=np.int32)
    # the accumulator is updated in place: XLA aliases the donated input to the output
    acc = jax.ShapeDtypeStruct((*shape, K), jnp.float32)
    out = jax.ShapeDtypeStruct((3, *WINDOW, K), jnp.float32)
    starts = jax.ShapeDtypeStruct((3, 3), jnp.int32)
    compiled = inference._accumulate.lower(acc, out, starts, 3).compile()
    assert compiled.memory_analysis().alias_size_in_bytes == math.prod(shape) * K * 4
