"""Offline stage: raw PET/CT cohorts (NIfTI) -> harmonized TensorStore store.

Also home of the digital phantom cohort generator (`petct phantoms`), which writes
raw cohorts in the AutoPET and nnU-Net layouts.
"""
