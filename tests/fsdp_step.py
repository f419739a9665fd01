"""Run by test_step.py on 8 virtual CPU devices: an FSDP-sharded train step of the tiny
PlainConvUNet at bfloat16 gathers its kernels in bfloat16.

    JAX_NUM_CPU_DEVICES=8 python tests/fsdp_step.py DUMP_DIR

The layers cast float32 parameters to the compute dtype before use, and the partitioner
places the all-gather after that cast. What XLA:CPU compiles afterwards is not the
accelerator's program (CPU float normalization computes bf16 convolutions in float32 and
moves the casts back past the gathers), so the gathers are read from the HLO right after
SPMD partitioning (`--xla_dump_hlo_pass_re=spmd-partitioning`). Prints one JSON line:
"dtype rank" -> number of all-gathers, and how many parameters FSDP split.
"""

import collections
import glob
import json
import os
import re
import sys

DUMP = sys.argv[1]
os.environ["PETCT_CONV3D"] = "xla"  # the accelerators' convolution path
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={DUMP}"
                           " --xla_dump_hlo_pass_re=spmd-partitioning")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from petct_jax.config import packaged_config, resolve  # noqa: E402
from petct_jax.train.backbone import build_backbone  # noqa: E402
from petct_jax.train import mesh as mesh_lib, step as step_lib  # noqa: E402


def loss_fn(model, batch, key, train):
    out = model(batch["image"])
    return jnp.mean((out.astype(jnp.float32) - batch["image"]) ** 2), {}


def main() -> dict:
    config = resolve(packaged_config("pretrain.py") + ":tiny")
    config.model.dtype = "bfloat16"
    mesh = mesh_lib.make_mesh(1, 8)
    graphdef, params, rest = step_lib.split_model(build_backbone(config.model, 2, 2, nnx.Rngs(0)))
    tx = optax.adam(1e-3)
    state = step_lib.init_state(params, tx, 0)
    shardings = step_lib.state_shardings(state, mesh, (), 2 ** 10)
    split = sum("fsdp" in tuple(s.spec) for s in jax.tree.leaves(shardings["params"]))
    data = mesh_lib.batch_sharding(mesh)
    image = np.zeros((8, 16, 16, 16, 2), np.float32)
    step = jax.jit(step_lib.make_train_step(graphdef, rest, loss_fn, tx, optax.constant_schedule(1e-3)),
                   in_shardings=(shardings, data), out_shardings=(shardings, None))
    step.lower(jax.device_put(state, shardings), jax.device_put({"image": image}, data)).compile()
    [after] = glob.glob(os.path.join(DUMP, "*jit_step*after_spmd-partitioning*.txt"))
    found = re.findall(r"= (\w+)\[([\d,]*)\]\S* all-gather\(", open(after).read())
    gathers = collections.Counter(f"{dtype} {len(dims.split(','))}-D" for dtype, dims in found)
    return {"devices": jax.device_count(), "split_params": split, "all_gathers": dict(gathers)}


if __name__ == "__main__":
    print(json.dumps(main()))
