"""The launch scripts: valid bash, and with DRY_RUN=1 the commands they would run.

(launch/local.sh also runs for real, two processes on localhost, in test_scale.py.)
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from conftest import REPO

SCRIPTS = ["slurm_pretrain.sbatch", "tpu_vm.sh", "local.sh"]


def _run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PETCT_"))}
    base.update(env)
    return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args],
                          capture_output=True, text=True, env=base, timeout=60)


def _dry(script: str, *args: str, **env: str) -> list[list[str]]:
    out = _run(script, *args, DRY_RUN="1", **env)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def _petct_args(argv: list[str]) -> list[str]:
    return argv[argv.index("pretrain"):]


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_are_valid_bash(script):
    out = subprocess.run(["bash", "-n", os.path.join(REPO, "launch", script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_document_an_example_and_their_variables(script):
    with open(os.path.join(REPO, "launch", script)) as f:
        head = f.read().split("set -euo pipefail")[0]
    for word in ("Worked example", "Environment:", "STORE", "WORKDIR", "DRY_RUN=1"):
        assert word in head, word


@pytest.mark.parametrize("script, env", [
    ("slurm_pretrain.sbatch", {}), ("local.sh", {}), ("tpu_vm.sh", {"TPU_NAME": "t", "ZONE": "z"})])
def test_missing_store_is_refused(script, env):
    out = _run(script, DRY_RUN="1", WORKDIR="w", **env)
    assert out.returncode != 0 and "STORE" in out.stderr


def test_slurm_dry_run_prints_one_srun_step_of_one_process_per_gpu():
    [argv] = _dry("slurm_pretrain.sbatch", "--config.batch_size=32",
                  STORE="/shared/store", WORKDIR="/shared/runs/a b", NODES="3", GPUS_PER_NODE="8")
    assert argv[0] == "srun"
    assert {"--nodes=3", "--ntasks=24", "--ntasks-per-node=8", "--kill-on-bad-exit=1"} <= set(argv)
    assert argv[argv.index("pretrain") - 1] == "petct"
    assert _petct_args(argv) == ["pretrain", "--config", "configs/pretrain.py:plain_unet",
                                 "--workdir", "/shared/runs/a b", "--config.store=/shared/store",
                                 "--config.batch_size=32", "--dry-run"]


def test_slurm_dry_run_inside_an_allocation_uses_its_sizes():
    [argv] = _dry("slurm_pretrain.sbatch", STORE="s", WORKDIR="w", CONFIG="configs/pretrain.py:swin_base",
                  PETCT="python -m petct_jax.cli", SLURM_JOB_NUM_NODES="4", SLURM_NTASKS_PER_NODE="2")
    assert {"--nodes=4", "--ntasks=8", "--ntasks-per-node=2"} <= set(argv)
    assert argv[argv.index("pretrain") - 3:argv.index("pretrain")] == ["python", "-m", "petct_jax.cli"]
    assert "configs/pretrain.py:swin_base" in argv


def test_slurm_script_requeues_on_preemption():
    with open(os.path.join(REPO, "launch", "slurm_pretrain.sbatch")) as f:
        text = f.read()
    assert "#SBATCH --requeue" in text
    assert "#SBATCH --signal=B:USR1@" in text
    assert "trap requeue USR1" in text and 'scontrol requeue "${SLURM_JOB_ID}"' in text


def test_tpu_dry_run_runs_the_same_command_on_every_worker():
    [argv] = _dry("tpu_vm.sh", "--config.mesh.fsdp=8", TPU_NAME="petct-v5p-64", ZONE="us-east5-a",
                  PROJECT="proj", STORE="gs://b/store", WORKDIR="gs://b/runs/r",
                  SETUP="source ~/venv/bin/activate")
    assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "petct-v5p-64"]
    assert "--worker=all" in argv
    assert argv[argv.index("--zone") + 1] == "us-east5-a" and argv[argv.index("--project") + 1] == "proj"
    remote = shlex.split(argv[argv.index("--command") + 1])
    assert remote[:3] == ["cd", "~/petct-jax", "&&"]
    assert "PETCT_DISTRIBUTED=1" in remote and remote[remote.index("pretrain") - 1] == "petct"
    assert _petct_args(remote) == ["pretrain", "--config", "configs/pretrain.py:plain_unet",
                                   "--workdir", "gs://b/runs/r", "--config.store=gs://b/store",
                                   "--config.mesh.fsdp=8", "--dry-run"]


def test_local_dry_run_one_process():
    [argv] = _dry("local.sh", STORE="runs/store", WORKDIR="runs/mae")
    assert argv[0] == "petct"
    assert _petct_args(argv) == ["pretrain", "--config", "configs/pretrain.py:plain_unet", "--workdir",
                                 "runs/mae", "--config.store=runs/store", "--dry-run"]


def test_local_dry_run_quotes_words_a_shell_would_split():
    [argv] = _dry("local.sh", "--config.seed=1", STORE="runs/store", WORKDIR="runs/it's a run")
    assert _petct_args(argv)[3:5] == ["--workdir", "runs/it's a run"]


def test_local_dry_run_processes_on_localhost():
    lines = _dry("local.sh", STORE="s", WORKDIR="w", NPROC="2", CPU_DEVICES="2", PORT="23456")
    assert len(lines) == 2
    for i, argv in enumerate(lines):
        assert argv[0] == "env" and argv[-1] == "&"
        assert {"JAX_PLATFORMS=cpu", "JAX_NUM_CPU_DEVICES=2", "PETCT_COORDINATOR=localhost:23456",
                "PETCT_NUM_PROCESSES=2", f"PETCT_PROCESS_ID={i}"} <= set(argv)
        assert "--workdir" in argv and "--config" in argv and argv[-2] == "--dry-run"
    gpus = _dry("local.sh", STORE="s", WORKDIR="w", NPROC="2")
    assert [next(a for a in argv if a.startswith("CUDA_VISIBLE_DEVICES")) for argv in gpus] == \
        ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
