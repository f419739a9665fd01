"""Experiment configs: big_vision-style `configs/FILE.py:variant` files plus overrides.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`.
On the command line, `--config configs/pretrain.py:tiny --config.optim.lr=1e-3`
loads the file, calls `get_config("tiny")` and applies each override. `--config` is a
path, or the name of a config the package installs (`pretrain.py:tiny`, or
`configs/pretrain.py:tiny` from a directory that has no such file), so installed
copies run from any directory. Values are
parsed as Python literals (`1e-3`, `(96,128,128)`, `True`, `None`, `'text'`), falling
back to a plain string; an override must name an existing key, and keeps the type of
the value it replaces.
"""

from __future__ import annotations

import ast
import importlib.resources
import importlib.util
import os
from typing import Sequence

import ml_collections

from petct_jax.errors import PetctError


def packaged_config(name: str) -> str:
    """The installed path of config file `name` (`pretrain.py`) in `petct_jax.configs`."""
    path = importlib.resources.files("petct_jax.configs") / name
    if not path.is_file():
        raise PetctError(f"--config: petct_jax installs no config {name!r}; "
                         f"packaged configs: {', '.join(packaged_config_names())}")
    return str(path)


def packaged_config_names() -> list[str]:
    return sorted(p.name for p in importlib.resources.files("petct_jax.configs").iterdir()
                  if p.name.endswith(".py") and not p.name.startswith("_"))


def config_file_path(path: str) -> str:
    """`path` when it names a file; else, for `NAME.py` or `configs/NAME.py`, the packaged one."""
    if os.path.isfile(path):
        return path
    if os.path.dirname(os.path.normpath(path)) in ("", "configs") and path.endswith(".py"):
        name = os.path.basename(path)
        if name in packaged_config_names():
            return packaged_config(name)
    raise PetctError(f"--config: no such config file {path!r} (packaged configs: "
                     f"{', '.join(packaged_config_names())})")


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Load `path/to/file.py[:arg]` (or a packaged `NAME.py[:arg]`) via its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    path = config_file_path(path)
    module_spec = importlib.util.spec_from_file_location(
        f"petct_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise PetctError(f"--config: {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except KeyError as e:
        raise PetctError(f"--config: {path} has no variant {arg!r} ({e})") from None
    return ml_collections.ConfigDict(config) if isinstance(config, dict) else config


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `key.path=value` overrides in place (keys without the `--config.` prefix)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise PetctError(f"--config.{item}: expected --config.KEY=VALUE")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise PetctError(f"--config.{key}: no such setting (no group {part!r})")
            node = node[part]
        if leaf not in node:
            raise PetctError(f"--config.{key}: no such setting; known here: {sorted(node.keys())}")
        value = _parse_value(text)
        old = node[leaf]
        if isinstance(old, tuple) and isinstance(value, (list, int, float)):
            value = tuple(value) if isinstance(value, list) else (value,)
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, str) and not isinstance(value, str):
            value = text
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise PetctError(f"--config.{key}={text}: {e}") from None


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate `--config.KEY=VALUE` (or `--config.KEY VALUE`) items from other arguments."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            body = arg[len("--config."):]
            if "=" not in body:
                value = next(it, None)
                if value is None:
                    raise PetctError(f"{arg}: missing value")
                body = f"{body}={value}"
            overrides.append(body)
        else:
            rest.append(arg)
    return rest, overrides


def resolve(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    config = load_config_file(spec)
    apply_overrides(config, overrides)
    return config
