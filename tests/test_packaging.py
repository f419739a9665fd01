"""The wheel: one import package, `petct_jax`, carrying configs/, preprocessing/ and every
subpackage of the source tree, so an installed copy runs from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory):
    # Built from a copy: setuptools builds in the source folder, and a stale build/ there
    # could both leak old files into the wheel and litter the checkout.
    source = tmp_path_factory.mktemp("source") / "petct-jax"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", "runs", ".whl"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(source)], check=True, capture_output=True)
    [wheel] = [p for p in os.listdir(out) if p.endswith(".whl")]
    with zipfile.ZipFile(out / wheel) as zf:
        return set(zf.namelist())


def _source_packages():
    """Each folder with an __init__.py, named as the wheel installs it."""
    mapped = {"petct_jax": "petct_jax", "configs": "petct_jax/configs",
              "preprocessing": "petct_jax/preprocessing"}
    found = set()
    for top, installed in mapped.items():
        for root, _, files in os.walk(os.path.join(REPO, top)):
            if "__init__.py" in files:
                rel = os.path.relpath(root, os.path.join(REPO, top))
                found.add(installed if rel == "." else f"{installed}/{rel}")
    return found


def test_wheel_installs_petct_jax_alone(wheel_names):
    tops = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"petct_jax"}


def test_wheel_carries_configs_preprocessing_and_every_subpackage(wheel_names):
    for package in _source_packages():
        assert f"{package}/__init__.py" in wheel_names, package
    for name in ("pretrain.py", "finetune.py", "probe.py", "study.py"):
        assert f"petct_jax/configs/{name}" in wheel_names
    assert "petct_jax/preprocessing/harmonize.py" in wheel_names
    assert "petct_jax/phantoms/cohort.py" in wheel_names
