"""Run by test_multidevice.py in a fresh process with 8 virtual CPU devices.

Two MAE train steps of the tiny backbone on one batch of 8, on three meshes: one device,
data-parallel over 8, and data 2 x fsdp 4 (parameters and optimizer state split).
Prints one JSON object: losses and gradient norms per layout, the largest gradient
difference to one device (relative to the largest gradient), and how many parameters the
FSDP layout actually split. Parameters are not compared: Adam's first steps move each
weight by about lr * sign(gradient), so reduction-order noise in near-zero gradients
flips whole updates without anything being wrong.
"""

import json
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from petct_jax.config import resolve  # noqa: E402
from petct_jax.data.pipeline import global_batch  # noqa: E402
from petct_jax.mae.model import MaskedAutoencoder  # noqa: E402
from petct_jax.mae.pretrain import mae_loss_fn  # noqa: E402
from petct_jax.train import mesh as mesh_lib, optim, step as step_lib  # noqa: E402
from petct_jax.train.backbone import build_backbone  # noqa: E402


def main(repo: str) -> None:
    config = resolve(os.path.join(repo, "configs/pretrain.py:tiny"),
                     ["data.patch=(16,16,16)", "mae.block=(4,4,4)", "optim.warmup_steps=1",
                      "model.overrides.n_stages=3", "model.overrides.features_per_stage=(4,8,16)",
                      "model.overrides.strides=(1,2,2)"])
    model = MaskedAutoencoder(build_backbone(config.model, 2, 2, nnx.Rngs(0)), 2)
    tx, schedule = optim.make_optimizer(config.optim, 10)
    graphdef, params, rest = step_lib.split_model(model)
    state0 = step_lib.init_state(params, tx, 0)
    batch = {"image": np.random.default_rng(0).normal(size=(8, 16, 16, 16, 2)).astype(np.float32)}
    loss_fn = mae_loss_fn(config.mae)
    train_step = step_lib.make_train_step(graphdef, rest, loss_fn, tx, schedule)

    def grads(params, batch):
        key = jax.random.key(3)
        return jax.grad(lambda p: loss_fn(step_lib.merge_model(graphdef, p, rest), batch, key, True)[0])(params)

    out, final = {"devices": jax.device_count()}, {}
    for name, (data, fsdp) in {"single": (1, 1), "data8": (8, 1), "fsdp": (2, 4)}.items():
        mesh = mesh_lib.make_mesh(data, fsdp, jax.devices()[: data * fsdp])
        shardings = step_lib.state_shardings(state0, mesh, (), min_fsdp_size=64)
        step = jax.jit(train_step, in_shardings=(shardings, mesh_lib.batch_sharding(mesh)),
                       out_shardings=(shardings, None))
        state = jax.device_put(state0, shardings)
        losses = []
        for _ in range(2):
            state, m = step(state, global_batch(batch, mesh))
            losses.append(float(m["loss"]))
        out[f"loss_{name}"] = losses
        out[f"grad_norm_{name}"] = float(m["grad_norm"])
        final[name] = jax.device_get(jax.jit(grads, in_shardings=(shardings["params"], mesh_lib.batch_sharding(mesh)))(
            jax.device_put(state0["params"], shardings["params"]), global_batch(batch, mesh)))
        if name == "fsdp":
            specs = jax.tree.leaves(jax.tree.map(lambda s: "fsdp" in str(s.spec), shardings["params"]))
            out["fsdp_split_params"] = int(sum(specs))
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(final["single"]))
    for name in ("data8", "fsdp"):
        diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), final[name], final["single"])
        out[f"max_grad_diff_{name}"] = max(jax.tree.leaves(diffs)) / scale
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
