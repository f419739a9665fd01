"""The shared training loop: learning, resume after a crash, the non-finite guard."""

import os
import signal

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from petct_jax.errors import PetctError
from petct_jax.train import loop as loop_lib
from petct_jax.train import metrics as metrics_lib
from petct_jax.train.preemption import Preempted


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 2, (3, 3, 3), padding=((1, 1),) * 3, rngs=rngs)

    def __call__(self, x, *, deterministic=True):
        return self.conv(x)


def loss_fn(model, batch, key, train):
    pred = model(batch["image"])
    noise = 0.0 * jax.random.normal(key, ())  # keys reach the loss
    return jnp.mean((pred - batch["target"]) ** 2) + noise, {"mean_pred": jnp.mean(pred)}


def _make_example(i):
    rng = np.random.default_rng(int(i))
    x = rng.normal(size=(8, 8, 8, 2)).astype(np.float32)
    if i == 13:
        x[0, 0, 0, 0] = np.nan  # a poisoned record, used by the NaN tests
    return {"image": x, "target": np.roll(x, 1, axis=0)}


def make_iter(poison=False):
    ds = grain.MapDataset.range(64 if poison else 12).seed(0).shuffle().repeat()
    ds = ds.map(lambda i: _make_example(13 if poison and i % 2 else int(i) if int(i) != 13 else 0))
    return iter(ds.to_iter_dataset().batch(2))


def config(total=8, **kw):
    c = ml_collections.ConfigDict(dict(
        task="toy", seed=0, total_steps=total, batch_size=2, grad_accum=1,
        optim=dict(lr=5e-2, end_lr=1e-4, warmup_steps=1, weight_decay=0.0, clip_norm=1.0,
                   b1=0.9, b2=0.999, eps=1e-8),
        mesh=dict(data=-1, fsdp=1, min_fsdp_size=2 ** 18, rules=()),
        ckpt=dict(every_steps=4, keep=2, keep_best=1, async_save=True),
        log_every=1, eval_every=4, eval_batches=1, preview_every=1000, on_nonfinite="stop"))
    c.update(kw)
    return c


def task(train_iter):
    val = [_make_example(100) | {}]
    val = [{k: v[None] for k, v in val[0].items()}]
    return loop_lib.Task(model=Toy(nnx.Rngs(0)), loss_fn=loss_fn, train_iter=train_iter,
                         val_batches=val, voxels_per_batch=2 * 8 ** 3)


class Crash(Exception):
    pass


def calling(it, on_call):
    """The iterator, calling `on_call(n)` before it hands out batch n (from 1)."""
    class It:
        def __init__(self):
            self.n = 0

        def __next__(self):
            self.n += 1
            on_call(self.n)
            return next(it)

        def get_state(self):
            return it.get_state()

        def set_state(self, s):
            it.set_state(s)
    return It()


def crash_after(after):
    def on_call(n):
        if n > after:
            raise Crash()
    return on_call


def signal_at(call, signum, times=1):
    """Send this process `signum` (SIGTERM as a scheduler, SIGINT as Ctrl-C) `times` times
    when batch `call` is asked for."""
    def on_call(n):
        if n == call:
            for _ in range(times):
                os.kill(os.getpid(), signum)
    return on_call


def train_losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(workdir) if "split" not in r]


def test_loss_falls_and_files_are_written(tmp_path):
    wd = str(tmp_path / "run")
    summary = loop_lib.train(config(total=12), wd, task(make_iter()))
    losses = [l for _, l in train_losses(wd)]
    assert len(losses) == 12 and losses[-1] < 0.7 * losses[0]
    assert summary["steps"] == 12 and summary["final_val"]["split"] == "val"
    assert os.path.exists(os.path.join(wd, "config.json"))
    assert os.path.exists(os.path.join(wd, "summary.json"))
    assert os.listdir(os.path.join(wd, "tensorboard"))


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    full = str(tmp_path / "full")
    loop_lib.train(config(), full, task(make_iter()))
    crashed = str(tmp_path / "crashed")
    with pytest.raises(Crash):
        loop_lib.train(config(), crashed, task(calling(make_iter(), crash_after(6))))
    # Steps 5 and 6 were logged but not checkpointed: the resumed run redoes them.
    summary = loop_lib.train(config(), crashed, task(make_iter()))
    assert summary["resumed_from"] == 4
    a, b = train_losses(full), train_losses(crashed)
    assert [s for s, _ in b] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-6)


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_a_signal_saves_the_step_and_the_resumed_run_equals_uninterrupted(tmp_path, signum, name):
    full = str(tmp_path / "full")
    loop_lib.train(config(), full, task(make_iter()))
    stopped = str(tmp_path / "stopped")
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Preempted, match=f"{name}.* after step 6, which is saved") as err:
        loop_lib.train(config(), stopped, task(calling(make_iter(), signal_at(6, signum))))
    assert err.value.exit_code == 128 + signum
    # The handlers are the run's only.
    assert {s: signal.getsignal(s) for s in before} == before
    steps = sorted(int(d) for d in os.listdir(os.path.join(stopped, "checkpoints")) if d.isdigit())
    assert steps == [4, 6]  # 6 is not a periodic step (every 4)
    summary = loop_lib.train(config(), stopped, task(make_iter()))
    assert summary["resumed_from"] == 6
    a, b = train_losses(full), train_losses(stopped)
    assert [s for s, _ in b] == list(range(1, 9))
    np.testing.assert_allclose([l for _, l in a], [l for _, l in b], rtol=1e-6)


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    wd = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        loop_lib.train(config(), wd, task(calling(make_iter(), signal_at(6, signal.SIGINT, times=2))))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    steps = sorted(int(d) for d in os.listdir(os.path.join(wd, "checkpoints")) if d.isdigit())
    assert steps == [4]  # the periodic checkpoint only


def test_a_stopped_run_exits_with_143(monkeypatch, tmp_path):
    from petct_jax import cli
    from petct_jax.mae import pretrain

    def stopped(args):
        raise Preempted("stopped by SIGTERM after step 3, which is saved")
    monkeypatch.setattr(pretrain, "run", stopped)
    assert cli.main(["pretrain", "--config", "configs/pretrain.py:tiny", "--workdir", str(tmp_path)]) == 143


def test_nonfinite_stops_without_overwriting_checkpoint(tmp_path):
    wd = str(tmp_path / "nan")
    with pytest.raises(loop_lib.NonFiniteLoss, match="non-finite"):
        loop_lib.train(config(total=8), wd, task(make_iter(poison=True)))
    ckpts = os.listdir(os.path.join(wd, "checkpoints"))
    assert not [c for c in ckpts if c.isdigit()]  # nothing saved from a poisoned state


def test_nonfinite_skip_keeps_parameters_finite(tmp_path):
    wd = str(tmp_path / "skip")
    summary = loop_lib.train(config(total=8, on_nonfinite="skip"), wd, task(make_iter(poison=True)))
    assert summary["steps"] == 8
    rows = metrics_lib.read_metrics(wd)
    assert any(r.get("skipped_nonfinite") for r in rows)
    assert np.isfinite(summary["final_val"]["loss"])


def test_gradient_accumulation_equals_the_full_batch():
    from petct_jax.train import optim, step as step_lib

    cfg = config()
    tx, schedule = optim.make_optimizer(cfg.optim, 10)
    graphdef, params, rest = step_lib.split_model(Toy(nnx.Rngs(0)))
    state = step_lib.init_state(params, tx, 0)
    batch = {k: np.stack([_make_example(i)[k] for i in range(4)]) for k in ("image", "target")}
    out = {}
    for accum in (1, 2, 4):
        step = jax.jit(step_lib.make_train_step(graphdef, rest, loss_fn, tx, schedule, accum_steps=accum))
        new, m = step(jax.tree.map(jnp.array, state), batch)
        out[accum] = (float(m["loss"]), float(m["grad_norm"]), jax.device_get(new["params"]))
    for accum in (2, 4):
        assert out[accum][0] == pytest.approx(out[1][0], rel=1e-5)
        assert out[accum][1] == pytest.approx(out[1][1], rel=1e-4)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), out[accum][2], out[1][2])


def test_grad_accum_must_divide_the_per_device_batch(tmp_path):
    with pytest.raises(PetctError, match="grad_accum=4 does not divide the per-device batch 2"):
        loop_lib.train(config(grad_accum=4), str(tmp_path / "w"), task(make_iter()))
