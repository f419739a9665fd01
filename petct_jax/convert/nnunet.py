"""Weights between petct-jax and nnU-Net's `dynamic_network_architectures` (PyTorch).

Architectures: "plain_unet" (PlainConvUNet) and "resenc_unet" (ResidualEncoderUNet with
BasicBlockD). torch state_dicts of these classes hold each tensor under several names, all
written by `to_torch_state` so that `load_state_dict(strict=True)` succeeds:
  - `X.conv.*` is also `X.all_modules.0.*`; `X.norm.*` is also `X.all_modules.1.*`
    (`all_modules.2` with `nonlin_first`, where the activation sits between conv and norm);
  - the encoder appears again under `decoder.encoder.*`;
  - every `decoder.seg_layers.{i}` exists, with or without deep supervision.
`from_torch_state` accepts any one of the aliases of a tensor.

Constructor arguments not given are read off the weights (stages, widths, kernels, convs or
blocks per stage, decoder convs, strides from the transposed convs, conv bias, classes,
stem width); only what weights cannot tell is assumed: strides[0] = 1 (nnU-Net's rule),
deep_supervision = False, nonlin_first = False. Arguments use the torch constructors' names;
torch-only ones (conv_op, norm_op, norm_op_kwargs, nonlin, nonlin_kwargs, dropout_op, block,
...) are accepted when they describe what is implemented (Conv3d, InstanceNorm3d affine,
LeakyReLU, no dropout, BasicBlockD).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from petct_jax.errors import PetctError

ARCHS = ("plain_unet", "resenc_unet")
_RUNTIME_ARGS = ("dtype", "param_dtype", "remat")


@dataclass
class _Entry:
    """One parameter: its torch name (+ aliases), where it lives here, and its layout kind."""
    key: str
    aliases: tuple[str, ...]
    module: Any
    attr: str
    kind: str  # "conv": (kD,kH,kW,I,O) <-> (O,I,kD,kH,kW); "convT": <-> (I,O,kD,kH,kW); "vec"

    @property
    def names(self) -> tuple[str, ...]:
        return (self.key, *self.aliases)


def _to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(4, 3, 0, 1, 2)
    if kind == "convT":
        return array.transpose(3, 4, 0, 1, 2)
    return array


def _from_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":
        return array.transpose(2, 3, 4, 1, 0)
    if kind == "convT":
        return array.transpose(2, 3, 4, 0, 1)
    return array


def _torch_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv":
        return tuple(shape[i] for i in (4, 3, 0, 1, 2))
    if kind == "convT":
        return tuple(shape[i] for i in (3, 4, 0, 1, 2))
    return tuple(shape)


# ----------------------------------------------------------------------------- name tables

def _conv_norm(prefix: str, block: Any, norm_index: int = 1) -> Iterator[_Entry]:
    """ConvDropoutNormReLU: conv = all_modules.0, norm = all_modules.1 (2 with nonlin_first)."""
    yield _Entry(f"{prefix}.conv.weight", (f"{prefix}.all_modules.0.weight",), block.conv,
                 "kernel", "conv")
    if block.conv.bias is not None:
        yield _Entry(f"{prefix}.conv.bias", (f"{prefix}.all_modules.0.bias",), block.conv,
                     "bias", "vec")
    yield _Entry(f"{prefix}.norm.weight", (f"{prefix}.all_modules.{norm_index}.weight",),
                 block.norm, "scale", "vec")
    yield _Entry(f"{prefix}.norm.bias", (f"{prefix}.all_modules.{norm_index}.bias",),
                 block.norm, "bias", "vec")


def _stacked(prefix: str, stacked: Any) -> Iterator[_Entry]:
    for c, block in enumerate(stacked.convs):
        norm_index = 2 if (block.nonlin_first and block.act) else 1
        yield from _conv_norm(f"{prefix}.convs.{c}", block, norm_index)


def _plain_encoder(model: Any) -> Iterator[_Entry]:
    for s, stage in enumerate(model.encoder.stages):
        # torch wraps each stage in nn.Sequential(StackedConvBlocks) -> the extra ".0"
        yield from _stacked(f"encoder.stages.{s}.0", stage)


def _resenc_encoder(model: Any) -> Iterator[_Entry]:
    yield from _stacked("encoder.stem", model.encoder.stem)
    for s, stage in enumerate(model.encoder.stages):
        for b, block in enumerate(stage.blocks):
            prefix = f"encoder.stages.{s}.blocks.{b}"
            yield from _conv_norm(f"{prefix}.conv1", block.conv1)
            yield from _conv_norm(f"{prefix}.conv2", block.conv2)
            if block.skip is not None:
                # torch: skip = Sequential(AvgPool (if strided), ConvDropoutNormReLU)
                yield from _conv_norm(f"{prefix}.skip.{1 if block.has_stride else 0}", block.skip)


def _decoder(model: Any) -> Iterator[_Entry]:
    decoder = model.decoder
    for i, transpconv in enumerate(decoder.transpconvs):
        yield _Entry(f"decoder.transpconvs.{i}.weight", (), transpconv, "kernel", "convT")
        if transpconv.bias is not None:
            yield _Entry(f"decoder.transpconvs.{i}.bias", (), transpconv, "bias", "vec")
    for i, stage in enumerate(decoder.stages):
        yield from _stacked(f"decoder.stages.{i}", stage)
    for i, seg in enumerate(decoder.seg_layers):
        yield _Entry(f"decoder.seg_layers.{i}.weight", (), seg, "kernel", "conv")
        yield _Entry(f"decoder.seg_layers.{i}.bias", (), seg, "bias", "vec")


def entries(model: Any) -> list[_Entry]:
    """Every parameter of `model` with its torch key and aliases."""
    arch = _arch_of(model)
    encoder = _plain_encoder(model) if arch == "plain_unet" else _resenc_encoder(model)
    out = []
    for entry in encoder:
        # the decoder keeps a reference to the encoder: every encoder tensor again under decoder.
        entry.aliases = (*entry.aliases, *(f"decoder.{name}" for name in entry.names))
        out.append(entry)
    out.extend(_decoder(model))
    return out


def _arch_of(model: Any) -> str:
    from petct_jax.models.registry import name_of
    arch = name_of(model)
    if arch not in ARCHS:
        raise PetctError(f"{type(model).__name__} is not an nnU-Net network ({', '.join(ARCHS)})")
    return arch


# ----------------------------------------------------------------------------- jax -> torch

def to_torch_state(model: Any) -> dict[str, np.ndarray]:
    """The torch state_dict (float32 numpy, every alias key) of an nnU-Net network."""
    state: dict[str, np.ndarray] = {}
    for entry in entries(model):
        value = np.array(getattr(entry.module, entry.attr)[...], dtype=np.float32)  # writable copy
        value = np.ascontiguousarray(_to_torch_layout(value, entry.kind))
        for name in entry.names:
            state[name] = value
    return state


# ----------------------------------------------------------------------------- torch -> jax

def from_torch_state(state: Mapping[str, np.ndarray], *, arch: str = "plain_unet",
                     **kwargs: Any) -> Any:
    """A model built from an nnU-Net torch state_dict; `kwargs` (torch names) override what
    is read off the weights; dtype / param_dtype / remat pass through to the constructor."""
    import jax
    from flax import nnx

    from petct_jax.models import registry

    if arch not in ARCHS:
        raise PetctError(f"unknown nnU-Net architecture {arch!r}; known: {', '.join(ARCHS)}")
    runtime = {k: kwargs.pop(k) for k in _RUNTIME_ARGS if k in kwargs}
    structure = infer_kwargs(state, arch)
    structure.update(translate_torch_kwargs(kwargs, arch))
    build_kwargs = registry.normalize_kwargs({**structure, **runtime})
    cls = registry.model_class(arch)
    try:
        model = nnx.eval_shape(lambda: cls(**build_kwargs, rngs=nnx.Rngs(0)))
    except TypeError as e:
        raise PetctError(f"bad arguments for {arch}: {e}") from None
    load_torch_state(model, state)
    leftover = [x for x in jax.tree.leaves(nnx.state(model))
                if isinstance(x, jax.ShapeDtypeStruct)]
    if leftover:  # a parameter no table entry covers: a bug here, not a user error
        raise RuntimeError(f"{len(leftover)} parameters of {arch} were not loaded")
    return model


def load_torch_state(model: Any, state: Mapping[str, np.ndarray]) -> None:
    """Copy a torch state_dict into `model` (in place); raise PetctError listing every missing
    or unexpected key and every shape mismatch, before changing anything."""
    import jax.numpy as jnp

    table = entries(model)
    known = {name for entry in table for name in entry.names}
    missing, mismatched, values = [], [], []
    for entry in table:
        name = next((n for n in entry.names if n in state), None)
        if name is None:
            missing.append(entry.key)
            continue
        param = getattr(entry.module, entry.attr)
        expected = _torch_shape(tuple(param.shape), entry.kind)
        got = tuple(np.shape(state[name]))
        if got != expected:
            mismatched.append(f"{name} {got} (expected {expected})")
            continue
        values.append((param, _from_torch_layout(np.asarray(state[name]), entry.kind)))
    unexpected = sorted(k for k in state if k not in known)
    if missing or unexpected or mismatched:
        raise PetctError(f"weights do not fit {_describe(model)}: " + "; ".join(
            _listing(one, many, items) for one, many, items in
            (("missing key", "missing keys", missing),
             ("unexpected key", "unexpected keys", unexpected),
             ("shape mismatch", "shape mismatches", mismatched)) if items))
    for param, value in values:
        param.set_value(jnp.asarray(value, dtype=param.dtype))


def _describe(model: Any) -> str:
    config = getattr(model, "config", {})
    keys = ("input_channels", "n_stages", "features_per_stage", "num_classes")
    shown = ", ".join(f"{k}={config[k]}" for k in keys if k in config)
    return f"{type(model).__name__}({shown})"


def _listing(one: str, many: str, items: list[str], limit: int = 25) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {one if len(items) == 1 else many}: {shown}{more}"


# ----------------------------------------------------------------------------- reading weights

_ALIAS_RULES = ((re.compile(r"\.all_modules\.0\.(weight|bias)$"), r".conv.\1"),
                (re.compile(r"\.all_modules\.[12]\.(weight|bias)$"), r".norm.\1"))


def _canonical_shapes(state: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """Key -> shape with aliases folded onto the canonical names (for reading the structure)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for key, value in state.items():
        name = key[len("decoder."):] if key.startswith("decoder.encoder.") else key
        for pattern, repl in _ALIAS_RULES:
            name = pattern.sub(repl, name)
        shapes.setdefault(name, tuple(np.shape(value)))
    return shapes


def _indexed(shapes: Mapping[str, tuple[int, ...]],
             pattern: str) -> dict[tuple[int, ...], tuple[int, ...]]:
    """{index groups of `pattern`: shape} for the keys that match it."""
    regex = re.compile(pattern)
    out = {}
    for key, shape in shapes.items():
        m = regex.fullmatch(key)
        if m:
            out[tuple(int(g) for g in m.groups())] = shape
    return out


def _counts(indexed: Mapping[tuple[int, ...], Any], n: int) -> list[int]:
    return [1 + max(idx[1] for idx in indexed if idx[0] == s) for s in range(n)]


def infer_kwargs(state: Mapping[str, np.ndarray], arch: str) -> dict[str, Any]:
    """Constructor arguments read off an nnU-Net state_dict's key names and shapes."""
    shapes = _canonical_shapes(state)
    if arch == "plain_unet":
        convs = _indexed(shapes, r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.conv\.weight")
        what = "encoder.stages.<s>.0.convs.<c>.conv.weight"
        key_of = "encoder.stages.{}.0.convs.{}.conv.weight"
        block_of = r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)"
    else:
        convs = _indexed(shapes, r"encoder\.stages\.(\d+)\.blocks\.(\d+)\.conv1\.conv\.weight")
        what = "encoder.stages.<s>.blocks.<b>.conv1.conv.weight"
        key_of = "encoder.stages.{}.blocks.{}.conv1.conv.weight"
        block_of = r"encoder\.stages\.(\d+)\.blocks\.(\d+)"
        if any(re.search(r"\.blocks\.\d+\.conv3\.", k) for k in shapes):
            raise PetctError("BottleneckD residual blocks are not implemented (only BasicBlockD)")
    if not convs:
        sample = ", ".join(list(state)[:5])
        raise PetctError(f"not a {arch} state_dict: no {what} keys (first keys: {sample})")

    def require_grid(indexed, n: int, template: str, block: str) -> None:
        # Every stage below n needs its convs/blocks 0..last, and every conv/block that has
        # any weight (`block` matches its keys) needs this one: a weight deleted under all
        # its aliases would otherwise end in a KeyError deep in the structure reading, or
        # shorten the stage and blame the rest of the block as unexpected keys.
        seen = set(_indexed(shapes, block + r"\..*"))
        holes = []
        for stage in sorted(set(range(n)) | {st for st, _ in seen}):
            present = {i for st, i in indexed if st == stage}
            wanted = present | {i for st, i in seen if st == stage}
            holes += [template.format(stage, i) for i in range(max(wanted, default=0) + 1)
                      if i not in present]
        if holes:
            raise PetctError(f"{arch} state_dict: " + _listing(
                "missing key", "missing keys", holes) + " (nor under any alias)")

    n_stages = 1 + max(s for s, _ in convs)
    require_grid(convs, n_stages, key_of, block_of)
    per_stage_count = _counts(convs, n_stages)
    transp = _indexed(shapes, r"decoder\.transpconvs\.(\d+)\.weight")
    if sorted(transp) != [(i,) for i in range(n_stages - 1)]:
        raise PetctError(f"{arch} state_dict: expected decoder.transpconvs.0 to "
                         f"{n_stages - 2} (.weight) for {n_stages} encoder stages")
    dec = _indexed(shapes, r"decoder\.stages\.(\d+)\.convs\.(\d+)\.conv\.weight")
    if dec:
        require_grid(dec, n_stages - 1, "decoder.stages.{}.convs.{}.conv.weight",
                     r"decoder\.stages\.(\d+)\.convs\.(\d+)")
    seg = shapes.get("decoder.seg_layers.0.weight")
    if seg is None:
        raise PetctError(f"{arch} state_dict: no decoder.seg_layers.0.weight")
    # decoder.transpconvs.i upsamples encoder stage n-1-i: its kernel (= stride) is strides[n-1-i]
    strides = [(1, 1, 1)] + [tuple(transp[(n_stages - 1 - s,)][2:]) for s in range(1, n_stages)]
    kwargs: dict[str, Any] = dict(
        n_stages=n_stages, strides=tuple(strides), num_classes=seg[0],
        n_conv_per_stage_decoder=tuple(_counts(dec, n_stages - 1)) if dec else 1)
    if arch == "plain_unet":
        kwargs.update(
            input_channels=convs[(0, 0)][1],
            features_per_stage=tuple(convs[(s, 0)][0] for s in range(n_stages)),
            kernel_sizes=tuple(tuple(convs[(s, 0)][2:]) for s in range(n_stages)),
            n_conv_per_stage=tuple(per_stage_count),
            conv_bias="encoder.stages.0.0.convs.0.conv.bias" in shapes)
    else:
        stem = shapes.get("encoder.stem.convs.0.conv.weight")
        if stem is None:
            raise PetctError("resenc_unet state_dict: no encoder.stem.convs.0.conv.weight")
        features = tuple(convs[(s, 0)][0] for s in range(n_stages))
        kwargs.update(
            input_channels=stem[1], features_per_stage=features,
            kernel_sizes=tuple(tuple(convs[(s, 0)][2:]) for s in range(n_stages)),
            n_blocks_per_stage=tuple(per_stage_count),
            conv_bias="encoder.stem.convs.0.conv.bias" in shapes,
            stem_channels=None if stem[0] == features[0] else stem[0])
    return kwargs


def _name(value: Any) -> str:
    return getattr(value, "__name__", str(value)).rsplit(".", 1)[-1]


# The torch classes nnU-Net's plans name (`pydoc.locate` strings, `_kw_requires_import`).
TORCH_CLASSES = {
    "plain_unet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "resenc_unet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
}
_REQUIRES_IMPORT = ("conv_op", "norm_op", "dropout_op", "nonlin")


def arch_kwargs(model: Any) -> tuple[str, dict[str, Any], list[str]]:
    """(network class, arch_kwargs, _kw_requires_import) of an nnU-Net v2 plans
    "architecture" entry that rebuilds `model` in PyTorch (input channels and classes come
    from dataset.json, deep supervision from the trainer, as nnU-Net does)."""
    arch = _arch_of(model)
    cfg = model.config
    lists = lambda v: [list(t) if isinstance(t, tuple) else t for t in v]  # noqa: E731
    kwargs: dict[str, Any] = {
        "n_stages": cfg["n_stages"], "features_per_stage": list(cfg["features_per_stage"]),
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": lists(cfg["kernel_sizes"]), "strides": lists(cfg["strides"]),
    }
    if arch == "plain_unet":
        kwargs["n_conv_per_stage"] = list(cfg["n_conv_per_stage"])
    else:
        kwargs["n_blocks_per_stage"] = list(cfg["n_blocks_per_stage"])
    kwargs.update({
        "n_conv_per_stage_decoder": list(cfg["n_conv_per_stage_decoder"]),
        "conv_bias": cfg["conv_bias"],
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": cfg["norm_eps"], "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"negative_slope": cfg["negative_slope"], "inplace": True},
    })
    requires = list(_REQUIRES_IMPORT)
    if arch == "plain_unet":
        kwargs["nonlin_first"] = cfg["nonlin_first"]
    else:
        kwargs["block"] = "dynamic_network_architectures.building_blocks.residual.BasicBlockD"
        kwargs["stem_channels"] = cfg.get("stem_channels")
        requires.append("block")
    return TORCH_CLASSES[arch], kwargs, requires


def arch_from_class(class_name: str) -> str:
    """plain_unet / resenc_unet for an nnU-Net plans network class name."""
    short = class_name.rsplit(".", 1)[-1]
    for arch, target in TORCH_CLASSES.items():
        if short == target.rsplit(".", 1)[-1]:
            return arch
    raise PetctError(f"network class {class_name!r} is not implemented here (only "
                     f"{', '.join(t.rsplit('.', 1)[-1] for t in TORCH_CLASSES.values())})")


def translate_torch_kwargs(kwargs: Mapping[str, Any], arch: str) -> dict[str, Any]:
    """Torch constructor arguments -> ours; torch-only arguments are checked and folded in."""
    out = dict(kwargs)

    def check(name: str, ok: bool, wanted: str) -> None:
        if not ok:
            raise PetctError(f"{arch}: {name}={out[name]!r} is not supported (only {wanted})")

    if "conv_op" in out:
        check("conv_op", _name(out["conv_op"]) == "Conv3d", "Conv3d")
        del out["conv_op"]
    if "norm_op" in out:
        check("norm_op", _name(out["norm_op"]) == "InstanceNorm3d", "InstanceNorm3d")
        del out["norm_op"]
    if "norm_op_kwargs" in out:
        norm = dict(out.pop("norm_op_kwargs") or {})
        if not norm.get("affine", False):
            raise PetctError(f"{arch}: norm_op_kwargs must have affine=True (nnU-Net's setting)")
        if "eps" in norm:
            out["norm_eps"] = float(norm["eps"])
    if "dropout_op" in out:
        check("dropout_op", out["dropout_op"] is None, "None: dropout is not implemented")
        del out["dropout_op"]
    out.pop("dropout_op_kwargs", None)
    if "nonlin" in out:
        check("nonlin", _name(out["nonlin"]) == "LeakyReLU", "LeakyReLU")
        del out["nonlin"]
    if "nonlin_kwargs" in out:
        nonlin = dict(out.pop("nonlin_kwargs") or {})
        out["negative_slope"] = float(nonlin.get("negative_slope", 1e-2))
    if "block" in out:
        check("block", _name(out["block"]) == "BasicBlockD", "BasicBlockD")
        del out["block"]
    if out.get("bottleneck_channels", 0) is None:
        del out["bottleneck_channels"]
    return out
