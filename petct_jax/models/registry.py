"""Model names -> classes and presets, resolved lazily ("module:attribute" strings).

Configs and the converter name a backbone by string; the module holding it is imported only
when it is built, so `petct --help` and the data tools never import JAX.

    model = registry.build("resenc_unet", "L", rngs=nnx.Rngs(0), num_classes=2, dtype="bfloat16",
                           remat="stage")
    registry.presets("swin_unetr")        # {"small": {...}, "base": {...}, "large": {...}}

Overrides are constructor keyword arguments and win over the preset; dtype strings
("bfloat16", "float32") are turned into JAX dtypes and lists into tuples, so values straight
from a config file work.
"""

from __future__ import annotations

import importlib
from typing import Any

from petct_jax.errors import PetctError

# name -> (class, presets dict or None)
MODELS: dict[str, tuple[str, str | None]] = {
    "plain_unet": ("petct_jax.models.plain_unet:PlainConvUNet",
                   "petct_jax.models.plain_unet:PRESETS"),
    "resenc_unet": ("petct_jax.models.resenc_unet:ResidualEncoderUNet",
                    "petct_jax.models.resenc_unet:PRESETS"),
    "swin_unetr": ("petct_jax.models.swin_unetr:SwinUNETR",
                   "petct_jax.models.swin_unetr:PRESETS"),
}

_DTYPE_ARGS = ("dtype", "param_dtype")


def resolve(target: str) -> Any:
    """Import "package.module:attribute" and return the attribute."""
    module_name, _, attribute = target.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


def _entry(name: str) -> tuple[str, str | None]:
    if name not in MODELS:
        raise PetctError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def model_class(name: str) -> type:
    return resolve(_entry(name)[0])


def presets(name: str) -> dict[str, dict[str, Any]]:
    """Preset name -> constructor keyword arguments (empty when the model has none)."""
    target = _entry(name)[1]
    return {} if target is None else dict(resolve(target))


def build(name: str, preset: str | None = None, *, rngs: Any, **overrides: Any) -> Any:
    """Instantiate model `name` from `preset` (or the class defaults) plus `overrides`."""
    kwargs: dict[str, Any] = {}
    if preset is not None:
        known = presets(name)
        if preset not in known:
            raise PetctError(f"model {name!r} has no preset {preset!r}; "
                             f"known: {', '.join(known) or 'none'}")
        kwargs.update(known[preset])
    kwargs.update(overrides)
    return model_class(name)(**normalize_kwargs(kwargs), rngs=rngs)


def normalize_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Config/JSON values -> constructor values: dtype names -> dtypes, lists -> tuples."""
    out = {}
    for key, value in kwargs.items():
        if key in _DTYPE_ARGS and isinstance(value, str):
            import jax.numpy as jnp
            value = jnp.dtype(value)
        out[key] = _tuples(value)
    return out


def _tuples(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_tuples(v) for v in value)
    return value


def name_of(model: Any) -> str:
    """The registry name of a model instance (by its class)."""
    cls = type(model)
    target = f"{cls.__module__}:{cls.__qualname__}"
    for name, (class_target, _) in MODELS.items():
        if class_target == target:
            return name
    raise PetctError(f"{cls.__name__} is not a registered model ({', '.join(sorted(MODELS))})")
