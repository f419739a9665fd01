"""Run by test_step.py on 8 virtual CPU devices: gradient accumulation splits the global
batch so that every device computes its own rows of every micro-batch.

    JAX_NUM_CPU_DEVICES=8 python tests/accum_step.py

A small 3D convolution network, a data-parallel batch of 32 over 8 devices (4 rows each), grad_accum 1, 2
and 4 (the sharded `make_train_step` the loop jits). Prints one JSON line: per A, whether the
compiled step holds an all-gather, its per-device FLOPs (XLA's cost analysis), loss, gradient
norm and parameters after the step.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from petct_jax.train import mesh as mesh_lib, step as step_lib


class Net(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 4, (3, 3, 3), rngs=rngs)
        self.out = nnx.Conv(4, 2, (1, 1, 1), rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.conv(x)))


def loss_fn(model, batch, key, train):
    err = model(batch["image"]) - batch["image"]
    return jnp.mean(err ** 2), {}


def main() -> dict:
    mesh = mesh_lib.make_mesh(8, 1)
    graphdef, params, rest = step_lib.split_model(Net(nnx.Rngs(0)))
    tx = optax.sgd(0.1)
    state = step_lib.init_state(params, tx, 0)
    shardings = step_lib.state_shardings(state, mesh)
    data = mesh_lib.batch_sharding(mesh)
    image = np.random.default_rng(0).normal(size=(32, 8, 8, 8, 2)).astype(np.float32)
    batch = jax.device_put({"image": image}, data)
    out = {}
    for accum in (1, 2, 4):
        step = jax.jit(step_lib.make_train_step(graphdef, rest, loss_fn, tx, optax.constant_schedule(0.1),
                                                accum_steps=accum),
                       in_shardings=(shardings, data), out_shardings=(shardings, None))
        compiled = step.lower(jax.device_put(state, shardings), batch).compile()
        shapes = re.findall(r"(\w+\[[\d,]+\])\S* all-gather", compiled.as_text())
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        new_state, metrics = step(jax.device_put(state, shardings), batch)
        params = np.concatenate([np.ravel(x) for x in jax.tree.leaves(jax.device_get(new_state["params"]))])
        out[str(accum)] = {"all_gathers": shapes, "loss": float(metrics["loss"]),
                           "grad_norm": float(metrics["grad_norm"]), "flops": float(cost["flops"]),
                           "params": params.tolist()}
    return {"devices": jax.device_count(), "accum": out}


if __name__ == "__main__":
    print(json.dumps(main()))
