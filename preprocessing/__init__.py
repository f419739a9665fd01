"""Offline stage: raw PET/CT cohorts (NIfTI) -> harmonized TensorStore store.

Installed as `petct_jax.preprocessing` (pyproject maps this folder into the package).
The synthetic cohorts it reads come from `petct_jax.phantoms`, a data source upstream
of this stage.
"""
