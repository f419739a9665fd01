"""The dry run of a training command: what a run would put where, without training.

`train_plan` builds the model abstractly (`nnx.eval_shape`: no parameter is
initialised, no store is opened), lays the train state out on the mesh that
`config.mesh` gives on this job's devices with the same rules the loop uses, and
lowers and compiles the same jitted step (`jax.jit(...).lower(...).compile()`) to ask
XLA how much memory a device needs. `format_plan` prints it:

- the mesh: axes and sizes, processes and devices per host, the device grid;
- the batch: global, per host, per device;
- every parameter group (path prefix) with its shapes, PartitionSpecs and bytes in
  total and per device; the optimizer state likewise;
- memory per device: parameters and optimizer state from their shardings, and from
  the compiled step its arguments, outputs, donated (aliased) buffers and temporaries
  (activations, gradients, workspace); a peak estimate and the device's limit where
  the backend reports them.

Compiled numbers are those of this machine's backend: run the dry run where the job
will run (the launch scripts pass `--dry-run` through), or on CPU with
`JAX_NUM_CPU_DEVICES=N` to check a layout for N devices before queueing.
"""

from __future__ import annotations

import collections
import re
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx

from petct_jax.train import checkpoint as ckpt_lib
from petct_jax.train import loop as loop_lib
from petct_jax.train import mesh as mesh_lib
from petct_jax.train import optim
from petct_jax.train import step as step_lib


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize


def _device_bytes(leaf, sharding) -> int:
    """Bytes of `leaf` held by one device (the largest shard)."""
    return _nbytes(sharding.shard_shape(tuple(leaf.shape)), leaf.dtype)


def group_of(path: str) -> str:
    """The group a parameter path belongs to: up to its first index within the first
    four components (`backbone/encoder/stages/3`), else its first two
    (`backbone/decoder1`), never the leaf name itself."""
    parts = path.split("/")
    for i, part in enumerate(parts[:4]):
        if part.isdigit():
            return "/".join(parts[: i + 1])
    return "/".join(parts[: max(1, min(2, len(parts) - 1))])


def spec_text(spec: jax.sharding.PartitionSpec) -> str:
    """`P(None, 'fsdp')` -> `P(-,fsdp)`; `P(('data', 'fsdp'))` -> `P(data+fsdp)`."""
    def one(item):
        if item is None:
            return "-"
        return "+".join(item) if isinstance(item, (tuple, list)) else str(item)
    return "P(" + ",".join(one(i) for i in spec) + ")"


def _natural(text: str) -> list:
    """Sort key putting encoder2 before encoder10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _tree_bytes(tree, shardings) -> tuple[int, int]:
    leaves = jax.tree.leaves(tree)
    shards = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    total = sum(_nbytes(x.shape, x.dtype) for x in leaves)
    per_device = sum(_device_bytes(x, s) for x, s in zip(leaves, shards))
    return total, per_device


def _mesh_info(mesh) -> dict:
    devices = list(mesh.devices.flat)
    per_host = collections.Counter(d.process_index for d in devices)
    grid = None
    if mesh.devices.size <= 64:
        grid = [[f"{d.id}@p{d.process_index}" for d in row] for row in mesh.devices.reshape(mesh.devices.shape[0], -1)]
    return {"axes": dict(mesh.shape), "devices": len(devices), "processes": jax.process_count(),
            "devices_per_host": dict(sorted(per_host.items())), "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "grid": grid}


def _compiled_memory(compiled) -> tuple[dict | None, str]:
    try:
        stats = compiled.memory_analysis()
    except Exception as e:  # backends without the analysis raise NotImplemented/XlaRuntimeError
        return None, f"memory analysis unavailable on this backend ({type(e).__name__}: {e})"
    if stats is None:
        return None, "memory analysis unavailable on this backend"
    names = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
             "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {n.removesuffix("_size_in_bytes"): int(getattr(stats, n, 0) or 0) for n in names}
    # Donated state buffers are reused for the new state: count them once.
    out["peak_estimate"] = (out["argument"] + out["output"] - out["alias"] + out["temp"]
                            + out["generated_code"])
    return out, "compiled step (per device, this backend)"


def xla_flops(stage) -> float | None:
    """FLOPs XLA's cost analysis counts for a lowered or compiled computation (None where
    the backend has no analysis)."""
    try:
        cost = stage.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def train_plan(config: ml_collections.ConfigDict, model_fn: Callable[[], nnx.Module],
               loss_fn: Callable, batch: Mapping[str, jax.ShapeDtypeStruct], *,
               trainable: Callable[[tuple], bool] | None = None, compile: bool = True) -> dict:
    """The layout and memory of `loop.train(config, ...)` for the model `model_fn()` builds
    and global batches shaped like `batch`, on this job's devices; trains nothing."""
    mesh = mesh_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    problems = []
    for what, n in (("devices of the mesh", n_dev), ("processes", n_proc)):
        if config.batch_size % n:
            problems.append(f"batch_size={config.batch_size} is not divisible by the {n} {what}")
    if (config.batch_size // n_dev) % config.grad_accum:
        problems.append(f"grad_accum={config.grad_accum} does not divide the per-device batch "
                        f"{config.batch_size // n_dev}")

    model = nnx.eval_shape(model_fn)
    graphdef, params, rest = step_lib.split_model(model)
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
    tx = loop_lib._frozen_tx(tx, loop_lib._trainable_mask(params, trainable))
    state = jax.eval_shape(lambda p: step_lib.init_state(p, tx, config.seed), params)
    shardings = step_lib.state_shardings(state, mesh, rules, config.mesh.min_fsdp_size)
    data_sharding = mesh_lib.batch_sharding(mesh)

    groups: dict[str, dict] = {}
    replicated: dict[str, list[str]] = collections.defaultdict(list)  # reason -> parameters
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = mesh_lib._path_str(path)
        _, why = mesh_lib.place_param(name, leaf.shape, mesh, rules, config.mesh.min_fsdp_size)
        if why:
            replicated[why].append(f"{name} {'x'.join(map(str, leaf.shape))}")
    param_shards = jax.tree.leaves(shardings["params"], is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(params)[0], param_shards):
        name = mesh_lib._path_str(path)
        g = groups.setdefault(group_of(name), {"group": group_of(name), "tensors": 0, "params": 0,
                                               "bytes": 0, "bytes_per_device": 0,
                                               "shapes": [], "specs": collections.Counter()})
        g["tensors"] += 1
        g["params"] += int(np.prod(leaf.shape, dtype=np.int64))
        g["bytes"] += _nbytes(leaf.shape, leaf.dtype)
        g["bytes_per_device"] += _device_bytes(leaf, sharding)
        g["shapes"].append(tuple(leaf.shape))
        g["specs"][spec_text(sharding.spec)] += 1
    for g in groups.values():
        g["specs"] = dict(g["specs"])
    p_total, p_dev = _tree_bytes(params, shardings["params"])
    o_total, o_dev = _tree_bytes(state["opt_state"], shardings["opt_state"])

    batch_info, batch_dev = {}, 0
    for k, v in batch.items():
        shard = data_sharding.shard_shape(tuple(v.shape)) if not config.batch_size % n_dev else None
        batch_info[k] = {"global": tuple(v.shape), "per_host": (v.shape[0] // n_proc, *v.shape[1:]),
                         "per_device": shard, "dtype": str(np.dtype(v.dtype))}
        batch_dev += _nbytes(shard, v.dtype) if shard else 0

    memory: dict[str, Any] = {"params": p_dev, "opt_state": o_dev, "batch": batch_dev,
                              "compiled": None, "note": "not compiled (--dry-run=shapes)"}
    limit = None
    try:
        stats = jax.local_devices()[0].memory_stats()
        limit = int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None
    except Exception:  # backends without memory_stats
        limit = None
    memory["device_limit"] = limit
    flops = None
    if compile and not problems:
        def step(st, b, rest_):
            return step_lib.make_train_step(
                graphdef, rest_, loss_fn, tx, schedule, accum_steps=config.grad_accum,
                skip_nonfinite=config.on_nonfinite == "skip")(st, b)

        jitted = jax.jit(step, in_shardings=(shardings, data_sharding, None),
                         out_shardings=(shardings, None), donate_argnums=0)
        abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=data_sharding)
                          for k, v in batch.items()}
        compiled = jitted.lower(ckpt_lib.abstract_like(state, shardings), abstract_batch, rest).compile()
        memory["compiled"], memory["note"] = _compiled_memory(compiled)
        flops = xla_flops(compiled)
    elif compile:
        memory["note"] = "not compiled: fix the problems above first"

    return {"mesh": _mesh_info(mesh), "batch_size": config.batch_size, "per_host_batch": config.batch_size // n_proc,
            "per_device_batch": config.batch_size / n_dev, "grad_accum": config.grad_accum,
            "batch": batch_info, "rules": [list(r) for r in rules],
            "min_fsdp_size": config.mesh.min_fsdp_size,
            "params": {"count": sum(g["params"] for g in groups.values()), "bytes": p_total,
                       "bytes_per_device": p_dev},
            "groups": sorted(groups.values(), key=lambda g: _natural(g["group"])),
            "replicated": dict(replicated),
            "opt_state": {"bytes": o_total, "bytes_per_device": o_dev},
            "memory": memory, "flops_per_step": flops, "problems": problems}


def human_bytes(n: float | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _shape_text(shapes: list[tuple]) -> str:
    counts = collections.Counter(shapes)
    parts = [("x".join(map(str, s)) or "()") + (f" (x{c})" if c > 1 else "") for s, c in counts.items()]
    return ", ".join(parts[:3]) + (f", +{len(parts) - 3} more" if len(parts) > 3 else "")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip()
    return [fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]]


def format_plan(plan: dict) -> str:
    m = plan["mesh"]
    axes = " x ".join(f"{k}={v}" for k, v in m["axes"].items())
    counts = m["devices_per_host"]
    if len(set(counts.values())) == 1 and len(counts) > 1:
        hosts = f"{next(iter(counts.values()))} on each of {len(counts)} processes"
    else:
        hosts = ", ".join(f"process {p}: {n}" for p, n in counts.items())
    lines = [f"mesh: {axes} ({m['devices']} {m['platform']} devices, {m['device_kind']}); "
             f"{m['processes']} process(es); devices per host: {hosts}"]
    if m["grid"] is not None:
        lines.append("  device grid (rows: data, columns: fsdp; id@process):")
        lines += ["    " + " ".join(row) for row in m["grid"]]
    lines.append(f"batch: global {plan['batch_size']}, per host {plan['per_host_batch']}, "
                 f"per device {plan['per_device_batch']:g}, grad_accum {plan['grad_accum']}")
    for k, b in plan["batch"].items():
        lines.append(f"  {k}: global {b['global']}, per host {b['per_host']}, "
                     f"per device {b['per_device']}, {b['dtype']}")
    p = plan["params"]
    lines.append(f"parameters: {p['count']:,} ({human_bytes(p['bytes'])}; per device "
                 f"{human_bytes(p['bytes_per_device'])}); min_fsdp_size {plan['min_fsdp_size']:,}; "
                 f"rules {plan['rules'] or 'none'}")
    rows = [[g["group"], g["tensors"], f"{g['params']:,}", _shape_text(g["shapes"]),
             "; ".join(s + (f" x{c}" if c > 1 else "") for s, c in g["specs"].items()),
             human_bytes(g["bytes"]), human_bytes(g["bytes_per_device"])] for g in plan["groups"]]
    lines += ["  " + r for r in _table(["group", "tensors", "params", "shapes", "specs", "bytes",
                                        "per device"], rows)]
    if plan["replicated"]:
        lines.append(f"left replicated by the FSDP rules ({sum(map(len, plan['replicated'].values()))} "
                     f"parameters):")
        for why, names in plan["replicated"].items():
            lines.append(f"  {why} ({len(names)}): {', '.join(names)}")
    o = plan["opt_state"]
    lines.append(f"optimizer state: {human_bytes(o['bytes'])} (per device {human_bytes(o['bytes_per_device'])})")
    mem = plan["memory"]
    lines.append("memory per device:")
    lines.append(f"  parameters {human_bytes(mem['params'])} + optimizer state {human_bytes(mem['opt_state'])}"
                 f" + batch {human_bytes(mem['batch'])} = "
                 f"{human_bytes(mem['params'] + mem['opt_state'] + mem['batch'])} (from the shardings)")
    c = mem["compiled"]
    if c is None:
        lines.append(f"  activations: {mem['note']}")
    else:
        lines.append(f"  {mem['note']}: arguments {human_bytes(c['argument'])}, outputs "
                     f"{human_bytes(c['output'])}, donated/aliased {human_bytes(c['alias'])}, "
                     f"temporaries (activations, gradients) {human_bytes(c['temp'])}")
        lines.append(f"  peak estimate {human_bytes(c['peak_estimate'])}")
    if mem["device_limit"] is not None:
        verdict = "" if c is None else (
            ": fits" if c["peak_estimate"] <= mem["device_limit"] else ": DOES NOT FIT")
        lines.append(f"  device limit {human_bytes(mem['device_limit'])}{verdict}")
    else:
        lines.append("  device limit: not reported by this backend")
    if plan["flops_per_step"]:
        lines.append(f"compiled step: {plan['flops_per_step']:.3g} FLOP per device")
    for problem in plan["problems"]:
        lines.append(f"PROBLEM: {problem}")
    return "\n".join(lines)
