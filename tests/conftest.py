"""Shared fixtures: a tiny phantom cohort and its harmonized store, made once per session."""

import atexit
import os
import shutil
import tempfile

import pytest

from petct_jax.cpu_process import prepare_cpu_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The suite is an entry point like `petct`: XLA:CPU's flag goes in before any test starts a
# backend, and reaches the processes tests start through the environment.
prepare_cpu_process(huge_pages=False)

# One persistent XLA compilation cache for the whole run, shared by the pytest workers and by
# the `petct` processes tests start (environment variables, set before any test imports JAX):
# the same tiny networks are compiled again and again by separate processes otherwise.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="petct_test_jax_cache_")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory):
    """6 tiny whole-body phantom studies (AutoPET layout) preprocessed into a store."""
    from petct_jax.phantoms.cohort import generate_cohort
    from petct_jax.preprocessing.preprocess import preprocess

    root = tmp_path_factory.mktemp("phantom_store")
    raw, store = str(root / "raw"), str(root / "store")
    generate_cohort(raw, 6, seed=0, size="tiny", progress=False)
    preprocess(raw, store, workers=1, progress=False)
    return store
