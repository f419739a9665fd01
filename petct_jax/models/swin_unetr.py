"""Swin UNETR (v2) in Flax NNX, numerically matching MONAI 1.6.1's ``SwinUNETR``.

The network is the one the paper pretrains as its transformer family
(``use_v2=True``, ``downsample="mergingv2"``, instance norm, heads 3-6-12-24, window 7,
patch 2). Every operation follows ``monai/networks/nets/swin_unetr.py``,
``blocks/unetr_block.py`` and ``blocks/dynunet_block.py`` of MONAI 1.6.1, including its
quirks, so that weights move both ways through :mod:`petct_jax.convert.monai`:

- windows shrink to the feature map where the map is not larger than the window (and
  the shift is dropped on that axis); the relative-position index is then the *top-left
  slice* ``[:n, :n]`` of the full-window index, as in MONAI;
- feature maps are zero-padded to a window multiple *after* ``norm1``, and padded tokens
  are not masked (only shifted-window regions are, with -100);
- the five hidden states handed to the decoder are layer-normalised without affine
  parameters (``normalize=True``), while the stages themselves consume the raw states;
- instance norm is ``InstanceNorm3d`` (eps 1e-5, ``affine=False`` unless
  ``norm_name=("instance", {"affine": True})``); the v2 residual blocks before each stage
  always use plain ``"instance"``, as MONAI hard-codes it;
- MONAI's convolutions inside ``UnetResBlock`` and the transposed convolutions have no
  bias; only the patch embedding and the output head have one.

Layout: channels-last ``(B, Z, Y, X, C)`` everywhere; our (Z, Y, X) are torch's (D, H, W),
which are also the (d, h, w) axes MONAI's transformer uses internally, so windows,
shifts and the patch-merging order line up axis for axis.

Kernel layouts (see :mod:`petct_jax.convert.monai` for the torch mapping):
convolutions ``(kZ, kY, kX, C_in, C_out)``; linear ``(C_in, C_out)``; the kernel = stride
= 2 transposed convolution ``(2, 2, 2, C_in, C_out)``, applied as a dense matmul followed
by depth-to-space (XLA's strided transposed 3D convolution is very slow).

Mixed precision: ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay
in ``param_dtype``; layer/instance-norm statistics, attention logits and softmax are
computed in float32; the logits returned are float32.

Rematerialisation (``remat``): ``None`` keeps every activation; ``"stage"`` wraps each
Swin stage (v2 conv block + transformer blocks + patch merging), each encoder block and
each decoder block in ``jax.checkpoint`` so only stage boundaries are stored;
``"stage_dots"`` does the same with the policy
``jax.checkpoint_policies.dots_with_no_batch_dims_saveable``, which additionally keeps
the outputs of the dense layers (qkv, projections, MLP, patch merging, upsampling
matmul) and recomputes the cheap elementwise work, convolutions and window attention.

Stochastic depth (``drop_path_rate``, linearly increasing over all transformer blocks as
in MONAI) is active only with ``deterministic=False``; its keys come from the
``'dropout'`` stream of the ``rngs`` given to the constructor (or to the call).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from petct_jax.errors import PetctError
from petct_jax.models.instance_norm import instance_norm_act

__all__ = ["PRESETS", "SwinUNETR", "parse_norm_name"]

# The paper's three sizes (method.md): ~18.3M / ~74.6M / ~319.2M parameters with 2 in / 2 out.
PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(depths=(2, 2, 2, 2), feature_size=24, num_heads=(3, 6, 12, 24), drop_path_rate=0.05),
    "base": dict(depths=(2, 2, 6, 2), feature_size=48, num_heads=(3, 6, 12, 24), drop_path_rate=0.05),
    "large": dict(depths=(2, 2, 18, 2), feature_size=96, num_heads=(3, 6, 12, 24), drop_path_rate=0.05),
}

_EPS = 1e-5  # torch LayerNorm / InstanceNorm3d / F.layer_norm default
_MASK_VALUE = -100.0  # MONAI's compute_mask fill value (not -inf)
_DIVISOR = 32  # patch 2 then four 2x mergings
_REMAT_MODES = (None, "stage", "stage_dots")


# --------------------------------------------------------------------------- helpers


def _triple(v: int | Sequence[int], name: str) -> tuple[int, int, int]:
    if isinstance(v, int | np.integer):
        return (int(v),) * 3
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise PetctError(f"SwinUNETR: {name} must be an int or 3 ints, got {v!r}")
    return t  # type: ignore[return-value]


def parse_norm_name(norm_name: Any) -> bool:
    """Return whether MONAI's ``norm_name`` asks for an affine instance norm.

    Only instance norm is supported (``"instance"`` or ``("instance", {"affine": bool,
    "eps": 1e-5})``); anything else raises :class:`PetctError`.
    """
    if isinstance(norm_name, str):
        name, args = norm_name, {}
    elif isinstance(norm_name, Sequence) and len(norm_name) == 2 and isinstance(norm_name[1], dict):
        name, args = norm_name[0], dict(norm_name[1])
    else:
        raise PetctError(f"SwinUNETR: unsupported norm_name {norm_name!r} (use 'instance')")
    if str(name).lower() != "instance":
        raise PetctError(f"SwinUNETR: unsupported norm_name {norm_name!r}; only instance norm is implemented")
    affine = bool(args.pop("affine", False))
    eps = args.pop("eps", _EPS)
    if not math.isclose(float(eps), _EPS) or args:
        raise PetctError(f"SwinUNETR: unsupported instance-norm arguments in norm_name {norm_name!r}")
    return affine


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _random_flat(key: jax.Array, scale: jax.Array, size: int, normal: bool, dtype: Any) -> jax.Array:
    if normal:
        return (scale * jax.random.truncated_normal(key, -2.0 / scale, 2.0 / scale, (size,), jnp.float32)
                ).astype(dtype)
    return jax.random.uniform(key, (size,), jnp.float32, -scale, scale).astype(dtype)


def _random(rngs: nnx.Rngs, shape: Sequence[int], scale: float, dtype: Any, *, normal: bool = False) -> jax.Array:
    """U(-scale, scale) (or N(0, scale) truncated at +-2 absolute) of ``shape``.

    Drawn as a flat vector whose length is rounded up to a power of two, then cut and
    reshaped: eagerly that compiles one small program per length bucket instead of one
    per parameter shape (building a tiny model eagerly on CPU went from ~35 s to ~5 s), and
    the values are the same whether the model is built eagerly or under jit/eval_shape.
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    flat = _random_flat(rngs.params(), jnp.float32(scale), max(64, 1 << (n - 1).bit_length()), normal, dtype)
    try:
        return jnp.asarray(np.asarray(flat)[:n].reshape(shape))
    except jax.errors.TracerArrayConversionError:
        return flat[:n].reshape(shape)


def _torch_uniform(rngs: nnx.Rngs, shape: Sequence[int], fan_in: int, dtype: Any) -> jax.Array:
    """torch's default init for Linear/Conv weights and biases: U(-1/sqrt(fan_in), +)."""
    return _random(rngs, shape, 1.0 / math.sqrt(fan_in), dtype)


def _const(shape: Sequence[int], value: float, dtype: Any) -> jax.Array:
    return jnp.asarray(np.full(tuple(shape), value, np.float32), dtype)  # no per-shape compile when eager


def _norm_f32(x: jax.Array, axes: tuple[int, ...], scale: jax.Array | None, bias: jax.Array | None,
              dtype: Any) -> jax.Array:
    """Normalise over ``axes`` with float32 statistics (biased variance, eps 1e-5)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + _EPS)
    if scale is not None:
        y = y * scale.astype(jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def _get_window_size(size: Sequence[int], window: Sequence[int], shift: Sequence[int]
                     ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """MONAI ``get_window_size``: an axis not larger than the window becomes one window, unshifted."""
    w, s = list(window), list(shift)
    for i, n in enumerate(size):
        if n <= window[i]:
            w[i] = n
            s[i] = 0
    return tuple(w), tuple(s)


@functools.cache
def _relative_position_index(window: tuple[int, int, int]) -> np.ndarray:
    """Swin's relative-position index for a full (nominal) window, shape (N, N), int64."""
    coords = np.stack(np.meshgrid(*[np.arange(w) for w in window], indexing="ij")).reshape(3, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel = rel + np.array([w - 1 for w in window])
    rel = rel * np.array([(2 * window[1] - 1) * (2 * window[2] - 1), 2 * window[2] - 1, 1])
    return rel.sum(-1).astype(np.int64)


@functools.cache
def _shift_region_ids(padded: tuple[int, int, int], window: tuple[int, ...], shift: tuple[int, ...]) -> np.ndarray:
    """Region label of every token of every window, (nW, N), as MONAI's ``compute_mask``.

    Two tokens of a window attend without penalty iff their labels are equal. The slices
    reproduce MONAI's exactly, including its behaviour for a zero shift on one axis.
    """
    img = np.zeros(padded, np.int32)
    cnt = 0
    for d in (slice(-window[0]), slice(-window[0], -shift[0]), slice(-shift[0], None)):
        for h in (slice(-window[1]), slice(-window[1], -shift[1]), slice(-shift[1], None)):
            for w in (slice(-window[2]), slice(-window[2], -shift[2]), slice(-shift[2], None)):
                img[d, h, w] = cnt
                cnt += 1
    return _window_partition(img[None, ..., None], window, xp=np)[0, ..., 0]


def _window_partition(x, window: Sequence[int], xp=jnp):
    """(B, D, H, W, C) -> (B, nW, N, C), windows in MONAI's (d, h, w) raster order."""
    b, d, h, w, c = x.shape
    x = x.reshape(b, d // window[0], window[0], h // window[1], window[1], w // window[2], window[2], c)
    x = xp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))
    return x.reshape(b, -1, window[0] * window[1] * window[2], c)


def _window_reverse(x: jax.Array, window: Sequence[int], dims: Sequence[int]) -> jax.Array:
    """(B, nW, N, C) -> (B, D, H, W, C); inverse of :func:`_window_partition`."""
    b, c = x.shape[0], x.shape[-1]
    d, h, w = dims
    x = x.reshape(b, d // window[0], h // window[1], w // window[2], window[0], window[1], window[2], c)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))
    return x.reshape(b, d, h, w, c)


def _drop_path(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Stochastic depth per sample (MONAI ``DropPath``, scale_by_keep=True)."""
    if key is None or rate <= 0.0:
        return x
    keep = 1.0 - rate
    mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


# --------------------------------------------------------------------------- layers


class _Linear(nnx.Module):
    def __init__(self, cin: int, cout: int, *, bias: bool = True, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        self.kernel = nnx.Param(_torch_uniform(rngs, (cin, cout), cin, param_dtype))
        self.bias = nnx.Param(_torch_uniform(rngs, (cout,), cin, param_dtype)) if bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class _LayerNorm(nnx.Module):
    def __init__(self, c: int, *, dtype: Any, param_dtype: Any):
        self.scale = nnx.Param(_const((c,), 1.0, param_dtype))
        self.bias = nnx.Param(_const((c,), 0.0, param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _norm_f32(x, (-1,), self.scale[...], self.bias[...], self.dtype)


class _InstanceNorm(nnx.Module):
    def __init__(self, c: int, *, affine: bool, dtype: Any, param_dtype: Any):
        self.scale = nnx.Param(_const((c,), 1.0, param_dtype)) if affine else None
        self.bias = nnx.Param(_const((c,), 0.0, param_dtype)) if affine else None
        self.dtype = dtype

    def __call__(self, x: jax.Array, negative_slope: float | None = None) -> jax.Array:
        c = x.shape[-1]
        scale = jnp.ones((c,), jnp.float32) if self.scale is None else self.scale[...]
        bias = jnp.zeros((c,), jnp.float32) if self.bias is None else self.bias[...]
        return instance_norm_act(x, scale, bias, eps=_EPS, negative_slope=negative_slope
                                 ).astype(self.dtype)


class _Conv(nnx.Module):
    """3D convolution, stride 1, 'same' padding (k // 2 on each side, as MONAI's get_padding)."""

    def __init__(self, cin: int, cout: int, k: int, *, bias: bool, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        fan_in = cin * k**3
        self.kernel = nnx.Param(_torch_uniform(rngs, (k, k, k, cin, cout), fan_in, param_dtype))
        self.bias = nnx.Param(_torch_uniform(rngs, (cout,), fan_in, param_dtype)) if bias else None
        self.k = k
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if self.k == 1:
            y = jnp.dot(x, kernel[0, 0, 0])
        else:
            p = self.k // 2
            y = jax.lax.conv_general_dilated(x, kernel, (1, 1, 1), ((p, p),) * 3,
                                             dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class _ResBlock(nnx.Module):
    """MONAI ``UnetResBlock`` with stride 1 (the ``.layer`` of ``UnetrBasicBlock``)."""

    def __init__(self, cin: int, cout: int, *, affine: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.conv1 = _Conv(cin, cout, 3, bias=False, rngs=rngs, **kw)
        self.conv2 = _Conv(cout, cout, 3, bias=False, rngs=rngs, **kw)
        self.norm1 = _InstanceNorm(cout, affine=affine, **kw)
        self.norm2 = _InstanceNorm(cout, affine=affine, **kw)
        if cin != cout:
            self.conv3 = _Conv(cin, cout, 1, bias=False, rngs=rngs, **kw)
            self.norm3 = _InstanceNorm(cout, affine=affine, **kw)
        else:
            self.conv3 = None
            self.norm3 = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.norm1(self.conv1(x), 0.01)
        out = self.norm2(self.conv2(out))
        res = x if self.conv3 is None else self.norm3(self.conv3(x))
        return jax.nn.leaky_relu(out + res.astype(out.dtype), 0.01)


class _UpBlock(nnx.Module):
    """MONAI ``UnetrUpBlock`` (res_block=True): 2x transposed conv, concat skip, res block."""

    def __init__(self, cin: int, cout: int, *, affine: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        # torch ConvTranspose3d's default init takes fan_in from weight dim 1 (= C_out) * k^3.
        self.transp_kernel = nnx.Param(_torch_uniform(rngs, (2, 2, 2, cin, cout), cout * 8, param_dtype))
        self.conv_block = _ResBlock(2 * cout, cout, affine=affine, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: jax.Array, skip: jax.Array) -> jax.Array:
        b, z, y, xx, _ = x.shape
        k = self.transp_kernel[...].astype(self.dtype)
        # Kernel = stride = 2: each input voxel writes its own 2x2x2 block (depth-to-space).
        up = jnp.einsum("bzyxc,ijkco->bzyxijko", x.astype(self.dtype), k)
        up = jnp.transpose(up, (0, 1, 4, 2, 5, 3, 6, 7)).reshape(b, 2 * z, 2 * y, 2 * xx, k.shape[-1])
        return self.conv_block(jnp.concatenate([up, skip.astype(self.dtype)], axis=-1))


class _OutBlock(nnx.Module):
    """MONAI ``UnetOutBlock``: 1x1x1 convolution with bias."""

    def __init__(self, cin: int, cout: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.conv = _Conv(cin, cout, 1, bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class _PatchEmbed(nnx.Module):
    """Conv with kernel = stride = patch 2, applied as space-to-depth + matmul."""

    def __init__(self, cin: int, cout: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        fan_in = cin * 8
        self.kernel = nnx.Param(_torch_uniform(rngs, (2, 2, 2, cin, cout), fan_in, param_dtype))
        self.bias = nnx.Param(_torch_uniform(rngs, (cout,), fan_in, param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        b, z, y, xx, c = x.shape
        x = x.astype(self.dtype).reshape(b, z // 2, 2, y // 2, 2, xx // 2, 2, c)
        x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7)).reshape(b, z // 2, y // 2, xx // 2, 8 * c)
        k = self.kernel[...].astype(self.dtype).reshape(8 * c, -1)
        return jnp.dot(x, k) + self.bias[...].astype(self.dtype)


class _WindowAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], *, dtype: Any, param_dtype: Any,
                 rngs: nnx.Rngs):
        if dim % heads:
            raise PetctError(f"SwinUNETR: stage width {dim} is not divisible by its {heads} heads")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        n_rel = (2 * window[0] - 1) * (2 * window[1] - 1) * (2 * window[2] - 1)
        # MONAI: trunc_normal_(std=0.02, a=-2, b=2).
        self.relative_position_bias_table = nnx.Param(_random(rngs, (n_rel, heads), 0.02, param_dtype, normal=True))
        self.qkv = _Linear(dim, 3 * dim, **kw)
        self.proj = _Linear(dim, dim, **kw)
        self.heads = heads
        self.window = window
        self.scale = (dim // heads) ** -0.5
        self.dtype = dtype

    def __call__(self, x: jax.Array, region_ids: np.ndarray | None) -> jax.Array:
        b, nw, n, c = x.shape
        h = self.heads
        qkv = self.qkv(x).reshape(b, nw, n, 3, h, c // h)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        q = q * jnp.asarray(self.scale, q.dtype)
        logits = jnp.einsum("bwnhd,bwmhd->bwhnm", q, k, preferred_element_type=jnp.float32)
        # MONAI slices the full-window index to the (possibly smaller) actual window.
        idx = _relative_position_index(self.window)[:n, :n].reshape(-1)
        bias = self.relative_position_bias_table[...].astype(jnp.float32)[idx].reshape(n, n, h)
        logits = logits + jnp.transpose(bias, (2, 0, 1))
        if region_ids is not None:
            ids = jnp.asarray(region_ids)
            mask = jnp.where(ids[:, :, None] == ids[:, None, :], 0.0, _MASK_VALUE).astype(jnp.float32)
            logits = logits + mask[None, :, None]
        attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bwhnm,bwmhd->bwnhd", attn, v.astype(self.dtype)).reshape(b, nw, n, c)
        return self.proj(out)


class _Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.linear1 = _Linear(dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear2 = _Linear(hidden, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(jax.nn.gelu(self.linear1(x), approximate=False))


class _SwinBlock(nnx.Module):
    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], drop_path: float, *, dtype: Any,
                 param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = _LayerNorm(dim, **kw)
        self.attn = _WindowAttention(dim, heads, window, rngs=rngs, **kw)
        self.norm2 = _LayerNorm(dim, **kw)
        self.mlp = _Mlp(dim, 4 * dim, rngs=rngs, **kw)
        self.drop_path = float(drop_path)

    def __call__(self, x: jax.Array, window: tuple[int, ...], shift: tuple[int, ...],
                 region_ids: np.ndarray | None, key: jax.Array | None) -> jax.Array:
        d, h, w = x.shape[1:4]
        k1, k2 = (None, None) if key is None else tuple(jax.random.split(key))
        shortcut = x
        y = self.norm1(x)
        pads = [(0, (ws - s % ws) % ws) for s, ws in zip((d, h, w), window)]
        y = jnp.pad(y, [(0, 0), *pads, (0, 0)])
        padded = y.shape[1:4]
        shifted = any(s > 0 for s in shift)
        if shifted:
            y = jnp.roll(y, tuple(-s for s in shift), axis=(1, 2, 3))
        y = self.attn(_window_partition(y, window), region_ids if shifted else None)
        y = _window_reverse(y, window, padded)
        if shifted:
            y = jnp.roll(y, tuple(shift), axis=(1, 2, 3))
        y = y[:, :d, :h, :w]
        x = shortcut + _drop_path(y, self.drop_path, k1)
        return x + _drop_path(self.mlp(self.norm2(x)), self.drop_path, k2)


class _PatchMerging(nnx.Module):
    """MONAI ``PatchMergingV2`` (``v2=True``) or the v0.9 ``PatchMerging`` (8 slices reordered)."""

    # Position of MONAI v1's x0..x7 = (0,0,0),(1,0,0),(0,1,0),(0,0,1),(1,1,0),(1,0,1),(0,1,1),(1,1,1)
    # in the v2 order itertools.product(range(2), repeat=3).
    _V1_ORDER = (0, 4, 2, 1, 6, 5, 3, 7)

    def __init__(self, dim: int, *, v2: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.norm = _LayerNorm(8 * dim, dtype=dtype, param_dtype=param_dtype)
        self.reduction = _Linear(8 * dim, 2 * dim, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.v2 = v2

    def __call__(self, x: jax.Array) -> jax.Array:
        b, d, h, w, c = x.shape
        if d % 2 or h % 2 or w % 2:
            x = jnp.pad(x, [(0, 0), (0, d % 2), (0, h % 2), (0, w % 2), (0, 0)])
            b, d, h, w, c = x.shape
        x = x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c)
        x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7)).reshape(b, d // 2, h // 2, w // 2, 8, c)
        if not self.v2:
            x = x[..., self._V1_ORDER, :]
        x = x.reshape(b, d // 2, h // 2, w // 2, 8 * c)
        return self.reduction(self.norm(x))


class _SwinStage(nnx.Module):
    """One MONAI ``BasicLayer`` (plus the v2 ``UnetrBasicBlock`` that precedes it)."""

    def __init__(self, dim: int, depth: int, heads: int, window: tuple[int, int, int], drop_paths: Sequence[float],
                 *, use_v2: bool, v2_merging: bool, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_block = _ResBlock(dim, dim, affine=False, **kw) if use_v2 else None
        self.blocks = nnx.List([_SwinBlock(dim, heads, window, drop_paths[i], **kw) for i in range(depth)])
        self.downsample = _PatchMerging(dim, v2=v2_merging, **kw)
        self.window = window

    def __call__(self, x: jax.Array, keys: tuple[jax.Array, ...] | None) -> jax.Array:
        if self.conv_block is not None:
            x = self.conv_block(x)
        size = x.shape[1:4]
        window, shift = _get_window_size(size, self.window, tuple(w // 2 for w in self.window))
        padded = tuple(-(-s // w) * w for s, w in zip(size, window))
        region_ids = _shift_region_ids(padded, window, shift) if any(shift) else None
        for i, blk in enumerate(self.blocks):
            blk_shift = shift if i % 2 else (0, 0, 0)
            x = blk(x, window, blk_shift, region_ids, None if keys is None else keys[i])
        return self.downsample(x)


def _proj_out(x: jax.Array) -> jax.Array:
    """MONAI ``SwinTransformer.proj_out(normalize=True)``: layer norm without affine."""
    return _norm_f32(x, (-1,), None, None, x.dtype)


# --------------------------------------------------------------------------- model


class SwinUNETR(nnx.Module):
    """MONAI 1.6.1 ``SwinUNETR`` (3D, patch 2) in Flax NNX, channels-last.

    ``(B, Z, Y, X, in_channels) -> (B, Z, Y, X, out_channels)`` float32 logits; every
    spatial size must be divisible by 32, and not all three may be 32 (a one-voxel
    bottleneck, which MONAI's instance norm refuses). ``features`` returns the decoder output before
    the head (``"decoder"``, ``(B, Z, Y, X, feature_size)``) and the deepest features
    (``"bottleneck"``, ``encoder10`` output, ``(B, Z/32, Y/32, X/32, 16 * feature_size)``).
    """

    def __init__(
        self,
        *,
        in_channels: int = 2,
        out_channels: int = 2,
        feature_size: int = 24,
        depths: Sequence[int] = (2, 2, 2, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int | Sequence[int] = 7,
        drop_path_rate: float = 0.0,
        use_v2: bool = True,
        downsample: str = "mergingv2",
        norm_name: str | tuple = "instance",
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str | None = None,
        rngs: nnx.Rngs,
    ):
        if feature_size % 12:
            raise PetctError(f"SwinUNETR: feature_size {feature_size} must be divisible by 12 (MONAI's constraint)")
        if len(depths) != 4 or len(num_heads) != 4:
            raise PetctError(f"SwinUNETR: depths {tuple(depths)} and num_heads {tuple(num_heads)} need 4 stages")
        if not 0.0 <= drop_path_rate <= 1.0:
            raise PetctError(f"SwinUNETR: drop_path_rate {drop_path_rate} outside [0, 1]")
        if downsample not in ("merging", "mergingv2"):
            raise PetctError(f"SwinUNETR: downsample {downsample!r} must be 'merging' or 'mergingv2'")
        if remat not in _REMAT_MODES:
            raise PetctError(f"SwinUNETR: remat {remat!r} must be one of {_REMAT_MODES}")
        affine = parse_norm_name(norm_name)
        window = _triple(window_size, "window_size")

        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.feature_size = int(feature_size)
        self.depths = tuple(int(d) for d in depths)
        self.num_heads = tuple(int(h) for h in num_heads)
        self.window_size = window
        self.drop_path_rate = float(drop_path_rate)
        self.use_v2 = bool(use_v2)
        self.downsample = downsample
        self.norm_affine = affine  # the only thing norm_name decides (kept hashable for the graphdef)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.remat = remat

        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        f = self.feature_size
        # torch.linspace(0, rate, n) in float32, as MONAI.
        dpr = np.linspace(0.0, self.drop_path_rate, sum(self.depths), dtype=np.float32).tolist()
        self.patch_embed = _PatchEmbed(self.in_channels, f, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        stages = []
        for i in range(4):
            lo = sum(self.depths[:i])
            stages.append(_SwinStage(f * 2**i, self.depths[i], self.num_heads[i], window,
                                     dpr[lo:lo + self.depths[i]], use_v2=self.use_v2,
                                     v2_merging=downsample == "mergingv2", **kw))
        self.stages = nnx.List(stages)
        self.encoder1 = _ResBlock(self.in_channels, f, affine=affine, **kw)
        self.encoder2 = _ResBlock(f, f, affine=affine, **kw)
        self.encoder3 = _ResBlock(2 * f, 2 * f, affine=affine, **kw)
        self.encoder4 = _ResBlock(4 * f, 4 * f, affine=affine, **kw)
        self.encoder10 = _ResBlock(16 * f, 16 * f, affine=affine, **kw)
        self.decoder5 = _UpBlock(16 * f, 8 * f, affine=affine, **kw)
        self.decoder4 = _UpBlock(8 * f, 4 * f, affine=affine, **kw)
        self.decoder3 = _UpBlock(4 * f, 2 * f, affine=affine, **kw)
        self.decoder2 = _UpBlock(2 * f, f, affine=affine, **kw)
        self.decoder1 = _UpBlock(f, f, affine=affine, **kw)
        self.head = _OutBlock(f, self.out_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Own stream for stochastic depth, so drop-path masks do not depend on init order.
        self.dropout_rngs = rngs["dropout"].fork() if self.drop_path_rate > 0 else None

    @property
    def config(self) -> dict[str, Any]:
        """Constructor arguments that rebuild this network (without dtype/param_dtype/remat/rngs)."""
        window = self.window_size[0] if len(set(self.window_size)) == 1 else self.window_size
        return {
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "feature_size": self.feature_size, "depths": self.depths, "num_heads": self.num_heads,
            "window_size": window, "drop_path_rate": self.drop_path_rate, "use_v2": self.use_v2,
            "downsample": self.downsample,
            "norm_name": ("instance", {"affine": True}) if self.norm_affine else "instance",
        }

    # ------------------------------------------------------------------ plumbing

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise PetctError(f"SwinUNETR: expected input (B, Z, Y, X, {self.in_channels}), got {tuple(x.shape)}")
        bad = [s for s in x.shape[1:4] if s % _DIVISOR]
        if bad:
            raise PetctError(f"SwinUNETR: spatial shape {tuple(x.shape[1:4])} must be divisible by {_DIVISOR} "
                             f"on every axis (patch 2 and four 2x mergings)")
        if all(s == _DIVISOR for s in x.shape[1:4]):
            # The bottleneck would be one voxel: its instance norm is undefined (MONAI raises too).
            raise PetctError(f"SwinUNETR: input {tuple(x.shape[1:4])} leaves a 1x1x1 bottleneck; "
                             f"use at least 64 voxels on one axis")

    def _apply(self, module: nnx.Module, *args: Any) -> jax.Array:
        """Call ``module(*args)``, inside ``jax.checkpoint`` when remat is on."""
        if self.remat is None:
            return module(*args)
        policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "stage_dots" else None
        graphdef, state = nnx.split(module)

        def run(state, *args):
            return nnx.merge(graphdef, state)(*args)

        return jax.checkpoint(run, policy=policy, prevent_cse=True)(state, *args)

    def _drop_path_keys(self, deterministic: bool, rngs: Any) -> list[tuple[jax.Array, ...] | None]:
        if deterministic or self.drop_path_rate <= 0.0:
            return [None] * 4
        if rngs is None:
            if self.dropout_rngs is None:
                raise PetctError("SwinUNETR: deterministic=False needs rngs (none were kept at construction)")
            key = self.dropout_rngs()
        elif isinstance(rngs, nnx.Rngs):
            key = rngs["dropout"]()
        elif isinstance(rngs, nnx.RngStream):
            key = rngs()
        else:
            key = rngs
        keys = jax.random.split(key, sum(self.depths))
        out, lo = [], 0
        for d in self.depths:
            out.append(tuple(keys[lo + i] for i in range(d)))
            lo += d
        return out

    # ------------------------------------------------------------------ API

    def features(self, x: jax.Array, *, deterministic: bool = True, rngs: Any = None) -> dict[str, jax.Array]:
        """Decoder features before the head and the bottleneck (see the class docstring).

        ``rngs`` (an ``nnx.Rngs``, ``nnx.RngStream`` or a key) overrides the stream kept at
        construction for stochastic depth; it is only used with ``deterministic=False``.
        """
        self._check_input(x)
        x = jnp.asarray(x).astype(self.dtype)
        keys = self._drop_path_keys(deterministic, rngs)
        x0 = self.patch_embed(x)
        hidden = [_proj_out(x0)]
        h = x0
        for stage, k in zip(self.stages, keys):
            h = self._apply(stage, h, k)
            hidden.append(_proj_out(h))
        enc0 = self._apply(self.encoder1, x)
        enc1 = self._apply(self.encoder2, hidden[0])
        enc2 = self._apply(self.encoder3, hidden[1])
        enc3 = self._apply(self.encoder4, hidden[2])
        dec4 = self._apply(self.encoder10, hidden[4])
        dec3 = self._apply(self.decoder5, dec4, hidden[3])
        dec2 = self._apply(self.decoder4, dec3, enc3)
        dec1 = self._apply(self.decoder3, dec2, enc2)
        dec0 = self._apply(self.decoder2, dec1, enc1)
        out = self._apply(self.decoder1, dec0, enc0)
        return {"decoder": out, "bottleneck": dec4}

    def apply_head(self, decoder_features: jax.Array) -> jax.Array:
        """The output head (MONAI ``out``) on decoder features; float32 logits."""
        return self.head(decoder_features).astype(jnp.float32)

    def __call__(self, x: jax.Array, *, deterministic: bool = True, rngs: Any = None) -> jax.Array:
        return self.apply_head(self.features(x, deterministic=deterministic, rngs=rngs)["decoder"])

    def reinit_head(self, rngs: nnx.Rngs, out_channels: int | None = None) -> None:
        """Replace the head by a freshly initialised one (torch default init), optionally resized."""
        if out_channels is not None:
            self.out_channels = int(out_channels)
        self.head = _OutBlock(self.feature_size, self.out_channels, dtype=self.dtype,
                              param_dtype=self.param_dtype, rngs=rngs)
