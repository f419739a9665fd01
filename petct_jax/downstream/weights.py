"""Pretrained weights for downstream models: from an MAE run, converted PyTorch weights, or none.

A source is named by a path:

- a petct run directory (`W/config.json` + checkpoints): an MAE run (`petct pretrain`;
  its parameters are {"backbone": ..., ["mask_token": ...]}, the backbone is taken) or a
  fine-tuning run (`petct finetune`; the parameters are the backbone). The checkpoint is
  the best by validation loss (`which="best"`), or "latest", or a step number;
- a directory written by `petct convert torch2jax` (`model.json` + `params/`);
- "scratch": no weights (fresh initialisation).

`load_into(model, source)` copies every parameter of the source into `model` except the
output head (`model.head`: nnU-Net's `decoder.seg_layers`, MONAI's `out`), which keeps
its fresh initialisation (our recipe: encoder AND decoder from the MAE, new head).
`load_into(..., head=True)` loads the head as well, which is what the reference's code
does (its Swin fine-tuning filters nothing; its nnU-Net filter, `seg_outputs`, names no
key of a PlainConvUNet): a joint MAE's 2-channel reconstruction head has the shape of the
2-class segmentation head. Shapes are checked array by array; anything that does not fit
is an error naming the parameter, never a silent partial load.

`load_backbone(source)` rebuilds the source's own network with its weights (all of them),
for frozen feature extractors (linear probing).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from petct_jax.errors import PetctError

SCRATCH = "scratch"
_CHANNEL_NAMES = {1: None, 2: ("pet", "ct")}


@dataclasses.dataclass
class Source:
    """Weights read from a source: the backbone's parameters as a pure dict of numpy arrays,
    the registry name and constructor arguments that rebuild it, the input channels."""
    path: str
    kind: str  # "mae", "seg" (a fine-tuning run) or "converted"
    params: dict
    model_name: str
    build: Any  # () -> nnx.Module: the source's own network (fresh weights)
    channels: tuple[str, ...] | None  # input channel names, when the source says
    step: int | None = None
    preset: str | None = None  # harmonization preset of the data it was trained on, if known


def flatten(tree: dict) -> dict[tuple, Any]:
    """{path tuple: leaf} of a pure dict (NNX list indices stay ints)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path): leaf for path, leaf in leaves}


def pure_params(model: nnx.Module) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def head_prefix(model: nnx.Module) -> tuple:
    """Path of `model.head` inside the model (e.g. ("decoder", "seg_layers"))."""
    head = model.head
    for path, node in nnx.iter_graph(model):
        if node is head:
            return tuple(path)
    raise PetctError(f"{type(model).__name__}: its head is not part of the model graph")


def _is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def read_source(path: str, which: str | int = "best") -> Source:
    """The weights and architecture of a run directory or a converted directory."""
    from petct_jax.convert.io import is_converted_dir

    if not path or path == SCRATCH:
        raise PetctError("no weights source given (an MAE run directory, a converted directory, or 'scratch')")
    if not os.path.isdir(path):
        raise PetctError(f"{path}: no such directory (expected an MAE run or a `petct convert` output)")
    if is_converted_dir(path):
        return _read_converted(path)
    if _is_run_dir(path):
        return _read_run(path, which)
    raise PetctError(f"{path}: neither a petct run directory (config.json) nor a converted "
                     "model directory (model.json + params/)")


def _read_run(path: str, which: str | int) -> Source:
    from petct_jax.train import restore
    from petct_jax.train.backbone import build_backbone

    cfg = restore.read_run_config(path)
    task = cfg.get("task")
    channels = tuple(cfg.data.channels)
    n = len(channels)
    if task == "mae":
        from petct_jax.mae.model import MaskedAutoencoder
        out = n
        imputation = cfg.mae.imputation

        def make_target():
            return MaskedAutoencoder(build_backbone(cfg.model, n, out, nnx.Rngs(0)), n, imputation)
    elif task == "seg":
        out = 2

        def make_target():
            return build_backbone(cfg.model, n, out, nnx.Rngs(0))
    else:
        raise PetctError(f"{path}: a {task!r} run; weights come from an MAE ('mae') or a "
                         "fine-tuning ('seg') run")
    target = pure_params(nnx.eval_shape(make_target))
    _, params, step = restore.load_params(path, which, target=target)
    if task == "mae":
        params = params["backbone"]
    model_cfg = ml_collections.ConfigDict(cfg.model.to_dict())
    return Source(path=path, kind=task, params=params, model_name=cfg.model.name,
                  build=lambda rngs=None: build_backbone(model_cfg, n, out, rngs or nnx.Rngs(0)),
                  channels=channels, step=step,
                  # runs from before presets were recorded were all canonical
                  preset=str(cfg.data.get("preset", "canonical")))


def _read_converted(path: str) -> Source:
    from petct_jax.convert.io import load_converted, read_converted_meta
    from petct_jax.models import registry

    meta = read_converted_meta(path)
    model = load_converted(path)
    kwargs = dict(meta.get("kwargs", {}))
    n_in = int(kwargs.get("input_channels", kwargs.get("in_channels", 2)))
    return Source(path=path, kind="converted", params=jax.device_get(pure_params(model)),
                  model_name=meta["arch"],
                  build=lambda rngs=None: registry.build(meta["arch"], rngs=rngs or nnx.Rngs(0), **kwargs),
                  channels=_converted_channels(meta, n_in), preset=meta.get("preset"))


def _converted_channels(meta: dict, n_in: int) -> tuple[str, ...] | None:
    """The channel names a converted model records (an nnU-Net import's dataset.json), else
    the usual ones for its channel count."""
    named = (meta.get("nnunet") or {}).get("channels")
    return tuple(named) if named else _CHANNEL_NAMES.get(n_in)


def check_preset(source: Source, data_preset: str, allow_mismatch: bool, store: str) -> None:
    """Weights meet data harmonized as theirs was (the store's preset), unless allowed."""
    if source.preset is None or source.preset == data_preset:
        return
    if allow_mismatch:
        print(f"petct: {source.path} was trained on {source.preset!r} data, the store is "
              f"{data_preset!r} (allowed by allow_preset_mismatch)", file=sys.stderr)
        return
    raise PetctError(f"{source.path}: trained on data harmonized with preset {source.preset!r}, the store "
                     f"{store} holds {data_preset!r} data; preprocess with --preset "
                     f"{source.preset}, or pass --config.allow_preset_mismatch=True")


def load_into(model: nnx.Module, source: Source, model_name: str, *, head: bool = False) -> dict:
    """Copy the source's parameters into `model` (a `model_name` network), all but the head
    (with `head`, the head too).

    Returns a report: what was loaded, what was re-initialised, what was ignored.
    """
    if source.model_name != model_name:
        raise PetctError(f"{source.path}: holds a {source.model_name!r} network; this run builds "
                         f"{model_name!r} (choose the matching backbone variant)")
    prefix = head_prefix(model)
    in_head = lambda path: path[:len(prefix)] == prefix  # noqa: E731
    is_head = (lambda path: False) if head else in_head  # what stays freshly initialised
    ours = flatten(pure_params(model))
    theirs = flatten(source.params)
    if head:
        _check_head(source, {p: v for p, v in ours.items() if in_head(p)},
                    {p: v for p, v in theirs.items() if in_head(p)})
    loaded, reinit = {}, []
    for path, leaf in ours.items():
        name = "/".join(map(str, path))
        if is_head(path):
            reinit.append(name)
            continue
        if path not in theirs:
            raise PetctError(f"{source.path}: has no parameter {name} (another architecture or "
                             "configuration than this run's model)")
        value = np.asarray(theirs[path])
        if value.shape != tuple(leaf.shape):
            raise PetctError(f"{source.path}: parameter {name} has shape {value.shape}, this run's "
                             f"model needs {tuple(leaf.shape)} (check data.channels and model.overrides)")
        loaded[path] = value.astype(leaf.dtype)
    extra = sorted("/".join(map(str, p)) for p in theirs if p not in ours and not is_head(p))
    if extra:
        raise PetctError(f"{source.path}: {len(extra)} parameters this run's model does not have "
                         f"(first: {extra[0]}); another architecture or configuration")
    new = jax.tree_util.tree_map_with_path(
        lambda path, leaf: loaded.get(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), leaf),
        pure_params(model))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, new)
    nnx.update(model, state)
    head_src = sorted("/".join(map(str, p)) for p in theirs if is_head(p))
    return {
        "source": os.path.abspath(source.path), "kind": source.kind, "step": source.step,
        "head": "loaded" if head else "reinitialised",
        "loaded_arrays": len(loaded),
        "loaded_parameters": int(sum(v.size for v in loaded.values())),
        "reinitialised": reinit,
        "reinitialised_parameters": int(sum(np.prod(ours[p].shape) for p in ours if is_head(p))),
        "ignored_source_head": head_src,
    }


def _check_head(source: Source, ours: dict, theirs: dict) -> None:
    """One line naming the first head array of `ours` the source cannot fill, if any."""
    hint = "set --config.init_head=False to train a new head"
    for path, leaf in ours.items():
        name = "/".join(map(str, path))
        if path not in theirs:
            raise PetctError(f"{source.path}: has no output-head parameter {name} to load "
                             f"(init_head=True); {hint}")
        if np.shape(theirs[path]) != tuple(leaf.shape):
            raise PetctError(f"{source.path}: output head {name} has shape {np.shape(theirs[path])}, "
                             f"this run's head needs {tuple(leaf.shape)} (init_head=True loads it "
                             f"only when they match); {hint}")


def load_backbone(path: str, which: str | int = "best", rngs: nnx.Rngs | None = None
                  ) -> tuple[nnx.Module, Source]:
    """The source's own network with all its weights (head included), and the source."""
    source = read_source(path, which)
    model = source.build(rngs)
    ours, theirs = flatten(pure_params(model)), flatten(source.params)
    if set(ours) != set(theirs) or any(np.shape(theirs[p]) != tuple(ours[p].shape) for p in ours):
        raise PetctError(f"{path}: its weights do not fit the network its config describes")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(np.asarray, source.params))
    nnx.update(model, state)
    return model, source
