"""Shared fixtures: a tiny phantom cohort and its harmonized store, made once per session."""

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def phantom_store(tmp_path_factory):
    """6 tiny whole-body phantom studies (AutoPET layout) preprocessed into a store."""
    from preprocessing.phantoms.cohort import generate_cohort
    from preprocessing.preprocess import preprocess

    root = tmp_path_factory.mktemp("phantom_store")
    raw, store = str(root / "raw"), str(root / "store")
    generate_cohort(raw, 6, seed=0, size="tiny", progress=False)
    preprocess(raw, store, workers=1, progress=False)
    return store
