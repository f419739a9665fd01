"""Weight exchange between MONAI 1.6.1's ``SwinUNETR`` and :class:`petct_jax.models.swin_unetr.SwinUNETR`.

``from_torch_state(sd, **kwargs)`` builds our model from a MONAI state_dict (numpy arrays,
or anything ``np.asarray`` accepts); ``to_torch_state(model)`` returns a state_dict of
numpy arrays that loads with ``strict=True`` into
``monai.networks.nets.SwinUNETR(**monai_kwargs(model))``. Neither imports torch.

Layouts (torch -> ours): Linear ``weight (O, I)`` -> ``kernel (I, O)``; Conv3d
``weight (O, I, kD, kH, kW)`` -> ``(kD, kH, kW, I, O)``; ConvTranspose3d
``weight (I, O, kD, kH, kW)`` -> ``(kD, kH, kW, I, O)`` (no flip: we apply it as a dense
depth-to-space, not as a convolution); LayerNorm/InstanceNorm ``weight``/``bias`` ->
``scale``/``bias``; the relative-position bias table is shared as is. The buffer
``attn.relative_position_index`` is recomputed on our side; an incoming one must equal it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from petct_jax.errors import PetctError

__all__ = ["from_torch_state", "infer_kwargs", "monai_kwargs", "to_torch_state"]

# MONAI constructor arguments we accept only at their default value (anything else
# changes the network in a way we do not implement).
_MONAI_FIXED: dict[str, Any] = {
    "patch_size": 2,
    "qkv_bias": True,
    "mlp_ratio": 4.0,
    "drop_rate": 0.0,
    "attn_drop_rate": 0.0,
    "normalize": True,
    "patch_norm": False,
    "spatial_dims": 3,
    "use_hyena": False,
    "hyena_stages": None,
}
# MONAI arguments that change memory/speed only, not the numbers.
_MONAI_IGNORED = ("use_checkpoint", "use_flash_attention")
_OURS = ("in_channels", "out_channels", "feature_size", "depths", "num_heads", "window_size", "drop_path_rate",
         "use_v2", "downsample", "norm_name", "dtype", "param_dtype", "remat", "rngs")

_Entry = tuple[str, Any, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _t_linear(k: np.ndarray) -> np.ndarray:
    return k.T


def _t_conv_to(k: np.ndarray) -> np.ndarray:  # (kD, kH, kW, I, O) -> (O, I, kD, kH, kW)
    return k.transpose(4, 3, 0, 1, 2)


def _t_conv_from(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 4, 1, 0)


def _t_transp_to(k: np.ndarray) -> np.ndarray:  # (kD, kH, kW, I, O) -> (I, O, kD, kH, kW)
    return k.transpose(3, 4, 0, 1, 2)


def _t_transp_from(w: np.ndarray) -> np.ndarray:
    return w.transpose(2, 3, 4, 0, 1)


def _same(a: np.ndarray) -> np.ndarray:
    return a


def _linear(prefix: str, lin: Any) -> Iterator[_Entry]:
    yield f"{prefix}.weight", lin.kernel, _t_linear, _t_linear
    if lin.bias is not None:
        yield f"{prefix}.bias", lin.bias, _same, _same


def _norm(prefix: str, norm: Any) -> Iterator[_Entry]:
    if norm.scale is not None:
        yield f"{prefix}.weight", norm.scale, _same, _same
        yield f"{prefix}.bias", norm.bias, _same, _same


def _conv(prefix: str, conv: Any) -> Iterator[_Entry]:
    yield f"{prefix}.weight", conv.kernel, _t_conv_to, _t_conv_from
    if conv.bias is not None:
        yield f"{prefix}.bias", conv.bias, _same, _same


def _res_block(prefix: str, blk: Any) -> Iterator[_Entry]:
    # MONAI registration order: conv1, conv2, (lrelu), norm1, norm2, conv3, norm3.
    yield from _conv(f"{prefix}.conv1.conv", blk.conv1)
    yield from _conv(f"{prefix}.conv2.conv", blk.conv2)
    yield from _norm(f"{prefix}.norm1", blk.norm1)
    yield from _norm(f"{prefix}.norm2", blk.norm2)
    if blk.conv3 is not None:
        yield from _conv(f"{prefix}.conv3.conv", blk.conv3)
        yield from _norm(f"{prefix}.norm3", blk.norm3)


def _entries(model: Any) -> Iterator[_Entry]:
    """(torch key, our variable or None for the index buffer, to_torch, from_torch), in MONAI order."""
    from petct_jax.models.swin_unetr import _relative_position_index

    yield from _conv("swinViT.patch_embed.proj", model.patch_embed)
    index = _relative_position_index(model.window_size)
    for i, stage in enumerate(model.stages):
        p = f"swinViT.layers{i + 1}.0"
        for j, blk in enumerate(stage.blocks):
            b = f"{p}.blocks.{j}"
            yield from _norm(f"{b}.norm1", blk.norm1)
            yield f"{b}.attn.relative_position_bias_table", blk.attn.relative_position_bias_table, _same, _same
            yield f"{b}.attn.relative_position_index", index, _same, _same
            yield from _linear(f"{b}.attn.qkv", blk.attn.qkv)
            yield from _linear(f"{b}.attn.proj", blk.attn.proj)
            yield from _norm(f"{b}.norm2", blk.norm2)
            yield from _linear(f"{b}.mlp.linear1", blk.mlp.linear1)
            yield from _linear(f"{b}.mlp.linear2", blk.mlp.linear2)
        yield from _linear(f"{p}.downsample.reduction", stage.downsample.reduction)
        yield from _norm(f"{p}.downsample.norm", stage.downsample.norm)
    for i, stage in enumerate(model.stages):
        if stage.conv_block is not None:
            yield from _res_block(f"swinViT.layers{i + 1}c.0.layer", stage.conv_block)
    for name in ("encoder1", "encoder2", "encoder3", "encoder4", "encoder10"):
        yield from _res_block(f"{name}.layer", getattr(model, name))
    for name in ("decoder5", "decoder4", "decoder3", "decoder2", "decoder1"):
        up = getattr(model, name)
        yield f"{name}.transp_conv.conv.weight", up.transp_kernel, _t_transp_to, _t_transp_from
        yield from _res_block(f"{name}.conv_block", up.conv_block)
    yield from _conv("out.conv.conv", model.head.conv)


def _to_numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor, without importing torch
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


def _short(items: list[str], n: int = 8) -> str:
    more = f" ... (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def infer_kwargs(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Architecture arguments read off a MONAI SwinUNETR state_dict.

    ``downsample`` ("merging" vs "mergingv2") leaves no trace in the weights and is not
    returned; the window is assumed cubic.
    """
    def get(key: str) -> np.ndarray:
        if key not in sd:
            raise PetctError(f"MONAI SwinUNETR state_dict: missing key {key!r} (is this a SwinUNETR checkpoint?)")
        return _to_numpy(sd[key])

    embed = get("swinViT.patch_embed.proj.weight")
    depths, heads = [], []
    for i in range(1, 5):
        blocks = {int(m.group(1)) for k in sd if (m := re.match(rf"swinViT\.layers{i}\.0\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks) + 1 if blocks else 0)
        heads.append(int(get(f"swinViT.layers{i}.0.blocks.0.attn.relative_position_bias_table").shape[1]))
    n_rel = get("swinViT.layers1.0.blocks.0.attn.relative_position_bias_table").shape[0]
    window = (round(n_rel ** (1 / 3)) + 1) // 2
    return dict(
        in_channels=int(embed.shape[1]),
        out_channels=int(get("out.conv.conv.weight").shape[0]),
        feature_size=int(embed.shape[0]),
        depths=tuple(depths),
        num_heads=tuple(heads),
        window_size=int(window),
        use_v2="swinViT.layers1c.0.layer.conv1.conv.weight" in sd,
        norm_name=("instance", {"affine": True}) if "encoder1.layer.norm1.weight" in sd else "instance",
    )


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """MONAI constructor names -> ours; rejects settings we do not implement."""
    kwargs = dict(kwargs)
    if "dropout_path_rate" in kwargs:
        rate = kwargs.pop("dropout_path_rate")
        if "drop_path_rate" in kwargs and kwargs["drop_path_rate"] != rate:
            raise PetctError("SwinUNETR: both drop_path_rate and dropout_path_rate given, with different values")
        kwargs["drop_path_rate"] = rate
    for name, default in _MONAI_FIXED.items():
        if name in kwargs:
            value = kwargs.pop(name)
            same = value == default if not isinstance(default, float) else math.isclose(float(value), default)
            if not same:
                raise PetctError(f"SwinUNETR: MONAI argument {name}={value!r} is not supported (only {default!r})")
    for name in _MONAI_IGNORED:
        kwargs.pop(name, None)
    unknown = sorted(set(kwargs) - set(_OURS))
    if unknown:
        raise PetctError(f"SwinUNETR: unknown arguments {unknown}")
    return kwargs


def from_torch_state(sd: Mapping[str, Any], **kwargs: Any):
    """Build a :class:`SwinUNETR` holding the weights of a MONAI SwinUNETR state_dict.

    ``kwargs`` use MONAI's constructor names (``in_channels, out_channels, feature_size,
    depths, num_heads, window_size, use_v2, downsample, norm_name, dropout_path_rate`` or
    ``drop_path_rate``) plus ours (``dtype, param_dtype, remat, rngs``). Architecture
    arguments not given are read off the state_dict; ``downsample`` defaults to
    ``"mergingv2"`` (it cannot be read off the weights). Missing or unexpected keys and
    shape mismatches raise :class:`PetctError` listing them.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from petct_jax.models.swin_unetr import SwinUNETR

    kwargs = _model_kwargs(kwargs)
    config = {**infer_kwargs(sd), **kwargs}
    rngs = config.pop("rngs", None)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    # Abstract construction: no random init of weights about to be overwritten.
    model = nnx.eval_shape(lambda: SwinUNETR(**config, rngs=nnx.Rngs(0)))

    entries = list(_entries(model))
    expected = {e[0] for e in entries}
    missing = [k for k, *_ in entries if k not in sd]
    unexpected = sorted(k for k in sd if k not in expected)
    wrong = []
    for key, var, to_t, from_t in entries:
        if key not in sd:
            continue
        arr = _to_numpy(sd[key])
        shape = var.shape if isinstance(var, np.ndarray) else var.get_value().shape
        want = to_t(np.broadcast_to(np.int8(0), shape)).shape
        if arr.shape != want:
            wrong.append(f"{key} {tuple(arr.shape)} != {tuple(want)}")
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {_short(wrong)}")
        raise PetctError("MONAI SwinUNETR state_dict does not fit the model: " + "; ".join(parts))

    param_dtype = config.get("param_dtype", jnp.float32)
    for key, var, _, from_t in entries:
        arr = _to_numpy(sd[key])
        if isinstance(var, np.ndarray):  # the relative_position_index buffer
            if not np.array_equal(arr, var):
                raise PetctError(f"MONAI SwinUNETR state_dict: {key} differs from the index of a "
                                 f"{model.window_size} window")
            continue
        var.set_value(jnp.asarray(from_t(arr.astype(np.float32)), dtype=param_dtype))
    if model.drop_path_rate > 0:
        model.dropout_rngs = rngs["dropout"].fork()
    left = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_leaves_with_path(nnx.state(model))
            if isinstance(v, jax.ShapeDtypeStruct)]
    if left:  # a model variable the key map does not cover: a bug here, not a user error
        raise RuntimeError(f"from_torch_state left variables uninitialised: {left}")
    return model


def to_torch_state(model: Any) -> dict[str, np.ndarray]:
    """MONAI state_dict of ``model`` (float32 numpy arrays, int64 index buffers), loadable with strict=True."""
    out: dict[str, np.ndarray] = {}
    for key, var, to_t, _ in _entries(model):
        if isinstance(var, np.ndarray):
            out[key] = var.astype(np.int64)
        else:
            out[key] = np.array(to_t(np.asarray(var[...], dtype=np.float32)), order="C")  # writable for torch
    return out


def monai_kwargs(model: Any) -> dict[str, Any]:
    """Arguments that build the matching ``monai.networks.nets.SwinUNETR``."""
    config = dict(model.config)
    config["dropout_path_rate"] = config.pop("drop_path_rate")
    return config
