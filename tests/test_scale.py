"""Scaling out, proven on one machine.

- multi-host start-up: which environments start `jax.distributed`, never in Grain workers;
- the dry run: mesh, per-host batch, parameter shardings, memory per device, no store;
- a checkpoint written on 8 devices (FSDP) restores exactly on 1 and on 4 (resharding);
- two processes x 2 CPU devices joined on localhost: disjoint data shards that assemble
  into the global batch, and `petct pretrain` (through launch/local.sh) saving one
  checkpoint from both and resuming from it after a restart, then in one process;
- workdirs on object storage: checkpoint paths and the rewrite mode of the metrics file.

Every multi-device or multi-process case runs in fresh subprocesses (tests/scale_*.py):
the device count is fixed when JAX starts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

import scale_data
from conftest import REPO
from process_helpers import kill_all, wait_for
from petct_jax.errors import PetctError
from petct_jax.train import distributed

TESTS = os.path.join(REPO, "tests")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PETCT_", "SLURM_", "TPU_")) and k != "JAX_NUM_CPU_DEVICES"}
    env.update(JAX_PLATFORMS="cpu", **{k: str(v) for k, v in extra.items()})
    return env


def _json_line(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------
# Multi-host start-up

@pytest.mark.parametrize("environ, kind", [
    ({}, None),
    ({"PETCT_COORDINATOR": "h:1234", "PETCT_NUM_PROCESSES": "4", "PETCT_PROCESS_ID": "3"}, "explicit"),
    ({"PETCT_COORDINATOR": "h:1234", "PETCT_NUM_PROCESSES": "1", "PETCT_PROCESS_ID": "0"}, None),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "2", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_JOB_ID": "7"}, "slurm"),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "7"}, None),  # the batch shell, not srun
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "w0"}, None),
    ({"PETCT_DISTRIBUTED": "1"}, "cluster"),
    ({"PETCT_DISTRIBUTED": "0", "SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_STEP_NODELIST": "n1"}, None),
])
def test_detect_multi_process_environments(environ, kind):
    launch = distributed.detect(environ, tpu_workers=lambda: 1)
    assert (launch and launch.kind) == kind
    if kind == "explicit":
        assert launch.kwargs == {"coordinator_address": "h:1234", "num_processes": 4, "process_id": 3}
    elif kind is not None:
        assert launch.kwargs == {}  # JAX reads SLURM / TPU variables itself


def test_detect_cloud_tpu_vm_workers_from_metadata():
    assert distributed.detect({}, tpu_workers=lambda: 4).kind == "tpu"
    assert distributed.detect({}, tpu_workers=lambda: 1) is None


@pytest.mark.parametrize("environ, message", [
    ({"PETCT_COORDINATOR": "h:1", "PETCT_PROCESS_ID": "0"}, "PETCT_NUM_PROCESSES"),
    ({"PETCT_COORDINATOR": "h:1", "PETCT_NUM_PROCESSES": "2", "PETCT_PROCESS_ID": "2"}, "PETCT_PROCESS_ID=2"),
    ({"PETCT_COORDINATOR": "h:1", "PETCT_NUM_PROCESSES": "two", "PETCT_PROCESS_ID": "0"}, "not an integer"),
    ({"PETCT_DISTRIBUTED": "maybe"}, "PETCT_DISTRIBUTED"),
])
def test_bad_settings_are_clear_errors(environ, message):
    with pytest.raises(PetctError, match=message):
        distributed.detect(environ, tpu_workers=lambda: 1)


def test_never_initializes_inside_worker_processes():
    # Process 1 of 2 pointing at a coordinator nobody runs: outside a worker this would
    # block in jax.distributed.initialize; in a spawned worker it must return at once.
    environ = {"PETCT_COORDINATOR": f"localhost:{_free_port()}", "PETCT_NUM_PROCESSES": "2",
               "PETCT_PROCESS_ID": "1"}
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply_async(distributed.in_worker_process).get(timeout=120) is True
        assert pool.apply_async(distributed.initialize, (environ,)).get(timeout=120) is None
    assert distributed.in_worker_process() is False


# --------------------------------------------------------------------------------------
# The dry run

def _dry_run(devices: int, *overrides: str, mode: str = "--dry-run"):
    cmd = [sys.executable, "-m", "petct_jax.cli", "pretrain", "--config",
           os.path.join(REPO, "configs/pretrain.py:tiny"), "--workdir", "/nonexistent/w", mode,
           "--config.data.patch=(16,16,16)", "--config.mae.block=(4,4,4)", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=_env(JAX_NUM_CPU_DEVICES=devices))


@pytest.fixture(scope="module")
def fsdp_plan():
    out = _dry_run(8, "--config.batch_size=8", "--config.mesh.fsdp=4", "--config.mesh.min_fsdp_size=4096")
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def _bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]


def test_dry_run_prints_mesh_and_batches_without_a_store(fsdp_plan):
    assert "mesh: data=2 x fsdp=4 (8 cpu devices" in fsdp_plan
    assert "devices per host: process 0: 8" in fsdp_plan
    assert "batch: global 8, per host 8, per device 1, grad_accum 1" in fsdp_plan
    assert "image: global (8, 16, 16, 16, 2), per host (8, 16, 16, 16, 2), per device (1, 16, 16, 16, 2)" in fsdp_plan


def test_dry_run_shows_sharded_parameter_groups_and_bytes(fsdp_plan):
    from petct_jax.config import resolve
    from petct_jax.mae.pretrain import build_model
    from flax import nnx
    import jax

    config = resolve(os.path.join(REPO, "configs/pretrain.py:tiny"))
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param)))
    assert f"parameters: {n_params:,} (" in fsdp_plan
    rows = {line.split()[0]: line for line in fsdp_plan.splitlines()
            if line.startswith("  backbone/")}
    assert "backbone/encoder/stages/3" in rows and "backbone/decoder/seg_layers/0" in rows
    big = rows["backbone/encoder/stages/3"]
    assert "fsdp" in big and "3x3x3x64x64" in big
    total, per_device = _bytes(" ".join(big.split()[-4:-2])), _bytes(" ".join(big.split()[-2:]))
    assert per_device < total / 2  # the large kernels are split 4 ways
    assert "fsdp" not in rows["backbone/decoder/seg_layers/0"]  # small ones stay replicated
    line = next(l for l in fsdp_plan.splitlines() if l.startswith("parameters:"))
    assert _bytes(line.split("(")[1].split(";")[0]) == pytest.approx(4 * n_params, rel=1e-3)


def test_dry_run_estimates_memory_per_device(fsdp_plan):
    assert "memory per device:" in fsdp_plan
    assert "compiled step (per device, this backend): arguments" in fsdp_plan
    peak = next(l for l in fsdp_plan.splitlines() if "peak estimate" in l)
    state = next(l for l in fsdp_plan.splitlines() if "(from the shardings)" in l)
    assert _bytes(peak.split("peak estimate")[1].strip()) > _bytes(state.split("=")[1].split("(")[0].strip())


def test_dry_run_reports_a_batch_the_mesh_cannot_split():
    out = _dry_run(8, "--config.batch_size=6", mode="--dry-run=shapes")
    assert out.returncode == 1
    assert "PROBLEM: batch_size=6 is not divisible by the 8 devices of the mesh" in out.stdout
    assert "not compiled" in out.stdout


# --------------------------------------------------------------------------------------
# (b) A checkpoint written on 8 devices restores on 1 and on 4

@pytest.fixture(scope="module")
def resharded(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("reshard"))
    script = os.path.join(TESTS, "scale_checkpoint.py")
    run = lambda mode, n: _json_line(subprocess.run(
        [sys.executable, script, mode, directory], capture_output=True, text=True, timeout=600,
        env=_env(JAX_NUM_CPU_DEVICES=n)))
    written = run("write", 8)
    return written, {n: run("restore", n) for n in (1, 4)}


def test_checkpoint_written_with_parameters_split_over_8_devices(resharded):
    written, _ = resharded
    assert written["devices"] == 8 and written["split_leaves"] > 10


@pytest.mark.parametrize("devices", [1, 4])
def test_checkpoint_restores_exactly_on_other_device_counts(resharded, devices):
    written, restored = resharded
    r = restored[devices]
    assert r["devices"] == devices and r["step"] == 7
    assert r["leaves"] == written["leaves"] and not r["missing"]
    assert r["mismatched"] == [] and r["wrong_layout"] == []
    assert (r["split_leaves"] > 0) == (devices > 1)
    assert r["next_data"] == 3  # the Grain iterator resumes where it was saved


# --------------------------------------------------------------------------------------
# (c) Two processes x 2 CPU devices on localhost

def _two_processes(args: list[str], out_dir: str, timeout: int = 300) -> list[str]:
    port = _free_port()
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=_env(JAX_NUM_CPU_DEVICES=2, PETCT_COORDINATOR=f"localhost:{port}",
                                       PETCT_NUM_PROCESSES=2, PETCT_PROCESS_ID=i))
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [os.path.join(out_dir, f"process_{i}.npz") for i in range(2)]


@pytest.fixture(scope="module")
def two_process_data(phantom_store, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_process_data"))
    paths = _two_processes([sys.executable, os.path.join(TESTS, "scale_data.py"), phantom_store, out], out)
    return [dict(np.load(p)) for p in paths]


def test_two_processes_form_one_job(two_process_data):
    for i, d in enumerate(two_process_data):
        assert str(d["kind"]) == "explicit"
        assert int(d["process_index"]) == i and int(d["process_count"]) == 2
        assert int(d["devices"]) == 4 and int(d["local_devices"]) == 2


def test_each_process_reads_its_own_share_of_every_global_batch(two_process_data, phantom_store):
    from petct_jax.data.pipeline import make_patch_iterator

    a, b = two_process_data
    for batch in range(2):
        mine, theirs = set(a["index"][batch].tolist()), set(b["index"][batch].tolist())
        assert not mine & theirs
        assert mine | theirs == set(range(4 * batch, 4 * batch + 4))
    # The same samples, patch for patch, as one process reading the whole global batch.
    single = make_patch_iterator(phantom_store, None, scale_data.DATA,
                                 seed=0, batch_size=4, task="mae", with_ids=True,
                                 process_index=0, process_count=1)
    reference = [next(single) for _ in range(2)]
    single.close()
    for d in two_process_data:
        for batch in range(2):
            for row, g in enumerate(d["index"][batch]):
                ref = reference[batch]
                j = int(np.flatnonzero(ref["index"] == g)[0])
                assert d["case"][batch][row] == ref["case"][j]
                np.testing.assert_array_equal(d["image"][batch][row], ref["image"][j])


def test_global_batch_gathers_to_both_local_batches(two_process_data):
    a, b = two_process_data
    expected = np.concatenate([a["image"], b["image"]], axis=1)  # (batch, rows, ...)
    np.testing.assert_array_equal(a["gathered"], expected)
    np.testing.assert_array_equal(b["gathered"], expected)


TRAIN_ARGS = ["--config.data.patch=(16,16,16)", "--config.mae.block=(4,4,4)", "--config.batch_size=4",
              "--config.eval_batches=1", "--config.data.zoom_prob=0.0", "--config.ckpt.every_steps=2",
              "--config.eval_every=2", "--config.log_every=1", "--config.preview_every=100",
              # parameters split over all 4 devices, i.e. across the two processes
              "--config.mesh.data=1", "--config.mesh.fsdp=4", "--config.mesh.min_fsdp_size=256",
              "--config.model.overrides.n_stages=3", "--config.model.overrides.features_per_stage=(4,8,16)",
              "--config.model.overrides.strides=(1,2,2)"]


@pytest.fixture(scope="module")
def two_process_training(phantom_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("two_process_training")
    workdir = str(root / "run")

    def launch(total_steps: int, processes: int = 2, devices: int = 2, *extra: str) -> dict:
        env = _env(NPROC=processes, CPU_DEVICES=devices, PORT=_free_port(), PETCT=f"{sys.executable} -m petct_jax.cli",
                   CONFIG=os.path.join(REPO, "configs/pretrain.py:tiny"), STORE=phantom_store,
                   WORKDIR=workdir, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0)
        out = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), *TRAIN_ARGS,
                              f"--config.total_steps={total_steps}", *extra],
                             capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        if processes == 1:  # local.sh runs it in the foreground
            logs = [out.stdout + out.stderr]
        else:
            logs = [open(os.path.join(workdir + ".logs", str(i))).read() for i in range(processes)]
        assert out.returncode == 0, out.stderr[-2000:] + "".join(log[-2000:] for log in logs)
        from petct_jax.train.metrics import read_metrics
        # What the kept checkpoints hold at this point (later runs delete old ones).
        data, state = {}, {}
        for step in filter(str.isdigit, os.listdir(os.path.join(workdir, "checkpoints"))):
            folder = os.path.join(workdir, "checkpoints", step)
            for name in os.listdir(os.path.join(folder, "data")):
                if name.startswith("process_"):
                    with open(os.path.join(folder, "data", name)) as f:
                        data[(int(step), name)] = json.load(f)["next_batch"]
            with open(os.path.join(folder, "state", "_sharding")) as f:
                state[int(step)] = {"files": os.listdir(os.path.join(folder, "state")),
                                    "shardings": [json.loads(v) for v in json.load(f).values()]}
        with open(os.path.join(workdir, "summary.json")) as f:
            return {"summary": json.load(f), "logs": logs, "metrics": read_metrics(workdir),
                    "data": data, "state": state}

    # Two processes to step 2; both again to step 4; then one process with one device
    # (another topology: parameters re-laid out, the data position taken over).
    return workdir, launch(2), launch(4), launch(6, 1, 1, "--config.mesh.fsdp=1")


@pytest.mark.slow
def test_two_processes_train_and_save_one_checkpoint(two_process_training):
    _, first, *_ = two_process_training
    assert first["summary"]["steps"] == 2 and first["summary"]["resumed_from"] is None
    assert first["summary"]["devices"] == 4
    assert all("pretrain: 2 steps" in log for log in first["logs"])
    state = first["state"][2]
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(state["files"])  # both wrote their shards
    split = [s for s in state["shardings"] if "fsdp" in json.dumps(s["partition_spec"])]
    assert split and {d["id"] for row in split[0]["device_mesh"]["mesh"] for d in row} >= {0, 1, 2048, 2049}


@pytest.mark.slow
def test_two_processes_resume_from_the_saved_step(two_process_training):
    workdir, _, second, _ = two_process_training
    assert second["summary"]["resumed_from"] == 2 and second["summary"]["steps"] == 4
    assert all("pretrain: 4 steps" in log for log in second["logs"])
    rows = second["metrics"]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if r.get("split") == "val"] == [2, 4]
    # Each process's data iterator was restored at batch 2 and read 2 more.
    assert second["data"] == {(step, f"process_{i}-of-2.json"): step for step in (2, 4) for i in range(2)}
    # The preview gathers FSDP-split parameters from both processes.
    assert os.path.exists(os.path.join(workdir, "previews", "step_0000004.png"))


@pytest.mark.slow
def test_a_two_process_run_resumes_in_one_process(two_process_training):
    *_, third = two_process_training
    assert third["summary"]["resumed_from"] == 4 and third["summary"]["steps"] == 6
    assert third["summary"]["devices"] == 1
    assert [r["step"] for r in third["metrics"] if "split" not in r] == [1, 2, 3, 4, 5, 6]
    assert third["data"][(6, "process_0-of-1.json")] == 6  # continued from global batch 4


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_saved_step(phantom_store, tmp_path):
    """A preemption notice reaching one host: JAX's preemption service has both processes
    finish the same step, save it and exit with 143 (train/preemption.py)."""
    workdir = str(tmp_path / "run")
    env = _env(NPROC=2, CPU_DEVICES=2, PORT=_free_port(), PETCT=f"{sys.executable} -m petct_jax.cli",
               CONFIG=os.path.join(REPO, "configs/pretrain.py:tiny"), STORE=phantom_store,
               WORKDIR=workdir)
    proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"), *TRAIN_ARGS,
                             "--config.mesh.data=4", "--config.mesh.fsdp=1",  # compiles faster
                             "--config.total_steps=500", "--config.ckpt.every_steps=500",
                             "--config.eval_every=500"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    pids: list[int] = []
    try:
        pids = [int(proc.stdout.readline().split("(pid ")[1].split(")")[0]) for _ in range(2)]
        metrics = os.path.join(workdir, "metrics.jsonl")
        wait_for(lambda: proc.poll() is not None or (
            os.path.exists(metrics) and open(metrics).read().count("\n") >= 2), timeout=300)
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        os.kill(pids[1], signal.SIGTERM)
        proc.communicate(timeout=300)
    finally:  # nothing left running if the test failed
        kill_all([proc.pid, *pids])
    assert proc.returncode == 143  # local.sh passes the processes' status on
    logs = [open(os.path.join(workdir + ".logs", str(i))).read() for i in range(2)]
    stopped = [log.split("stopped by SIGTERM after step ")[-1].split(",")[0] for log in logs]
    assert stopped[0] == stopped[1] and stopped[0].isdigit(), [log[-1000:] for log in logs]
    steps = [d for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
    assert steps == [stopped[0]]  # the only checkpoint: none was due before step 500


# --------------------------------------------------------------------------------------
# Workdirs on object storage

def test_checkpoint_dir_keeps_urls():
    from petct_jax.train.checkpoint import checkpoint_dir
    assert checkpoint_dir("gs://bucket/runs/a/") == "gs://bucket/runs/a/checkpoints"
    assert checkpoint_dir("runs/a") == os.path.join(os.path.abspath("runs/a"), "checkpoints")


def test_metrics_rewrite_mode_equals_append_mode(tmp_path):
    from petct_jax.train import metrics as metrics_lib

    files = {}
    for append in (True, False):
        workdir = str(tmp_path / f"append_{append}")
        writer = metrics_lib.MetricsWriter(workdir, append=append)
        for step in range(1, 6):
            writer.write(step, {"loss": 1.0 / step})
        writer.write(4, {"loss": 0.5}, split="val")
        writer.close()
        metrics_lib.truncate_metrics(workdir, 3)  # a resume from step 3 ...
        writer = metrics_lib.MetricsWriter(workdir, append=append)
        writer.write(4, {"loss": 0.2})  # ... rewrites what came after
        writer.close()
        with open(os.path.join(workdir, "metrics.jsonl")) as f:
            files[append] = f.read()
    assert files[True] == files[False]
    assert [json.loads(l)["step"] for l in files[True].splitlines()] == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def paper_param_shapes():
    from flax import nnx
    import jax

    from petct_jax.config import resolve
    from petct_jax.mae.pretrain import build_model

    config = resolve(os.path.join(REPO, "configs/pretrain.py"))  # the paper's PlainConvUNet
    params = nnx.state(nnx.eval_shape(lambda: build_model(config, nnx.Rngs(0))), nnx.Param)
    return [(jax.tree_util.keystr(p), tuple(x.shape))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]]


@pytest.mark.parametrize("fsdp", [2, 3, 4, 6, 8])
def test_fsdp_rules_split_only_divisible_channel_axes(paper_param_shapes, fsdp):
    from types import SimpleNamespace

    from petct_jax.train.mesh import place_param

    mesh = SimpleNamespace(shape={"data": 1, "fsdp": fsdp})
    split = 0
    for name, shape in paper_param_shapes:
        spec, why = place_param(name, shape, mesh, (), 2 ** 14)
        axes = [d for d, a in enumerate(spec) if a == "fsdp"]
        if axes:
            [d] = axes
            assert d >= len(shape) - 2 and shape[d] % fsdp == 0, (name, shape, spec)
            split += 1
        elif int(np.prod(shape)) >= 2 ** 14:
            assert why == f"no channel axis divisible by fsdp={fsdp}"
            assert all(s % fsdp for s in shape[-2:])
        if len(shape) == 5 and shape[-1] == 320 and fsdp in (2, 4, 8):
            assert axes, (name, shape)  # the widest kernels are the ones worth splitting
    # The paper's widths (32..320) have no factor 3: fsdp 3 and 6 split nothing, and say so.
    assert (split > 0) == (fsdp in (2, 4, 8))


def test_dry_run_names_every_replicated_parameter_and_why():
    out = _dry_run(6, "--config.batch_size=6", "--config.mesh.fsdp=3", "--config.mesh.min_fsdp_size=4096")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "left replicated by the FSDP rules" in out.stdout
    line = next(l for l in out.stdout.splitlines() if "divisible by fsdp=3" in l)
    assert "backbone/encoder/stages/3/convs/1/conv/kernel 3x3x3x64x64" in line
    assert "elements < min_fsdp_size 4,096" in out.stdout
