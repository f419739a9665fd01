"""Device mesh and parameter sharding from config.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism
whose parameters and optimizer state are also split across the axis, FSDP/ZeRO-3
style). A batch is split over both axes. Parameters follow path-based rules: the
first rule whose regular expression matches a parameter's path ('/'-joined, e.g.
`backbone/encoder/stages/3/convs/0/conv/kernel`) gives its PartitionSpec; parameters
no rule names are split over `fsdp` along a channel axis when they hold at least
`min_fsdp_size` elements, and replicated otherwise (`place_param` says why).

Channel axes: the last two of a kernel (in, out: a 3D convolution's (kz, ky, kx, in, out),
a dense layer's (in, out)), the only one of a vector. A spatial kernel axis is never split:
with fsdp = 3 a 3-wide tap axis would split into single taps, and each device's convolution
would need its neighbours' taps for every output. Of the channel axes divisible by the fsdp
size the larger is split (memory spreads best); a parameter with none stays replicated, and
the dry run lists it with that reason. A split kernel is gathered in the compute dtype:
the layers cast float32 parameters before use, and the partitioner places the all-gather
after the cast (tests/fsdp_step.py reads it from the partitioned HLO). Because the rules
name paths, the same trainer code serves every layout.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from petct_jax.errors import PetctError

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices; -1 on one axis takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise PetctError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data * fsdp != n:
        raise PetctError(f"mesh: mesh.data={data} x mesh.fsdp={fsdp} != {n} devices")
    auto = (jax.sharding.AxisType.Auto,) * 2
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=auto, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _path_str(path) -> str:
    parts = []
    for k in path:
        key = getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))
        parts.append(str(key))
    return "/".join(parts)


def _spec_from_text(text: str | Sequence) -> P:
    if isinstance(text, P):
        return text
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",")] if text.strip() else []
    else:
        items = list(text)
    return P(*[None if t in (None, "", "None", "none") else t for t in items])


def place_param(path: str, shape: Sequence[int], mesh: Mesh,
                rules: Sequence[tuple[str, Any]] = (), min_fsdp_size: int = 2 ** 18
                ) -> tuple[P, str | None]:
    """(PartitionSpec, why it is replicated: None when it is split or ruled)."""
    for pattern, spec in rules:
        if re.search(pattern, path):
            return _spec_from_text(spec), None
    fsdp = mesh.shape["fsdp"]
    if fsdp == 1:
        return P(), None
    size = int(np.prod(shape))
    if size < min_fsdp_size:
        return P(), f"{size:,} elements < min_fsdp_size {min_fsdp_size:,}"
    channel_axes = range(max(len(shape) - 2, 0), len(shape))
    divisible = [d for d in channel_axes if shape[d] % fsdp == 0]
    if not divisible:
        return P(), f"no channel axis divisible by fsdp={fsdp}"
    dim = max(divisible, key=lambda d: (shape[d], d))
    spec = [None] * len(shape)
    spec[dim] = "fsdp"
    return P(*spec), None


def param_spec(path: str, shape: Sequence[int], mesh: Mesh,
               rules: Sequence[tuple[str, Any]] = (), min_fsdp_size: int = 2 ** 18) -> P:
    return place_param(path, shape, mesh, rules, min_fsdp_size)[0]


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = (),
                   min_fsdp_size: int = 2 ** 18) -> Any:
    """NamedShardings for a pytree of arrays (params, or optimizer state that mirrors them).

    Optimizer moments carry the parameter path inside their own path (e.g.
    `1/0/mu/backbone/...`), so the same rules place them with their parameters.
    """
    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        if len(shape) == 0:
            return replicated(mesh)
        return NamedSharding(mesh, param_spec(_path_str(path), shape, mesh, rules, min_fsdp_size))
    return jax.tree_util.tree_map_with_path(one, tree)
