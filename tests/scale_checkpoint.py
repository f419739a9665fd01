"""Run by test_scale.py: a checkpoint written on 8 devices restores on 1 and on 4.

    JAX_NUM_CPU_DEVICES=8 python tests/scale_checkpoint.py write DIR
    JAX_NUM_CPU_DEVICES=4 python tests/scale_checkpoint.py restore DIR     (and with 1)

`write` builds the tiny MAE's train state the way the loop does (`init_state`), fills
every leaf with distinct random values, lays it out FSDP over 8 devices (mesh data=1 x
fsdp=8, min_fsdp_size 64: most kernels really split), and saves it with the loop's
RunCheckpointer at step 7 together with a Grain iterator advanced 3 elements; the
expected values go to DIR/expected.npz. `restore` rebuilds the state on its own devices
(mesh data=2 x fsdp=N/2, or 1 device), restores through `abstract_like` with its own
shardings, as the loop does on resume, and compares. Each prints one JSON line.
"""

import json
import os
import sys

import numpy as np

WRITE_MESH = (1, 8)
MIN_FSDP = 64


def _state_and_shardings(mesh_shape):
    import jax
    from flax import nnx

    from petct_jax.config import resolve
    from petct_jax.mae.pretrain import build_model
    from petct_jax.train import mesh as mesh_lib, optim, step as step_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = resolve(os.path.join(repo, "configs/pretrain.py:tiny"), [
        "model.overrides.n_stages=3", "model.overrides.features_per_stage=(8,16,32)",
        "model.overrides.strides=(1,2,2)"])
    graphdef, params, rest = step_lib.split_model(build_model(config, nnx.Rngs(0)))
    tx, _ = optim.make_optimizer(config.optim, 10)
    state = step_lib.init_state(params, tx, 0)
    mesh = mesh_lib.make_mesh(*mesh_shape, devices=jax.devices()[: mesh_shape[0] * mesh_shape[1]])
    return state, step_lib.state_shardings(state, mesh, (), MIN_FSDP)


def _named_leaves(tree):
    import jax
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _split_count(tree) -> int:
    import jax
    return sum(1 for x in jax.tree.leaves(tree)
               if len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated)


def _iterator():
    import grain
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def write(directory: str) -> dict:
    import jax

    from petct_jax.train.checkpoint import RunCheckpointer

    state, shardings = _state_and_shardings(WRITE_MESH)
    rng = np.random.default_rng(0)

    def fill(x):
        x = np.asarray(x)
        if x.dtype.kind == "f":
            return rng.normal(size=x.shape).astype(x.dtype)
        return np.full(x.shape, 7, x.dtype) if x.ndim == 0 else x

    state = jax.tree.map(fill, state)
    np.savez(os.path.join(directory, "expected.npz"), **_named_leaves(state))
    state = jax.device_put(state, shardings)
    it = _iterator()
    for _ in range(3):
        next(it)
    ckpt = RunCheckpointer(os.path.join(directory, "checkpoints"))
    ckpt.save(7, state, data_iter=it, config={"note": "scale test"}, force=True)
    ckpt.wait()
    ckpt.close()
    return {"devices": jax.device_count(), "split_leaves": _split_count(state),
            "leaves": len(jax.tree.leaves(state))}


def restore(directory: str) -> dict:
    import jax

    from petct_jax.train.checkpoint import RunCheckpointer, abstract_like

    n = jax.device_count()
    state, shardings = _state_and_shardings((1, 1) if n == 1 else (2, n // 2))
    ckpt = RunCheckpointer(os.path.join(directory, "checkpoints"))
    step = ckpt.latest_step()
    it = _iterator()
    restored = ckpt.restore(step, abstract_like(state, shardings), data_iter=it)
    ckpt.close()
    expected = dict(np.load(os.path.join(directory, "expected.npz")))
    got = _named_leaves(restored)
    mismatched = sorted(k for k in expected if not np.array_equal(np.asarray(got[k]), expected[k]))
    wrong_layout = sorted(k for k, s in _named_leaves(shardings).items() if got[k].sharding != s)
    return {"devices": n, "step": step, "leaves": len(got), "missing": sorted(set(expected) - set(got)),
            "mismatched": mismatched, "wrong_layout": wrong_layout,
            "split_leaves": _split_count(restored), "next_data": int(next(it))}


if __name__ == "__main__":
    mode, directory = sys.argv[1], sys.argv[2]
    print(json.dumps(write(directory) if mode == "write" else restore(directory)))
