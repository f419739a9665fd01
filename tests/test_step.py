"""The jitted train step (petct_jax/train/step.py) as XLA compiles it for a data-parallel mesh."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def accum():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(HERE, "accum_step.py")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_runs_on_eight_devices(accum):
    assert accum["devices"] == 8


@pytest.mark.parametrize("steps", ["1", "2", "4"])
def test_micro_batches_stay_on_their_devices(accum, steps):
    # an all-gather of the batch would mean each device computes A times its share
    assert accum["accum"][steps]["all_gathers"] == []


@pytest.mark.parametrize("steps", ["2", "4"])
def test_accumulated_gradients_equal_one_batch(accum, steps):
    one, many = accum["accum"]["1"], accum["accum"][steps]
    assert many["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert many["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-6)
    np.testing.assert_allclose(many["params"], one["params"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", ["2", "4"])
def test_each_device_does_its_share_of_the_work_once(accum, steps):
    # XLA's cost analysis counts a scan's body once: per-device FLOPs of the step are the
    # body's times A (an all-gathered micro-batch would make them D = 8 times larger)
    flops = accum["accum"][steps]["flops"] * int(steps)
    assert flops == pytest.approx(accum["accum"]["1"]["flops"], rel=0.05)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    dump = str(tmp_path_factory.mktemp("hlo"))
    out = subprocess.run([sys.executable, os.path.join(HERE, "fsdp_step.py"), dump],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fsdp_gathers_kernels_in_the_compute_dtype(fsdp):
    assert fsdp["devices"] == 8 and fsdp["split_params"] > 0
    gathers = fsdp["all_gathers"]
    assert gathers.get("bf16 5-D", 0) > 0  # the convolution kernels, gathered before use
    # float32 moves only as vectors: replicated biases and norm scales after their update
    assert {k for k in gathers if k.startswith("f32")} <= {"f32 1-D"}
