"""Weights between PyTorch (nnU-Net's dynamic_network_architectures, MONAI) and petct-jax.

    from petct_jax import convert
    model = convert.from_torch("nnunet_v2_mim_best.pth", arch="plain_unet")  # or a state_dict
    y = model(x)                               # the same numbers as the torch network
    sd = convert.to_torch(model)               # {key: numpy array}, loads with strict=True
    convert.save_converted(model, "plain_unet", None, "converted/")  # model.json + Orbax params
    model = convert.load_converted("converted/", dtype="bfloat16")

`from_torch` takes a state_dict (torch tensors or numpy), a checkpoint dict or a file
(.pth/.pt via torch.load(weights_only=True), .safetensors, .npz): nnU-Net and nnssl
checkpoints (`network_weights`), the paper's reference checkpoints (`model_state_dict`, keys
with `module.` / `nnunet.` / `encoder_decoder.` prefixes), torch.compile'd models
(`_orig_mod.`). Keyword arguments use the torch constructors' names and override what is read
off the weights; dtype / param_dtype / remat choose how the JAX model runs.

Each architecture's converter module exposes `from_torch_state(sd, **kwargs) -> nnx.Module` and
`to_torch_state(model) -> dict[str, np.ndarray]`. Importing this package imports neither torch
nor JAX.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from petct_jax.convert.io import (
    is_converted_dir,
    load_converted,
    read_state_dict,
    save_converted,
    save_state_dict,
)
from petct_jax.errors import PetctError

__all__ = ["CONVERTERS", "from_torch", "load_converted", "load_model",
           "read_state_dict", "save_converted", "save_state_dict", "to_torch"]

# registry name -> (converter module, fixed keyword arguments for its from_torch_state)
CONVERTERS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain_unet": ("petct_jax.convert.nnunet", {"arch": "plain_unet"}),
    "resenc_unet": ("petct_jax.convert.nnunet", {"arch": "resenc_unet"}),
    "swin_unetr": ("petct_jax.convert.monai", {}),
}

def _converter(arch: str) -> tuple[Any, dict[str, Any]]:
    if arch not in CONVERTERS:
        raise PetctError(f"no converter for {arch!r}; known: {', '.join(CONVERTERS)}")
    module_name, fixed = CONVERTERS[arch]
    return importlib.import_module(module_name), fixed


def from_torch(state_dict_or_path: Any, arch: str, **kwargs: Any) -> Any:
    """A petct-jax model holding the weights of a PyTorch network (see the module docstring)."""
    module, fixed = _converter(arch)
    is_path = isinstance(state_dict_or_path, str | os.PathLike)
    try:
        state = read_state_dict(state_dict_or_path)
        return module.from_torch_state(state, **fixed, **kwargs)
    except PetctError as e:
        if is_path and not str(e).startswith(str(state_dict_or_path)):
            raise PetctError(f"{state_dict_or_path}: {e}") from None
        raise


def to_torch(model: Any) -> dict[str, Any]:
    """The PyTorch state_dict ({key: numpy array}) of a petct-jax model, every alias included."""
    from petct_jax.models.registry import name_of

    module, _ = _converter(name_of(model))
    return module.to_torch_state(model)


def load_model(path: str | os.PathLike, **overrides: Any) -> Any:
    """The JAX model of a converted-model folder (`petct convert torch2jax --out`)."""
    if not is_converted_dir(path):
        raise PetctError(f"{path}: not a converted model folder (model.json + params/)")
    return load_converted(path, **overrides)
