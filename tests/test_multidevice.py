"""Data-parallel and FSDP steps on 8 virtual CPU devices equal the 1-device step."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def multidevice():
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(REPO, "tests", "multidevice_step.py"), REPO],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices(multidevice):
    assert multidevice["devices"] == 8


@pytest.mark.parametrize("layout", ["data8", "fsdp"])
def test_sharded_steps_equal_single_device(multidevice, layout):
    import numpy as np
    np.testing.assert_allclose(multidevice[f"loss_{layout}"], multidevice["loss_single"], rtol=1e-5)
    np.testing.assert_allclose(multidevice[f"grad_norm_{layout}"], multidevice["grad_norm_single"], rtol=1e-4)
    assert multidevice[f"max_grad_diff_{layout}"] < 1e-4


def test_fsdp_really_splits_parameters(multidevice):
    assert multidevice["fsdp_split_params"] > 0
