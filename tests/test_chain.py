"""The whole downstream chain through the CLI, as a user runs it on the phantom cohort:
MAE pretraining -> fine-tuning from it -> `petct predict` on the raw NIfTI folder ->
`petct evaluate` against the raw ground truth."""

import json
import os
import shutil

import nibabel as nib
import numpy as np

from conftest import REPO
from downstream_helpers import TINY_DATA, TINY_UNET, phantom_split, tiny_mae_run


def test_pretrain_finetune_predict_evaluate(phantom_store, tmp_path):
    from petct_jax import cli
    from petct_jax.preprocessing.readers import list_cases

    mae = tiny_mae_run(phantom_store, str(tmp_path), "joint")
    split = str(tmp_path / "split.json")
    phantom_split(phantom_store, split)
    seg_run = str(tmp_path / "seg")
    assert cli.main(["finetune", "--config", os.path.join(REPO, "configs/finetune.py:tiny"),
                     "--workdir", seg_run, f"--config.store={phantom_store}", f"--config.init={mae}",
                     f"--config.data.split={split}", *[f"--config.{o}" for o in TINY_DATA + TINY_UNET],
                     "--config.total_steps=2", "--config.ckpt.every_steps=2", "--config.eval_every=2",
                     "--config.eval.batch_windows=32"]) == 0

    raw = os.path.join(os.path.dirname(phantom_store), "raw")
    pred, gt, report = str(tmp_path / "pred"), str(tmp_path / "gt"), str(tmp_path / "report")
    assert cli.main(["predict", "--checkpoint", seg_run, "--input", raw, "--out", pred,
                     "--batch-windows", "32", "--no-progress"]) == 0
    os.makedirs(gt)
    specs = list_cases(raw, "autopet")
    for spec in specs:
        shutil.copyfile(spec.seg, os.path.join(gt, f"{spec.id}.nii.gz"))
        written, truth = nib.load(os.path.join(pred, f"{spec.id}.nii.gz")), nib.load(spec.seg)
        assert written.shape == truth.shape and np.allclose(written.affine, truth.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}

    assert cli.main(["evaluate", "--pred", pred, "--gt", gt, "--out", report, "--no-progress"]) == 0
    summary = json.load(open(os.path.join(report, "summary.json")))
    assert summary["n_cases"] == len(specs) == 6
    assert summary["n_tumour_free"] == 2 and summary["n_with_lesions"] == 4
    assert summary["mean_fpv_ml"] is not None and summary["mean_fpv_ml"] >= 0
