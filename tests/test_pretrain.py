"""MAE pretraining: learning, the token ablation, the CLI end to end with kill -9 resume,
and one step of every backbone's default config at reduced size."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from petct_jax.config import resolve
from petct_jax.mae.pretrain import make_task, mae_loss_fn
from petct_jax.train import metrics as metrics_lib
from petct_jax.train import optim
from petct_jax.train import step as step_lib

from conftest import REPO
from process_helpers import wait_for

TINY = ["data.patch=(16,16,16)", "mae.block=(4,4,4)", "batch_size=2", "eval_batches=1",
        "data.zoom_prob=0.0", "model.overrides.n_stages=3", "model.overrides.features_per_stage=(4,8,16)",
        "model.overrides.strides=(1,2,2)"]


def tiny_config(store, *extra):
    return resolve(os.path.join(REPO, "configs/pretrain.py:tiny"), [f"store={store}", *TINY, *extra])


def _steps_on_one_batch(config, n):
    """n train steps on the same batch; returns (losses, task, final params)."""
    task = make_task(config)
    tx, schedule = optim.make_optimizer(config.optim, 100)
    graphdef, params, rest = step_lib.split_model(task.model)
    state = step_lib.init_state(params, tx, 0)
    step = jax.jit(step_lib.make_train_step(graphdef, rest, task.loss_fn, tx, schedule))
    batch = next(task.train_iter)
    losses = []
    for _ in range(n):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    return losses, task, params, state["params"]


def test_steps_on_a_fixed_batch_reduce_the_loss(phantom_store):
    config = tiny_config(phantom_store, "optim.warmup_steps=1")
    # The mask changes with the step key, so compare early and late averages.
    losses, *_ = _steps_on_one_batch(config, 16)
    assert np.mean(losses[-4:]) < 0.8 * np.mean(losses[:4]), losses


def test_learnable_mask_token_trains(phantom_store):
    config = tiny_config(phantom_store, "mae.imputation='token'", "optim.warmup_steps=1")
    losses, task, before, after = _steps_on_one_batch(config, 6)
    assert task.model.mask_token is not None
    moved = np.abs(np.asarray(after["mask_token"]["value"]) - np.asarray(before["mask_token"]["value"]))
    assert (moved > 0).all() and np.isfinite(losses).all()


def test_loss_uses_the_paper_mask_and_weights(phantom_store):
    config = tiny_config(phantom_store)
    loss_fn = mae_loss_fn(config.mae)

    class Identity(nnx.Module):  # returns its (masked) input: error only where masked
        def __call__(self, x, mask, deterministic=True):
            return x * (1 - mask)

    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 16, 2))
    loss, aux = loss_fn(Identity(), {"image": x}, jax.random.key(1), False)
    from petct_jax.mae import block_mask
    mask = block_mask(jax.random.key(1), x.shape, (4, 4, 4), 0.5, True)
    expected = float(jnp.sum(mask * x ** 2) / jnp.sum(mask))
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(aux["masked_fraction"]) == pytest.approx(float(mask.mean()))


def _cli(workdir, store, *extra):
    return [sys.executable, "-m", "petct_jax.cli", "pretrain",
            "--config", os.path.join(REPO, "configs/pretrain.py:tiny"), "--workdir", workdir,
            f"--config.store={store}", *[f"--config.{o}" for o in TINY],
            "--config.total_steps=8", "--config.ckpt.every_steps=2", "--config.eval_every=4",
            "--config.log_every=1", "--config.preview_every=8", *extra]


def _train_losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "split" not in r]


@pytest.mark.slow
def test_cli_runs_and_resumes_after_kill_9(phantom_store, tmp_path):
    full = str(tmp_path / "full")
    out = subprocess.run(_cli(full, phantom_store), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metrics_lib.read_metrics(full)
    assert {"step", "loss", "lr"} <= set(rows[0])
    assert [r["step"] for r in rows if r.get("split") == "val"] == [4, 8]
    assert os.path.exists(os.path.join(full, "previews", "step_0000008.png"))
    summary = json.load(open(os.path.join(full, "summary.json")))
    assert summary["steps"] == 8 and summary["best_step"] in (4, 8)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli(killed, phantom_store), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_dir = os.path.join(killed, "checkpoints")
    wait_for(lambda: proc.poll() is not None or (os.path.isdir(ckpt_dir) and any(
        d.isdigit() and int(d) >= 4 for d in os.listdir(ckpt_dir))), timeout=500, interval=0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(_cli(killed, phantom_store), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.load(open(os.path.join(killed, "summary.json")))
    assert summary["resumed_from"] is not None and summary["resumed_from"] >= 4
    a, b = _train_losses(full), _train_losses(killed)
    assert [s for s, _ in b] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-5)


def test_missing_store_is_a_clear_error(tmp_path):
    from petct_jax import cli
    code = cli.main(["pretrain", "--config", os.path.join(REPO, "configs/pretrain.py:tiny"),
                     "--workdir", str(tmp_path / "w")])
    assert code == 2
