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
import math
import os
import traceback
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
    if os.path.isdir(path):
        raise PetctError(f"--config: {path!r} is a directory, not a config file (FILE.py[:VARIANT])")
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
    if not path.endswith(".py"):  # importlib finds no loader for other names
        raise PetctError(f"--config: {path} is not a Python config file (FILE.py[:VARIANT] "
                         "defining get_config(arg))")
    module_spec = importlib.util.spec_from_file_location(
        f"petct_config_{os.path.splitext(os.path.basename(path))[0]}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise PetctError(f"--config: {path} is not valid Python (line {e.lineno}: {e.msg})") from None
    except Exception as e:  # noqa: BLE001 - whatever the file raises is the file's fault
        raise PetctError(f"--config: {path} failed to load{_config_line(e, path)}: "
                         f"{type(e).__name__}: {_one_line(e)}") from None
    if not callable(getattr(module, "get_config", None)):
        raise PetctError(f"--config: {path} defines no get_config(arg)")
    try:
        config = module.get_config(arg or None)
    except KeyError as e:
        raise PetctError(f"--config: {path} has no variant {arg!r} ({e})") from None
    except Exception as e:  # noqa: BLE001 - as above: a bug in the user's config file
        raise PetctError(f"--config: {path}: get_config({arg or None!r}) failed"
                         f"{_config_line(e, path)}: {type(e).__name__}: {_one_line(e)}") from None
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    if not isinstance(config, ml_collections.ConfigDict):
        raise PetctError(f"--config: {path}: get_config({arg or None!r}) returned a "
                         f"{type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _config_line(error: BaseException, path: str) -> str:
    """' (line N)' of the innermost frame of `error` inside the config file `path`, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    return f" (line {frames[-1].lineno})" if frames else ""


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
    validate(config)
    return config


# Ranges of the training settings, checked wherever a config has them, so that a run with an
# impossible value stops before it starts (a negative step count would "succeed" untrained, a
# mask ratio of 2 gives NaN losses blamed on the learning rate). (key, low, high, low_open,
# high_open): None is unbounded; *_open excludes that end.
RANGES = (
    ("epochs", 0, None, False, False),
    ("batch_size", 1, None, False, False),
    ("grad_accum", 1, None, False, False),
    ("mae.ratio", 0.0, 1.0, True, True),
    ("mae.visible_weight", 0.0, None, False, False),
    ("optim.lr", 0.0, None, True, False),
    ("optim.end_lr", 0.0, None, False, False),
    ("optim.warmup_steps", 0, None, False, False),
    ("optim.weight_decay", 0.0, None, False, False),
    ("optim.clip_norm", 0.0, None, False, False),  # 0: no clipping (train/optim.py)
    ("optim.b1", 0.0, 1.0, False, True),
    ("optim.b2", 0.0, 1.0, False, True),
    ("optim.eps", 0.0, None, True, False),
    ("data.val_fraction", 0.0, 1.0, False, True),
    ("data.test_fraction", 0.0, 1.0, False, True),
)


def _lookup(config: ml_collections.ConfigDict, key: str):
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def _range_text(low, high, low_open, high_open) -> str:
    if high is None:
        return f"> {low}" if low_open else f">= {low}"
    return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def validate(config: ml_collections.ConfigDict) -> None:
    """Refuse a setting outside its range (`RANGES`), naming it; keys a config lacks are skipped."""
    checks = list(RANGES)
    # With epochs > 0 the run computes total_steps itself (config_blocks.apply_epochs).
    if not (_lookup(config, "epochs") or 0) > 0:
        checks.insert(0, ("total_steps", 1, None, False, False))
    for key, low, high, low_open, high_open in checks:
        value = _lookup(config, key)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        ok = (math.isfinite(value) and (value > low if low_open else value >= low)
              and (high is None or (value < high if high_open else value <= high)))
        if not ok:
            raise PetctError(f"--config.{key}={value}: must be "
                             f"{_range_text(low, high, low_open, high_open)}")
