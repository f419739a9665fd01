"""The reference's executed recipe (`finetune.py:paper`, `pretrain.py:paper`): its settings, the
epoch-based step counts, a reference-format checkpoint (`nnunet_v2_mim_best.pth`) fine-tuned
with its output head loaded, label fractions encoded by the reference's split CSVs, and the
checkpoint rule without a validation split."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest
from flax import nnx

from petct_jax import config_blocks
from petct_jax.config import resolve
from petct_jax.data.augment import AugmentConfig
from petct_jax.data.patches import PatchConfig
from petct_jax.downstream import test_eval, weights
from petct_jax.downstream.finetune import finetune, make_task
from petct_jax.errors import PetctError
from petct_jax.store import Store

from conftest import REPO
from downstream_helpers import TINY_DATA, TINY_UNET

FINETUNE = os.path.join(REPO, "configs/finetune.py")
PRETRAIN = os.path.join(REPO, "configs/pretrain.py")


# ---------------------------------------------------------------- the configs


def test_paper_variants_hold_the_reference_recipe():
    ours, paper = resolve(FINETUNE), resolve(f"{FINETUNE}:paper")
    assert (ours.init_head, ours.epochs, ours.eval.window_weights) == (False, 0, "gaussian")
    assert ours.data.foreground_fraction == pytest.approx(1 / 3) and ours.data.val_fraction == 0.1
    assert (paper.init_head, paper.epochs, paper.eval.window_weights) == (True, 100, "constant")
    assert (paper.data.foreground_fraction, paper.data.zoom_prob, paper.data.val_fraction) == (0.0, 0.0, 0.0)
    assert PatchConfig.from_config(paper.data, "seg").augment == AugmentConfig()  # nothing at all
    assert (paper.optim.warmup_steps, paper.optim.lr, paper.batch_size, paper.data.patch) == \
        (0, 5e-4, 4, (96, 128, 128))
    assert resolve(f"{FINETUNE}:tiny,paper").optim.warmup_steps == 0
    assert resolve(f"{FINETUNE}:swin_base,paper").optim.lr == 1e-4
    mae, mae_paper = resolve(PRETRAIN), resolve(f"{PRETRAIN}:paper")
    assert (mae.optim.warmup_steps, mae.epochs, mae.data.val_fraction) == (1_000, 0, 0.1)
    assert (mae_paper.optim.warmup_steps, mae_paper.epochs, mae_paper.data.val_fraction) == (0, 200, 0.0)
    assert mae_paper.model.to_dict() == mae.model.to_dict() and mae_paper.mae.to_dict() == mae.mae.to_dict()


def test_epoch_step_counts_follow_the_reference_data_loaders():
    # fine-tuning keeps the last partial batch (MONAI DataLoader), pretraining drops it
    assert config_blocks.steps_for_epochs(100, 700, 4, drop_last=False) == 17_500
    assert config_blocks.steps_for_epochs(100, 70, 4, drop_last=False) == 1_800  # 18 batches an epoch
    assert config_blocks.steps_for_epochs(100, 210, 4, drop_last=False) == 5_300
    assert config_blocks.steps_for_epochs(200, 4_997, 16, drop_last=True) == 62_400
    with pytest.raises(PetctError, match="no steps"):
        config_blocks.steps_for_epochs(200, 15, 16, drop_last=True)


def test_pretrain_paper_counts_its_steps_from_the_store(phantom_store):
    from petct_jax.mae.pretrain import make_task as mae_task

    config = resolve(f"{PRETRAIN}:tiny,paper", [f"store={phantom_store}", "epochs=3", *TINY_DATA,
                                                "mae.block=(4,4,4)", *TINY_UNET])
    task = mae_task(config)
    assert task.val_batches == []  # every scan is pretrained on, as in the reference
    assert config.total_steps == 3 * (6 // 2)  # 6 scans at batch 2, 3 epochs


# ---------------------------------------------------------------- split CSVs


def _write_reference_csv(path, split_of):
    """A split CSV of the reference's columns, rows named by store id (`scan_id`)."""
    flags = {"train": ("train", "no", "no"), "test": ("val_test", "yes", "yes"), "unused": ("unused", "no", "no")}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "subject_id", "scan_id", "split", "is_val", "is_test"])
        for n, (case, side) in enumerate(sorted(split_of.items()), 1):
            w.writerow([n, case, case, *flags[side]])
    return path


@pytest.fixture(scope="module")
def reference_split(phantom_store, tmp_path_factory):
    """The 6-study phantom store split like the reference's 10% file: whole patients, 3 scans
    for training, 2 held out (test, no validation), the rest unused."""
    records = Store(phantom_store).records
    by_patient = {}
    for r in records:
        by_patient.setdefault(r["patient_id"], []).append(r["id"])
    split_of, counts = {}, {"train": 0, "test": 0}
    for scans in sorted(by_patient.values(), key=lambda s: (-len(s), s)):
        side = next((k for k, n in (("train", 3), ("test", 2)) if counts[k] + len(scans) <= n), "unused")
        counts[side] = counts.get(side, 0) + len(scans)
        split_of.update({i: side for i in scans})
    assert counts["train"] == 3 and counts["test"] == 2, counts
    path = str(tmp_path_factory.mktemp("ref_split") / "autopet_seg_split_10pct.csv")
    return _write_reference_csv(path, split_of), split_of


def test_encoded_label_fractions(tmp_path):
    from petct_jax.data import splits

    parts = {"train": ["a"], "val": [], "test": ["b"], "unused": ["c", "d", "e"]}
    assert splits.encoded_label_fraction("/x/autopet_seg_split_10pct.csv", parts) == 0.1
    assert splits.encoded_label_fraction("autopet_seg_split_30PCT.csv", parts) == 0.3
    assert splits.encoded_label_fraction("autopet_seg_split_100pct.csv", parts) is None
    assert splits.encoded_label_fraction("my_split.csv", parts) is None
    assert splits.encoded_label_fraction("W/split.json", parts) == 0.25  # a fraction run's split
    assert splits.encoded_label_fraction("W/split.json", {**parts, "unused": []}) is None


def test_a_fraction_on_top_of_an_encoded_csv_is_refused(phantom_store, reference_split, tmp_path):
    path, split_of = reference_split
    config = resolve(f"{FINETUNE}:tiny,paper,frac30", [
        f"store={phantom_store}", f"data.split={path}", "init=scratch", *TINY_DATA, *TINY_UNET])
    with pytest.raises(PetctError, match=r"already encodes a label fraction \(10%: 3 training scans\).*"
                                         r"label_fraction=1\.0") as e:
        make_task(config, str(tmp_path / "w"))
    assert "\n" not in str(e.value)


def test_a_fraction_of_the_full_csv_says_it_is_not_the_references_subset(
        phantom_store, reference_split, tmp_path, capsys):
    _, split_of = reference_split
    full = _write_reference_csv(str(tmp_path / "autopet_seg_split_100pct.csv"),
                                {i: "test" if side == "test" else "train" for i, side in split_of.items()})
    config = resolve(f"{FINETUNE}:tiny,frac30", [
        f"store={phantom_store}", f"data.split={full}", "init=scratch", *TINY_DATA, *TINY_UNET])
    make_task(config, str(tmp_path / "w"))
    err = capsys.readouterr().err
    assert "this project's own 30% of the 4 training scans" in err and "not the reference's subset" in err
    assert len(json.load(open(tmp_path / "w" / "split.json"))["train"]) < 4


# ---------------------------------------------------------------- a reference checkpoint


@pytest.fixture(scope="module")
def reference_checkpoint(tmp_path_factory):
    """`nnunet_v2_mim_best.pth` as the reference writes it (its MAE wrapper's `nnunet.` and
    DataParallel's `module.` prefixes inside `model_state_dict`, optimizer state around) for
    the tiny 3-stage network, converted with `petct convert torch2jax`."""
    torch = pytest.importorskip("torch")
    dna = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    from petct_jax.cli import main

    torch.manual_seed(7)
    net = dna.PlainConvUNet(
        input_channels=2, n_stages=3, features_per_stage=(4, 8, 8), conv_op=torch.nn.Conv3d,
        kernel_sizes=3, strides=(1, 2, 2), n_conv_per_stage=2, num_classes=2,
        n_conv_per_stage_decoder=2, conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"negative_slope": 1e-2, "inplace": True})
    state = {f"module.nnunet.{k}": v for k, v in net.state_dict().items()}
    root = tmp_path_factory.mktemp("reference")
    torch.save({"epoch": 200, "model_state_dict": state, "best_loss": 0.3,
                "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1e-6}]}},
               root / "nnunet_v2_mim_best.pth")
    out = str(root / "converted")
    assert main(["convert", "torch2jax", "--arch", "plain_unet", "--in",
                 str(root / "nnunet_v2_mim_best.pth"), "--out", out]) == 0
    head = {i: net.state_dict()[f"decoder.seg_layers.{i}.weight"].numpy() for i in range(2)}
    return out, head


@pytest.fixture(scope="module")
def reference_store(phantom_store, tmp_path_factory):
    """The phantom cohort of `phantom_store` preprocessed with `--preset reference`."""
    from petct_jax.cli import main

    raw = os.path.join(os.path.dirname(phantom_store), "raw")
    store = str(tmp_path_factory.mktemp("reference_store") / "store")
    assert main(["preprocess", "--input", raw, "--out", store, "--preset", "reference",
                 "--workers", "1"]) == 0
    assert Store(store).info["harmonization"] == {"preset": "reference"}
    # one preset per store: appending canonical cases is refused before anything is written
    assert main(["preprocess", "--input", raw, "--out", store, "--workers", "1"]) == 2
    return store


def test_released_weights_refuse_a_canonical_store(phantom_store, reference_checkpoint, tmp_path, capsys):
    converted, _ = reference_checkpoint
    assert json.load(open(os.path.join(converted, "model.json")))["preset"] == "reference"
    config = resolve(f"{FINETUNE}:tiny,paper", [
        f"store={phantom_store}", f"init={converted}", *TINY_DATA, *TINY_UNET])
    with pytest.raises(PetctError, match=r"preset 'reference'.*holds 'canonical' data.*--preset reference") as e:
        make_task(config, str(tmp_path / "refused"))
    assert "\n" not in str(e.value)
    config.allow_preset_mismatch = True  # told otherwise: loads, and says so
    make_task(config, str(tmp_path / "allowed"))
    assert "allowed by allow_preset_mismatch" in capsys.readouterr().err


def test_reference_checkpoint_fine_tunes_with_its_head_under_paper(
        reference_store, reference_split, reference_checkpoint, tmp_path):
    """The README's walk-through for the released weights: convert (the fixture), preprocess
    with the reference preset, fine-tune under :paper, predict with the run's preset."""
    converted, torch_head = reference_checkpoint
    path, split_of = reference_split
    workdir = str(tmp_path / "ft")
    config = resolve(f"{FINETUNE}:tiny,paper", [
        f"store={reference_store}", f"data.split={path}", f"init={converted}", "epochs=2",
        *TINY_DATA, *TINY_UNET, "eval.batch_windows=32", "preview_every=1000"])
    # Before training: every parameter, the head included, is the checkpoint's.
    probe_cfg = resolve(f"{FINETUNE}:tiny,paper", [
        f"store={reference_store}", f"data.split={path}", f"init={converted}", *TINY_DATA, *TINY_UNET])
    task, used = make_task(probe_cfg, str(tmp_path / "probe"))
    ours = weights.flatten(weights.pure_params(task.model))
    theirs = weights.flatten(weights.read_source(converted).params)
    assert set(ours) == set(theirs)
    for p in ours:
        np.testing.assert_array_equal(np.asarray(ours[p]), np.asarray(theirs[p]), err_msg=str(p))
    for i in range(2):  # torch (O, I, 1, 1, 1) -> flax (1, 1, 1, I, O)
        np.testing.assert_allclose(np.asarray(ours[("decoder", "seg_layers", i, "kernel")]),
                                   torch_head[i].transpose(2, 3, 4, 1, 0))
    assert used["init"]["head"] == "loaded" and used["init"]["reinitialised"] == []
    assert used["init"]["loaded_parameters"] == sum(np.size(v) for v in ours.values())
    assert task.val_batches == []  # the reference's CSV has no validation scans

    summary = finetune(config, workdir)
    # 2 epochs of the CSV's 3 training scans at batch 2: 2 steps each (the last batch partial)
    assert summary["steps"] == 4 and json.load(open(os.path.join(workdir, "config.json")))["total_steps"] == 4
    assert summary["split"] == {"train": 3, "val": 0, "test": 2, "unused": 0}
    assert sorted(json.load(open(os.path.join(workdir, "split.json")))["train"]) == \
        sorted(i for i, side in split_of.items() if side == "train")  # 100% of the file's rows
    test = summary["test"]
    assert test["checkpoint_rule"] == test_eval.RULE_FINAL and test["checkpoint_step"] == 4
    assert test["settings"]["window_weights"] == "constant"
    assert json.load(open(os.path.join(workdir, "test", "summary.json")))["checkpoint_rule"] == test_eval.RULE_FINAL
    # The run records its data's preset; predict harmonizes new scans with it.
    from petct_jax.downstream import predict as pr

    run_config = json.load(open(os.path.join(workdir, "config.json")))
    assert run_config["data"]["preset"] == "reference"
    predictor = pr.load_predictor(workdir, batch_windows=2)
    assert predictor.preset == "reference"
    case = Store(reference_store).record(sorted(split_of)[0])
    result = predictor.predict(case["sources"]["pet"], case["sources"]["ct"], case=case["id"])
    # the scan is harmonized exactly as the store's copy of it was
    assert result.record["preset"] == "reference" and result.record["shape_zyx"] == case["shape_zyx"]
    assert result.record["affine_zyx"] == case["affine_zyx"]
    assert result.mask.shape == nib.load(case["sources"]["pet"]).shape


def test_init_head_fails_in_one_line_when_shapes_differ(phantom_store, tmp_path):
    from petct_jax.convert.io import save_converted
    from petct_jax.models import registry

    source = registry.build("plain_unet", "paper", rngs=nnx.Rngs(5), input_channels=2, num_classes=3,
                            n_stages=3, features_per_stage=(4, 8, 8), strides=(1, 2, 2))
    save_converted(source, "plain_unet", None, str(tmp_path / "conv3"))
    args = [f"store={phantom_store}", f"init={tmp_path / 'conv3'}", *TINY_DATA, *TINY_UNET]
    with pytest.raises(PetctError, match=r"output head decoder/seg_layers/0/bias has shape "
                                         r"\(3,\), this run's head needs \(2,\).*init_head=False") as e:
        make_task(resolve(f"{FINETUNE}:tiny,paper", args), str(tmp_path / "a"))
    assert "\n" not in str(e.value)
    # Our recipe re-initialises the head, so the same source loads.
    _, used = make_task(resolve(f"{FINETUNE}:tiny", args), str(tmp_path / "b"))
    assert used["init"]["head"] == "reinitialised" and len(used["init"]["reinitialised"]) == 4


# ---------------------------------------------------------------- window weights


def test_window_weights_reach_the_sliding_window(phantom_store, monkeypatch, tmp_path):
    from petct_jax.downstream import inference

    seen = []
    real = inference.sliding_window_predict

    def spy(*args, **kwargs):
        seen.append(kwargs["use_gaussian"])
        return real(*args, **kwargs)

    monkeypatch.setattr(inference, "sliding_window_predict", spy)

    class Zero(nnx.Module):
        def __call__(self, x, *, deterministic=True):
            return np.zeros((*x.shape[:-1], 2), np.float32)

    case = Store(phantom_store).records[0]["id"]
    for variant, expected in (("tiny", True), ("tiny,paper", False)):
        config = resolve(f"{FINETUNE}:{variant}", [f"store={phantom_store}", *TINY_DATA])
        test_eval.evaluate_on_cases(Zero(), phantom_store, [case], config)
        assert seen[-1] is expected
    config = resolve(f"{FINETUNE}:tiny", [f"store={phantom_store}", "eval.window_weights='median'"])
    with pytest.raises(PetctError, match="eval.window_weights='median'"):
        test_eval.evaluate_on_cases(Zero(), phantom_store, [case], config)
