"""nnU-Net v2 interop with the real nnunetv2 2.8.1: an exported fine-tuned run predicted by
`nnUNetv2_predict` equals `petct predict`, pretrained MAE weights load through nnU-Net's
`load_pretrained_weights`, and results folders / nnssl checkpoints import back exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import nibabel as nib
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("nnunetv2.inference.predict_from_raw_data")

from conftest import REPO  # noqa: E402
from petct_jax import cli, convert  # noqa: E402
from petct_jax.convert import nnunet_folder as nf  # noqa: E402
from petct_jax.errors import PetctError  # noqa: E402

TORCH_COMMON = dict(conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d,
                    norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None,
                    dropout_op_kwargs=None, nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def randomize(model: nnx.Module, seed: int) -> None:
    """Random values everywhere, so that masks and probabilities vary over the scan."""
    import jax
    import jax.numpy as jnp

    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    leaves = [jnp.asarray(rng.normal(0.0, 0.4, x.shape) + (1.0 if x.ndim == 1 else 0.0), x.dtype)
              for x in leaves]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))


def make_seg_run(path: str) -> str:
    """A fine-tuning-like run directory (config.json + one checkpoint) of a 3-stage
    PlainConvUNet with random weights, at 6 mm (recorded in config.data.spacing_zyx)."""
    from petct_jax.config import resolve
    from petct_jax.downstream.finetune import build_model
    from petct_jax.train.checkpoint import RunCheckpointer

    config = resolve(os.path.join(REPO, "configs", "finetune.py:tiny"),
                     ["store=/nonexistent/store", "data.patch=(16,16,16)", "eval.batch_windows=2"])
    config.data.spacing_zyx = (6.0, 6.0, 6.0)
    config.model.overrides = ml_collections.ConfigDict(dict(
        n_stages=3, features_per_stage=(4, 8, 8), strides=(1, 2, 2), n_conv_per_stage=1,
        n_conv_per_stage_decoder=1))
    model = build_model(config, nnx.Rngs(0))
    randomize(model, 1)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config.to_json_best_effort())
    ckpt = RunCheckpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(5, {"step": np.int32(5), "params": nnx.to_pure_dict(nnx.state(model, nnx.Param))},
              config=config.to_dict(), metrics={"val_loss": 0.5})
    ckpt.wait()
    ckpt.close()
    return path


def run_params(run: str) -> dict:
    from petct_jax.downstream.weights import read_source
    return read_source(run).params


def flat(tree) -> dict:
    from petct_jax.downstream.weights import flatten
    return {k: np.asarray(v) for k, v in flatten(tree).items()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from petct_jax.phantoms.cohort import generate_cohort

    root = tmp_path_factory.mktemp("nnunet")
    run = make_seg_run(str(root / "run"))
    results = root / "nnUNet_results" / nf.RESULTS_FOLDER_DEFAULT
    assert cli.main(["convert", "jax2nnunet", "--run", run, "--out", str(results)]) == 0
    raw = str(root / "raw")
    generate_cohort(raw, 2, seed=4, size="tiny", progress=False)
    return {"root": root, "run": run, "results": str(results), "raw": raw}


def test_results_folder_is_what_nnunet_reads(exported):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    results = exported["results"]
    ckpt = torch.load(os.path.join(results, "fold_all", nf.CHECKPOINT), weights_only=True)
    plans = PlansManager(os.path.join(results, "plans.json"))
    conf = plans.get_configuration(ckpt["init_args"]["configuration"])
    assert conf.network_arch_class_name.endswith("PlainConvUNet")
    assert conf.patch_size == [16, 16, 16] and conf.spacing == [6.0, 6.0, 6.0]
    assert conf.normalization_schemes == ["NoNormalization"] * 2
    dataset = json.load(open(os.path.join(results, "dataset.json")))
    assert dataset["channel_names"] == {"0": "PET", "1": "CT"}
    network = get_network_from_plans(conf.network_arch_class_name, conf.network_arch_init_kwargs,
                                     conf.network_arch_init_kwargs_req_import, 2, 2,
                                     deep_supervision=False)
    network.load_state_dict(ckpt["network_weights"])  # strict: every key, every shape
    # JAX -> nnU-Net -> JAX is exact in every weight
    back, info = nf.read_nnunet(results)
    assert info["channels"] == ["pet", "ct"] and info["spacing_zyx"] == [6.0, 6.0, 6.0]
    want, got = flat(run_params(exported["run"])), flat(nnx.to_pure_dict(nnx.state(back, nnx.Param)))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


@pytest.mark.slow
def test_nnunet_predict_equals_petct_predict(exported, tmp_path):
    from petct_jax.downstream import predict as pr

    images, nn_out, back = str(tmp_path / "images"), str(tmp_path / "nn_out"), str(tmp_path / "masks")
    assert cli.main(["convert", "nnunet-inputs", "--model", exported["results"], "--input",
                     exported["raw"], "--out", images]) == 0
    record = json.load(open(os.path.join(images, nf.INPUTS_RECORD)))["cases"]
    assert len(record) == 2 and len(os.listdir(images)) == 2 * 2 + 1
    root = exported["root"]
    env = {**os.environ, "nnUNet_results": str(root / "nnUNet_results"),
           "nnUNet_raw": str(root / "nnUNet_raw"), "nnUNet_preprocessed": str(root / "nnUNet_pre")}
    predict_cli = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_predict")
    cmd = [predict_cli if os.path.exists(predict_cli) else "nnUNetv2_predict",
           "-i", images, "-o", nn_out, "-d", "901", "-c", "3d_fullres", "-f", "all",
           "-device", "cpu", "--disable_tta", "--save_probabilities", "-npp", "1", "-nps", "1",
           "--disable_progress_bar"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    predictor = pr.load_predictor(exported["run"], batch_windows=2, mirror=False)
    for case, rec in record.items():
        pet = rec["pet"]
        ct = os.path.join(os.path.dirname(pet), "CTres.nii.gz")
        arrays, harmonized = predictor.harmonize(pet, ct, case)
        logits = predictor.logits(predictor.image(arrays, harmonized))
        ours = np.argmax(logits, -1)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        ours_prob = e / e.sum(-1, keepdims=True)
        theirs = np.asarray(nib.load(os.path.join(nn_out, f"{case}.nii.gz")).dataobj).transpose(2, 1, 0)
        theirs_prob = np.load(os.path.join(nn_out, f"{case}.npz"))["probabilities"]  # (C, z, y, x)
        assert theirs.shape == ours.shape
        assert 0.05 < ours.mean() < 0.95, ours.mean()  # a mask with both classes in it
        dice = 2 * np.sum((ours == 1) & (theirs == 1)) / (np.sum(ours == 1) + np.sum(theirs == 1))
        assert dice >= 0.99, dice
        # nnU-Net accumulates the windows in float16 (predict_from_raw_data: torch.half): ~3
        # digits inside, and Gaussian weights that underflow within 2 voxels of the faces
        inner = (slice(2, -2),) * 3
        np.testing.assert_allclose(np.moveaxis(theirs_prob, 0, -1)[inner], ours_prob[inner], atol=2e-3)

    # Back on the PET grids, nnU-Net's masks are petct predict's masks
    assert cli.main(["convert", "nnunet-masks", "--inputs", images, "--masks", nn_out, "--out", back]) == 0
    for case, rec in record.items():
        ours = predictor.predict(rec["pet"], os.path.join(os.path.dirname(rec["pet"]), "CTres.nii.gz"),
                                 case=case).mask
        img = nib.load(os.path.join(back, f"{case}.nii.gz"))
        np.testing.assert_allclose(img.affine, nib.load(rec["pet"]).affine, atol=1e-5)
        theirs = np.asarray(img.dataobj)
        dice = 2 * np.sum((ours == 1) & (theirs == 1)) / (np.sum(ours == 1) + np.sum(theirs == 1))
        assert dice >= 0.99, dice
    # Nothing is replaced without --overwrite
    assert cli.main(["convert", "nnunet-masks", "--inputs", images, "--masks", nn_out, "--out", back]) == 1


def test_mae_weights_load_as_nnunet_pretrained_weights(phantom_store, tmp_path_factory, capsys):
    from downstream_helpers import tiny_mae_run
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root = tmp_path_factory.mktemp("mae_export")
    mae = tiny_mae_run(phantom_store, str(root))
    out = str(root / "pretrained")
    assert cli.main(["convert", "jax2nnunet", "--run", mae, "--out", out]) == 0
    assert "pretrained weights" in capsys.readouterr().out
    plans = json.load(open(os.path.join(out, "plans.json")))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    # the user's network: their dataset's classes (3 here), deep supervision on, as nnU-Net trains
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                     arch["_kw_requires_import"], 2, 3, deep_supervision=True)
    load_pretrained_weights(network, os.path.join(out, nf.CHECKPOINT))
    loaded = network.state_dict()
    ckpt = torch.load(os.path.join(out, nf.CHECKPOINT), weights_only=True)
    shared = [k for k in loaded if ".seg_layers." not in k]
    assert len(shared) > 20
    for key in shared:
        torch.testing.assert_close(loaded[key], ckpt["network_weights"][key], rtol=0, atol=0)
    # the nnssl adaptation plan names the architecture; importing the checkpoint gives the backbone
    plan = ckpt["adaptation_plan"]
    assert plan["pretrain_num_input_channels"] == 2 and plan["key_to_encoder"] == "encoder.stages"
    assert plan["architecture_plans"]["arch_class_name"] == "PlainConvUNet"
    model, info = nf.read_nnunet(os.path.join(out, nf.CHECKPOINT))
    assert info["format"] == "nnssl_checkpoint"
    want = flat(run_params(mae))  # the MAE's backbone, reconstruction head included
    got = flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=str(key))


def test_resenc_results_folder_imports_for_finetuning(tmp_path):
    """A ResidualEncoderUNet results folder as nnU-Net writes it: the plans are read (arch
    kwargs, stem, blocks), the JAX model computes what the torch network computes, and the
    converted folder is a fine-tuning source with the dataset's channel names."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    from petct_jax.downstream.weights import read_source

    arch_kwargs = {
        "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
        "n_blocks_per_stage": [1, 2, 2], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True}}
    torch.manual_seed(0)
    net = ResidualEncoderUNet(input_channels=2, num_classes=3, **{
        **arch_kwargs, **{k: v for k, v in TORCH_COMMON.items() if k in arch_kwargs}}).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape) * 0.3 + (0.5 if p.ndim == 1 else 0.0))
    folder = tmp_path / "Dataset002_X" / "nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres"
    (folder / "fold_all").mkdir(parents=True)
    plans = {"dataset_name": "Dataset002_X", "plans_name": "nnUNetResEncUNetMPlans",
             "configurations": {
                 "3d_fullres": {"patch_size": [8, 16, 16], "spacing": [3.0, 2.0, 2.0],
                                "normalization_schemes": ["ZScoreNormalization", "CTNormalization"],
                                "architecture": {
                                    "network_class_name":
                                        "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
                                    "arch_kwargs": arch_kwargs,
                                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}},
                 "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [6.0, 4.0, 4.0]}}}
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "PET", "1": "CT"}, "labels": {"background": 0, "a": 1, "b": 2},
        "file_ending": ".nii.gz"}))
    torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                "init_args": {"configuration": "3d_fullres"}}, folder / "fold_all" / nf.CHECKPOINT)

    out = str(tmp_path / "converted")
    assert cli.main(["convert", "nnunet2jax", "--in", str(folder), "--out", out]) == 0
    model = convert.load_model(out)
    assert model.config["n_blocks_per_stage"] == (1, 2, 2) and model.config["num_classes"] == 3
    x = np.random.default_rng(0).normal(size=(1, 2, 8, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    got = np.asarray(model(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), want, atol=2e-4, rtol=1e-4)
    meta = json.load(open(os.path.join(out, "model.json")))
    assert meta["nnunet"]["spacing_zyx"] == [3.0, 2.0, 2.0]
    assert meta["nnunet"]["normalization_schemes"] == ["ZScoreNormalization", "CTNormalization"]
    source = read_source(out)
    assert source.channels == ("pet", "ct") and source.model_name == "resenc_unet"
    # the inherited configuration resolves to the same network
    lowres, info = nf.read_nnunet(str(folder), configuration="3d_lowres")
    assert info["spacing_zyx"] == [6.0, 4.0, 4.0] and lowres.config == model.config


def test_nnssl_resenc_l_checkpoint_imports(tmp_path):
    """An nnssl MAE checkpoint of ResEnc-L (the adaptation plan names the preset, no kwargs):
    every weight lands, exactly."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    n = 6
    net = ResidualEncoderUNet(
        input_channels=1, n_stages=n, features_per_stage=[32, 64, 128, 256, 320, 320],
        conv_op=torch.nn.Conv3d, kernel_sizes=[[3, 3, 3]] * n, strides=[[1, 1, 1]] + [[2, 2, 2]] * 5,
        n_blocks_per_stage=[1, 3, 4, 6, 6, 6], num_classes=1, n_conv_per_stage_decoder=[1] * 5,
        conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True})
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    path = tmp_path / "nnssl_resencl.pth"
    torch.save({"network_weights": net.state_dict(), "adaptation_plan": {
        "architecture_plans": {"arch_class_name": "ResEncL", "arch_kwargs": None,
                               "arch_kwargs_requiring_import": None},
        "pretrain_plan": {"dataset_name": "Dataset745_OpenMind"}, "pretrain_num_input_channels": 1,
        "recommended_downstream_patchsize": [160, 160, 160], "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem"}}, path)
    model, info = nf.read_nnunet(str(path))
    assert info["arch"] == "resenc_unet" and info["recommended_patch"] == [160, 160, 160]
    assert model.config["n_blocks_per_stage"] == (1, 3, 4, 6, 6, 6)
    state = convert.to_torch(model)
    theirs = net.state_dict()
    assert state.keys() == theirs.keys()
    for key in theirs:
        np.testing.assert_array_equal(state[key], theirs[key].numpy(), err_msg=key)


def test_bad_folders_are_one_line_errors(exported, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PetctError, match="plans.json: missing"):
        nf.read_nnunet(str(empty))
    (empty / "plans.json").write_text("{not json")
    with pytest.raises(PetctError, match="plans.json: not valid JSON"):
        nf.read_nnunet(str(empty))
    user = tmp_path / "user_folder"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # never replaced: not an earlier export
        assert cli.main(["convert", "jax2nnunet", "--run", exported["run"], "--out", str(user), *extra]) == 2
        assert (user / "notes.txt").read_text() == "mine"
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and "not an earlier nnU-Net export" in err
    assert "Traceback" not in err
    # an earlier export is replaced only with --overwrite
    assert cli.main(["convert", "jax2nnunet", "--run", exported["run"], "--out", exported["results"]]) == 2
    assert cli.main(["convert", "jax2nnunet", "--run", exported["run"], "--out", exported["results"],
                     "--overwrite"]) == 0
