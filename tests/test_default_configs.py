"""Each default pretraining config compiles and runs one MAE step on CPU at a reduced size.

The networks are the configured ones (full widths and depths); only the patch (the
smallest each architecture accepts), the batch (1) and the compute dtype (float32: CPU
bf16 convolutions are emulated and slow) are reduced. The three largest take minutes to
compile on 2 CPU cores and are marked `heavy` (deselected by default; `pytest -m heavy`).
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from petct_jax.config import resolve
from petct_jax.mae.model import MaskedAutoencoder
from petct_jax.mae.pretrain import mae_loss_fn
from petct_jax.train import optim, step as step_lib
from petct_jax.train.backbone import build_backbone

from conftest import REPO

VARIANTS = {  # variant: (reduced patch, parameters of the backbone with 2 in / 2 out)
    "plain_unet": ((32, 32, 32), 31_196_458),
    "swin_small": ((32, 32, 64), 18_347_708),
    "resenc_l": ((32, 32, 32), 102_350_634),
    "swin_base": ((32, 32, 64), 74_648_708),
    "swin_large": ((32, 32, 64), 319_207_556),
}
HEAVY = ("resenc_l", "swin_base", "swin_large")


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.heavy) if v in HEAVY else v
                                     for v in VARIANTS])
def test_default_config_runs_one_step(variant):
    patch, n_params = VARIANTS[variant]
    config = resolve(os.path.join(REPO, f"configs/pretrain.py:{variant}"),
                     [f"data.patch={patch}", "mae.block=(8,8,8)", "model.dtype='float32'"])
    model = MaskedAutoencoder(build_backbone(config.model, 2, 2, nnx.Rngs(0)), 2, config.mae.imputation)
    assert sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model.backbone, nnx.Param))) == n_params
    graphdef, params, rest = step_lib.split_model(model)
    tx, schedule = optim.make_optimizer(config.optim, 10)
    state = step_lib.init_state(params, tx, 0)
    step = jax.jit(step_lib.make_train_step(graphdef, rest, mae_loss_fn(config.mae), tx, schedule),
                   donate_argnums=0)
    batch = {"image": np.random.default_rng(0).normal(size=(1, *patch, 2)).astype(np.float32)}
    state, metrics = step(state, batch)
    assert int(state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
