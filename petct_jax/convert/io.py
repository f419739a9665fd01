"""Reading and writing exchanged weights; shared by every architecture's converter.

- `read_state_dict(src)`: a flat {name: numpy array} from a state_dict (torch tensors or
  numpy), a checkpoint dict, or a file (.pth/.pt/.ckpt/.bin via `torch.load(weights_only=True)`,
  .safetensors, .npz). Checkpoint dicts are unwrapped (`network_weights` of nnU-Net and nnssl,
  `model_state_dict` of the paper's reference code, `state_dict`, `model`, ...) and wrapper
  prefixes stripped (`module.` of DataParallel/DDP, `_orig_mod.` of torch.compile, `nnunet.`
  and `encoder_decoder.` of the reference code's MAE wrappers).
- `save_state_dict(sd, path)`: .safetensors (no torch needed) or .pth.
- `save_converted` / `load_converted`: a directory with `model.json` (registry name and
  constructor arguments) and an Orbax checkpoint of the parameters under `params/`, the form in
  which trainers start from converted weights.

torch is imported only to read or write a .pth file (or when handed torch tensors, which are
converted without importing it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from petct_jax.errors import PetctError

# Where checkpoint dicts keep the network's state_dict, most specific first.
CONTAINER_KEYS = ("network_weights", "model_state_dict", "state_dict", "model", "net",
                  "network", "module")
# Leading key prefixes added by training wrappers; stripped repeatedly (e.g. "module.nnunet.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "nnunet.", "encoder_decoder.")

CONVERTED_FORMAT = "petct-jax-converted/1"
TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def read_state_dict(src: Any, *,
                    prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, np.ndarray]:
    """A flat {key: float numpy array} state_dict from a path, checkpoint dict or state_dict."""
    if not isinstance(src, str | os.PathLike):
        state = strip_prefixes(unwrap(src), prefixes)
        return {key: to_numpy(value, key) for key, value in state.items()}
    obj = load_file(src)
    try:
        state = strip_prefixes(unwrap(obj), prefixes)
        return {key: to_numpy(value, key) for key, value in state.items()}
    except PetctError as e:  # what is wrong inside a file is reported with the file's name
        raise PetctError(f"{src}: {e}") from None


def load_file(path: str | os.PathLike) -> Any:
    """The object stored in a weights file (torch.load only with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise PetctError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file as load_safetensors
        try:
            return load_safetensors(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, or a dtype numpy lacks (bf16)
            raise PetctError(f"{path}: not a readable .safetensors file ({_one_line(e)})") from None
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return dict(data)
        except Exception as e:  # noqa: BLE001 - BadZipFile, a pickled member, a damaged array
            raise PetctError(f"{path}: not a readable .npz file ({_one_line(e)})") from None
    if suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as e:
            raise PetctError(f"{path}: reading a {suffix} file needs PyTorch "
                             "(pip install torch==2.13.0), or convert it to .safetensors") from e
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors name the forbidden global
            raise PetctError(f"{path}: torch.load(weights_only=True) failed: {_one_line(e)}") from e
    raise PetctError(f"{path}: unknown weights format {suffix!r} "
                     f"(use .safetensors, .npz or {', '.join(TORCH_SUFFIXES)})")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap(obj: Any) -> Mapping[str, Any]:
    """The state_dict inside a (possibly nested) checkpoint dict."""
    seen = []
    while isinstance(obj, Mapping):
        if obj and all(_is_array(v) for v in obj.values()):
            return obj
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                seen.append(key)
                obj = obj[key]
                break
        else:
            keys = ", ".join(map(str, list(obj)[:12]))
            raise PetctError("no state_dict found: expected tensors or one of the keys "
                             f"{', '.join(CONTAINER_KEYS)}; found keys: {keys or 'none'}")
    path = "/".join(seen) or "top level"
    raise PetctError(f"no state_dict found ({path} is a {type(obj).__name__}, not a dict)")


def strip_prefixes(state: Mapping[str, Any],
                   prefixes: tuple[str, ...] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """Remove leading wrapper prefixes from every key (repeatedly: "module._orig_mod.x" -> "x")."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        name = str(key)
        stripped = True
        while stripped:
            stripped = False
            for prefix in prefixes:
                if name.startswith(prefix):
                    name, stripped = name[len(prefix):], True
        if name in out:
            raise PetctError(f"keys collide after stripping wrapper prefixes: {key!r} -> {name!r}")
        out[name] = value
    return out


def to_numpy(value: Any, key: str = "") -> np.ndarray:
    """A torch tensor (any device, bf16 included) or array as numpy, without importing torch."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if str(value.dtype) in ("torch.bfloat16", "torch.float16"):
            value = value.float()
        return value.numpy()
    if not _is_array(value):
        raise PetctError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
    return np.asarray(value)


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> Path:
    """Write a {key: array} state_dict as .safetensors or .pth (torch tensors)."""
    path = Path(path)
    suffix = path.suffix.lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    if suffix == ".safetensors":
        from safetensors.numpy import save_file
        save_file(arrays, str(path))
    elif suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError as e:
            raise PetctError(f"{path}: writing {suffix} needs PyTorch; "
                             "write .safetensors instead") from e
        torch.save({k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, path)
    else:
        raise PetctError(f"{path}: unknown weights format {suffix!r} "
                         f"(use .safetensors or {', '.join(TORCH_SUFFIXES)})")
    return path


# ---------------------------------------------------------------------------- converted dirs

def is_converted_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "model.json").is_file() and (Path(path) / "params").is_dir()


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.integer | np.floating):
        return value.item()
    try:  # dtypes: jnp.bfloat16, np.dtype("float32"), ...
        return np.dtype(value).name
    except TypeError:
        raise PetctError(f"cannot store {value!r} ({type(value).__name__}) in model.json") from None


def save_converted(model: Any, arch: str, kwargs: Mapping[str, Any] | None,
                   directory: str | os.PathLike, *, overwrite: bool = False,
                   extra: Mapping[str, Any] | None = None) -> Path:
    """Write `model.json` ({"arch", "kwargs"}, plus `extra`: where the weights came from) and
    the parameters (Orbax, `params/`).

    `kwargs` are the constructor arguments that rebuild the network; None takes
    `model.config` (the CNNs have it). Runtime choices (dtype, remat) belong to the loader.
    Raises PetctError when `kwargs` would not rebuild the same parameter shapes.
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from petct_jax.models import registry

    directory = Path(directory).absolute()
    if kwargs is None:
        if not hasattr(model, "config"):
            raise PetctError(f"{type(model).__name__} has no .config: "
                             "pass its constructor kwargs")
        kwargs = model.config
    if (directory / "model.json").exists() or (directory / "params").exists():
        if not overwrite:
            raise PetctError(f"{directory}: already holds a converted model "
                             "(overwrite it explicitly)")
    meta = {**_jsonable(dict(extra or {})),
            "format": CONVERTED_FORMAT, "arch": arch, "kwargs": _jsonable(dict(kwargs))}
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    rebuilt = nnx.eval_shape(lambda: registry.build(arch, rngs=nnx.Rngs(0), **meta["kwargs"]))
    shapes = lambda tree: jax.tree.map(lambda x: tuple(x.shape), tree)  # noqa: E731
    if shapes(nnx.to_pure_dict(nnx.state(rebuilt, nnx.Param))) != shapes(params):
        raise PetctError(f"{arch}({meta['kwargs']}) does not rebuild this model's parameters: "
                         "give all its constructor arguments")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(directory / "params", params, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_converted_meta(directory: str | os.PathLike) -> dict[str, Any]:
    directory = Path(directory)
    try:
        meta = json.loads((directory / "model.json").read_text())
    except FileNotFoundError:
        raise PetctError(f"{directory}: no model.json (not a converted model directory)") from None
    except json.JSONDecodeError as e:
        raise PetctError(f"{directory / 'model.json'}: invalid JSON: {e}") from None
    if meta.get("format") != CONVERTED_FORMAT or "arch" not in meta:
        raise PetctError(f"{directory / 'model.json'}: not a {CONVERTED_FORMAT} file")
    return meta


def load_converted(directory: str | os.PathLike, *, rngs: Any = None, **overrides: Any) -> Any:
    """Rebuild the model saved by `save_converted` and restore its parameters.

    `overrides` are constructor arguments for this run (dtype="bfloat16", remat="stage", ...).
    """
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from petct_jax.models import registry

    directory = Path(directory).absolute()
    meta = read_converted_meta(directory)
    kwargs = {**meta.get("kwargs", {}), **overrides}
    # Built concretely (not eval_shape): non-parameter state such as index buffers must exist.
    model = registry.build(meta["arch"], rngs=rngs if rngs is not None else nnx.Rngs(0), **kwargs)
    params = nnx.state(model, nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          nnx.to_pure_dict(params))
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(directory / "params", target)
    except Exception as e:  # Orbax reports structure/shape mismatches in its own words
        raise PetctError(f"{directory / 'params'}: parameters do not fit "
                         f"{meta['arch']}({kwargs}): {e}") from e
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(params, restored)
    nnx.update(model, params)
    return model
