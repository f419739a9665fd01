"""nnU-Net v2's own on-disk forms: results folders, pretrained-weights checkpoints, and
the input/output step that lets nnU-Net's predictor see what our network saw.

    petct convert jax2nnunet --run W --out DIR      fine-tuned run -> results folder
                                                    MAE run        -> pretrained weights
    petct convert nnunet2jax --in DIR --out CONV    results folder / nnssl or nnU-Net
                                                    checkpoint     -> converted model
    petct convert nnunet-inputs --model DIR (--input RAW | --pet P --ct C) --out IMAGES
    petct convert nnunet-masks --inputs IMAGES --masks NNUNET_OUT --out MASKS

A results folder (what `nnUNetv2_predict_from_modelfolder -m DIR -f all` takes, and what
`nnUNetv2_predict -d ID -c 3d_fullres -f all` finds at
`$nnUNet_results/DatasetID_Name/nnUNetTrainer__nnUNetPlans__3d_fullres`) holds
`dataset.json`, `plans.json` (configuration "3d_fullres": network class, arch_kwargs, patch
size, spacing, normalization) and `fold_all/checkpoint_final.pth`, a plain dict of tensors,
strings and numbers that loads with `torch.load(weights_only=True)`.

What nnU-Net's preprocessing cannot express of ours: CT resampled through the affines onto
an axis-aligned grid over the PET field of view, the body crop from the CT, and the per-scan
z-score over the crop box (nnU-Net z-scores over the whole image or its nonzero mask). So
the plans say `NoNormalization` for every channel and the voxel size of our store, and
`nnunet-inputs` writes each scan as our network sees it (harmonized by the very function
that built the training store, normalized as the run did) in nnU-Net's raw-image naming
(`CASE_0000.nii.gz` = channel 0, ...). On those images nnU-Net resamples nothing (the
spacing is already the plans'), crops nothing (no channel is zero outside the body) and
runs the same sliding window (step 0.5, Gaussian sigma 1/8, logits averaged over the
mirrors). It accumulates the windows in float16, where we use float32: probabilities agree
to about 1e-3, except within 2 voxels of the image faces, where nnU-Net's Gaussian weights
underflow in float16 and its values there are coarse; masks agree (Dice >= 0.99 in tests).
Its masks lie on that harmonized grid, world-registered to the PET;
`nnunet-masks` puts them back on each input PET's own grid as `petct predict` does. The
plans keep our settings under "petct_jax" (spacing, channels, normalization, CT
statistics) so `nnunet-inputs` needs only the results folder.

Pretrained weights (an MAE run) are `DIR/checkpoint_final.pth` with `network_weights`, the
form `nnUNetv2_train ... -pretrained_weights` loads (every key but `.seg_layers.` must
match the plans' network), `DIR/plans.json` with the architecture to put in the user's
plans, and nnssl's `adaptation_plan` (architecture, pretraining channels, recommended
patch, the encoder/stem key names, as nnssl serializes its AdaptationPlan) in the same
checkpoint. nnssl checkpoints import by their adaptation plan (explicit arch_kwargs, or the
ResEncL preset).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from petct_jax.errors import PetctError

CONFIGURATION = "3d_fullres"
CHECKPOINT = "checkpoint_final.pth"
INPUTS_RECORD = "petct_nnunet_inputs.json"
CHANNEL_NAMES = {"pet": "PET", "ct": "CT"}
_CHANNEL_KEYS = {v.lower(): k for k, v in CHANNEL_NAMES.items()}
# nnssl's named architectures that are ours (src/nnssl/architectures/architecture_registry.py):
# ResEnc-L of "Revisiting MAE pre-training for 3D medical image segmentation".
NNSSL_PRESETS = {
    "ResEncL": ("ResidualEncoderUNet", {
        "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320],
        "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
        "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 5,
        "conv_bias": True, "norm_op_kwargs": {"eps": 1e-5, "affine": True}}),
}
RESULTS_FOLDER_DEFAULT = "Dataset901_PETCT/nnUNetTrainer__nnUNetPlans__3d_fullres"


# ---------------------------------------------------------------- our run -> nnU-Net


def _run_model(run: str, which: str | int) -> tuple[Any, Any]:
    """(source, model) of a petct run: its network with the checkpoint's parameters."""
    from petct_jax.downstream.weights import load_backbone

    model, source = load_backbone(run, which)
    if source.model_name not in ("plain_unet", "resenc_unet"):
        raise PetctError(f"{run}: a {source.model_name} network; nnU-Net v2 runs PlainConvUNet and "
                         "ResidualEncoderUNet only")
    return source, model


def _architecture(model: Any) -> dict:
    from petct_jax.convert.nnunet import arch_kwargs

    class_name, kwargs, requires = arch_kwargs(model)
    return {"network_class_name": class_name, "arch_kwargs": kwargs, "_kw_requires_import": requires}


def _plans(model: Any, *, spacing: Sequence[float], patch: Sequence[int], channels: Sequence[str],
           petct: dict, dataset_name: str) -> dict:
    n = len(channels)
    resample = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0,
                                              "force_separate_z": None},
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0,
                                             "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                       "force_separate_z": None}}
    configuration = {
        "data_identifier": f"nnUNetPlans_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": [int(p) for p in patch],
        "median_image_size_in_voxels": [int(p) for p in patch],
        "spacing": [float(s) for s in spacing],
        # our inputs come normalized from `petct convert nnunet-inputs` (see the module doc)
        "normalization_schemes": ["NoNormalization"] * n, "use_mask_for_norm": [False] * n,
        **resample, "architecture": _architecture(model),
        "batch_dice": False,
    }
    return {
        "dataset_name": dataset_name, "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [float(s) for s in spacing],
        "original_median_shape_after_transp": [int(p) for p in patch],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2], "configurations": {CONFIGURATION: configuration},
        "experiment_planner_used": "petct_jax", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(i): {"max": 0.0, "mean": 0.0, "median": 0.0, "min": 0.0, "percentile_00_5": 0.0,
                     "percentile_99_5": 0.0, "std": 1.0} for i in range(n)},
        "petct_jax": petct,
    }


def _torch_weights(model: Any) -> OrderedDict:
    import torch

    from petct_jax.convert.nnunet import to_torch_state

    return OrderedDict((k, torch.from_numpy(v)) for k, v in to_torch_state(model).items())


def _write_folder(out: str, overwrite: bool, write: Any) -> str:
    """Build the folder in a temporary sibling, then move it into place: an interrupted export
    leaves no half folder, and only `--overwrite` replaces an earlier export (which must be
    one: a folder holding anything else is refused)."""
    out = os.path.abspath(out)
    if os.path.lexists(out):
        if not overwrite:
            raise PetctError(f"--out: {out} exists; pass --overwrite to replace an earlier export")
        if not os.path.isdir(out) or not os.path.isfile(os.path.join(out, "plans.json")):
            raise PetctError(f"--out: {out} is not an earlier nnU-Net export (no plans.json); "
                             "refusing to replace it")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".petct-export-", dir=parent)
    try:
        write(tmp)
        if os.path.lexists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_run(run: str, out: str, *, which: str | int = "best", overwrite: bool = False,
               dataset_name: str = "Dataset901_PETCT") -> tuple[str, str]:
    """A fine-tuned run as an nnU-Net v2 results folder, an MAE run as pretrained weights.
    Returns (kind, folder)."""
    import torch

    source, model = _run_model(run, which)
    channels = tuple(source.channels or ())
    if source.kind == "seg":
        from petct_jax.downstream import predict as pr
        from petct_jax.train.restore import read_run_config

        config = read_run_config(run)
        spacing, _ = pr.run_spacing(config)
        normalizer = pr.run_normalizer(config, channels, run)
        patch = [int(p) for p in config.data.patch]
        petct = {"source_run": os.path.abspath(run), "step": source.step, "channels": list(channels),
                 "spacing_zyx": list(spacing), "normalization": normalizer.scheme,
                 "preset": pr.run_preset(config),
                 "ct_stats": None if normalizer.ct is None else
                 {k: getattr(normalizer.ct, k) for k in ("lo", "hi", "mean", "std", "source")},
                 "overlap": float(pr._get(config, "eval.overlap", 0.5)),
                 "mirror": bool(pr._get(config, "eval.mirror", False))}
        plans = _plans(model, spacing=spacing, patch=patch, channels=channels, petct=petct,
                       dataset_name=dataset_name)
        dataset = {"channel_names": {str(i): CHANNEL_NAMES[c] for i, c in enumerate(channels)},
                   "labels": {"background": 0, "lesion": 1}, "numTraining": 0,
                   "file_ending": ".nii.gz", "petct_jax": petct}
        checkpoint = {
            "network_weights": _torch_weights(model),
            "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": "all",
                          "dataset_json": dataset, "device": "cpu"},
            "trainer_name": "nnUNetTrainer",
            # nnU-Net mirrors only when asked to (its default; --disable_tta turns it off)
            "inference_allowed_mirroring_axes": (0, 1, 2),
            "current_epoch": int(source.step or 0),
        }

        def write(folder: str) -> None:
            _dump_json(os.path.join(folder, "plans.json"), plans)
            _dump_json(os.path.join(folder, "dataset.json"), dataset)
            os.makedirs(os.path.join(folder, "fold_all"))
            torch.save(checkpoint, os.path.join(folder, "fold_all", CHECKPOINT))
        return "results folder", _write_folder(out, overwrite, write)

    # An MAE run: its backbone with the reconstruction head, which nnU-Net skips (.seg_layers.)
    from petct_jax.train.restore import read_run_config

    config = read_run_config(run)
    patch = [int(p) for p in config.data.patch]
    architecture = _architecture(model)
    petct = {"source_run": os.path.abspath(run), "step": source.step, "channels": list(channels),
             "spacing_zyx": _store_spacing(config)}
    # nnssl's AdaptationPlan (src/nnssl/adaptation_planning/adaptation_plan.py, serialized)
    short_class = architecture["network_class_name"].rsplit(".", 1)[-1]
    adaptation_plan = {
        "architecture_plans": {"arch_class_name": short_class,
                               "arch_kwargs": architecture["arch_kwargs"],
                               "arch_kwargs_requiring_import": architecture["_kw_requires_import"]},
        "pretrain_plan": {"dataset_name": dataset_name, "plans_name": "petct_jax_mae",
                          "original_median_spacing_after_transp": petct["spacing_zyx"],
                          "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
                          "transpose_backward": [0, 1, 2], "experiment_planner_used": "petct_jax",
                          "configurations": {"spacing": petct["spacing_zyx"], "patch_size": patch,
                                             "normalization_schemes": ["NoNormalization"] * len(channels)}},
        "pretrain_num_input_channels": len(channels),
        "recommended_downstream_patchsize": patch,
        "key_to_encoder": "encoder.stages",
        "key_to_stem": "encoder.stem" if source.model_name == "resenc_unet" else "encoder.stages.0",
    }
    checkpoint = {"network_weights": _torch_weights(model), "adaptation_plan": adaptation_plan,
                  "trainer_name": "petct_jax_mae", "current_epoch": int(source.step or 0),
                  "petct_jax": petct}
    plans_entry = {"dataset_name": dataset_name, "petct_jax": petct,
                   "configurations": {CONFIGURATION: {"patch_size": patch,
                                                      "spacing": petct["spacing_zyx"],
                                                      "architecture": architecture}}}

    def write(folder: str) -> None:
        torch.save(checkpoint, os.path.join(folder, CHECKPOINT))
        _dump_json(os.path.join(folder, "plans.json"), plans_entry)
    return "pretrained weights", _write_folder(out, overwrite, write)


def _store_spacing(config: Any) -> list[float] | None:
    from petct_jax.downstream import predict as pr
    try:
        return list(pr.run_spacing(config)[0])
    except PetctError:
        return None


def _dump_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------- nnU-Net -> ours


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise PetctError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PetctError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise PetctError(f"{path}: expected a JSON object")
    return value


def _load_checkpoint(path: str) -> dict:
    from petct_jax.convert.io import load_file

    checkpoint = load_file(path)  # torch.load(weights_only=True); a one-line error otherwise
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise PetctError(f"{path}: not an nnU-Net/nnssl checkpoint (no network_weights)")
    return checkpoint


def read_nnunet(path: str, *, fold: str = "all", checkpoint: str = CHECKPOINT,
                configuration: str | None = None) -> tuple[Any, dict]:
    """(JAX model, provenance) from an nnU-Net v2 results folder (plans read, not retyped) or
    a single nnU-Net / nnssl checkpoint file (its adaptation plan, else the weights alone)."""
    from petct_jax.convert import from_torch

    if os.path.isdir(path):
        plans = _load_json(os.path.join(path, "plans.json"))
        dataset = _load_json(os.path.join(path, "dataset.json"))
        ckpt_path = os.path.join(path, f"fold_{fold}", checkpoint)
        ckpt = _load_checkpoint(ckpt_path)
        configuration = configuration or (ckpt.get("init_args") or {}).get("configuration") or CONFIGURATION
        configs = plans.get("configurations", {})
        if configuration not in configs:
            raise PetctError(f"{path}/plans.json: no configuration {configuration!r} "
                             f"(has {', '.join(configs) or 'none'})")
        conf = _resolve_inherits(configs, configuration, f"{path}/plans.json")
        if "architecture" not in conf:
            raise PetctError(f"{path}/plans.json: configuration {configuration!r} has no architecture "
                             "(nnU-Net < 2.4 plans are not supported)")
        class_name = conf["architecture"]["network_class_name"]
        kwargs = dict(conf["architecture"]["arch_kwargs"])
        labels = dataset.get("labels", {})
        info = {"format": "nnunet_results", "path": os.path.abspath(path),
                "configuration": configuration, "spacing_zyx": conf.get("spacing"),
                "patch_size": conf.get("patch_size"),
                "normalization_schemes": conf.get("normalization_schemes"),
                "channel_names": dataset.get("channel_names"), "labels": labels,
                "checkpoint": ckpt_path}
        if (plans.get("petct_jax") or {}).get("preset"):  # exported from here: its data's preset
            info["preset"] = plans["petct_jax"]["preset"]
    else:
        ckpt = _load_checkpoint(path)
        plan = (ckpt.get("adaptation_plan") or {}).get("architecture_plans")
        if plan is None:
            raise PetctError(f"{path}: a bare checkpoint without an adaptation_plan; pass its results "
                             "folder (plans.json), or convert the weights with `torch2jax --arch`")
        class_name = plan["arch_class_name"]
        if class_name in NNSSL_PRESETS:
            class_name, kwargs = NNSSL_PRESETS[class_name]
        elif plan.get("arch_kwargs"):
            kwargs = dict(plan["arch_kwargs"])
        else:
            raise PetctError(f"{path}: adaptation plan names {class_name!r} without arch_kwargs; "
                             f"presets known here: {', '.join(NNSSL_PRESETS)}")
        info = {"format": "nnssl_checkpoint", "path": os.path.abspath(path),
                "pretrain_plan": (ckpt.get("adaptation_plan") or {}).get("pretrain_plan"),
                "recommended_patch": (ckpt.get("adaptation_plan") or {}).get(
                    "recommended_downstream_patchsize")}
    from petct_jax.convert.nnunet import arch_from_class

    arch = arch_from_class(class_name)
    kwargs.pop("deep_supervision", None)
    try:
        model = from_torch(ckpt["network_weights"], arch=arch, **kwargs)
    except PetctError as e:
        raise PetctError(f"{path}: {e}") from None
    info["arch"] = arch
    info["channels"] = _channels(info.get("channel_names"), model.config["input_channels"])
    return model, info


def _resolve_inherits(configs: dict, name: str, where: str) -> dict:
    """A plans configuration with its `inherits_from` chain applied (nnU-Net's rule)."""
    seen, chain = set(), []
    while name is not None:
        if name in seen or name not in configs:
            raise PetctError(f"{where}: configuration {name!r} is missing or inherits in a cycle")
        seen.add(name)
        chain.append(configs[name])
        name = configs[name].get("inherits_from")
    merged: dict = {}
    for conf in reversed(chain):
        merged.update(conf)
    return merged


def _channels(channel_names: dict | None, n: int) -> list[str] | None:
    """Our channel names (pet, ct) from dataset.json's channel_names, when they say."""
    if not channel_names:
        return None
    names = [str(channel_names.get(str(i), "")).lower() for i in range(n)]
    mapped = [_CHANNEL_KEYS.get(v) for v in names]
    return mapped if all(mapped) else None


# ---------------------------------------------------------------- inputs and masks


def _results_settings(model_dir: str) -> dict:
    plans = _load_json(os.path.join(model_dir, "plans.json"))
    petct = plans.get("petct_jax")
    if not petct or "spacing_zyx" not in petct or "channels" not in petct:
        raise PetctError(f"{model_dir}/plans.json: not exported by `petct convert jax2nnunet` (no "
                         "petct_jax settings); nnU-Net's own models take raw images")
    petct["patch_size"] = plans["configurations"][CONFIGURATION]["patch_size"]
    return petct


def _predictor(settings: dict) -> Any:
    """Our harmonization and normalization for the exported run (no network)."""
    from petct_jax.data.normalize import CTForegroundStats, Normalizer
    from petct_jax.downstream.predict import Predictor

    stats = settings.get("ct_stats")
    normalizer = Normalizer(settings.get("normalization", "zscore"),
                            CTForegroundStats(**stats) if stats else None)
    return Predictor(None, tuple(settings["channels"]), tuple(settings["patch_size"]), 2,
                     tuple(settings["spacing_zyx"]), normalizer,
                     preset=settings.get("preset", "canonical"))


def _xyz_affine(affine_zyx: Any) -> np.ndarray:
    """The NIfTI affine of an array stored (x, y, z) from our (z, y, x) grid's affine."""
    return np.asarray(affine_zyx, dtype=np.float64)[:, [2, 1, 0, 3]]


def write_inputs(model_dir: str, cases: Sequence[tuple[str, str, str | None]], out: str, *,
                 overwrite: bool = False) -> list[str]:
    """`CASE_000K.nii.gz` for each (case, pet, ct): the harmonized, normalized network input;
    plus INPUTS_RECORD (what `write_masks` needs to go back). Returns the failures."""
    import nibabel as nib

    from petct_jax.output_paths import refuse_existing, refuse_output_over_inputs, save_nifti

    settings = _results_settings(model_dir)
    predictor = _predictor(settings)
    n = len(settings["channels"])
    os.makedirs(out, exist_ok=True)
    record_path = os.path.join(out, INPUTS_RECORD)
    record = _load_json(record_path) if os.path.exists(record_path) else {"model": model_dir, "cases": {}}
    failures = []
    for case, pet, ct in cases:
        names = [os.path.join(out, f"{case}_{c:04d}.nii.gz") for c in range(n)]
        try:
            for name in names:
                refuse_output_over_inputs(name, (("--pet", pet), ("--ct", ct)))
            refuse_existing(names, overwrite)
            arrays, rec = predictor.harmonize(pet, ct, case)
            image = predictor.image(arrays, rec)
        except PetctError as e:
            failures.append(f"{case}: {e}")
            continue
        affine = _xyz_affine(rec["affine_zyx"])
        for c, name in enumerate(names):
            save_nifti(nib.Nifti1Image(np.ascontiguousarray(image[..., c].transpose(2, 1, 0)), affine), name)
        record["cases"][case] = {"pet": os.path.abspath(pet), "affine_zyx": rec["affine_zyx"],
                                 "shape_zyx": rec["shape_zyx"], "warnings": rec.get("warnings", [])}
        _dump_json(record_path + ".tmp", record)
        os.replace(record_path + ".tmp", record_path)
    return failures


def write_masks(inputs: str, masks: str, out: str, *, overwrite: bool = False) -> tuple[int, list[str]]:
    """nnU-Net's masks (on the harmonized grid) onto each input PET's own grid, as
    `petct predict` writes them. Returns (written, failures)."""
    import nibabel as nib

    from petct_jax.downstream.predict import to_input_grid, write_nifti
    from petct_jax.output_paths import refuse_existing, same_path
    from petct_jax.preprocessing.harmonize import open_image

    record = _load_json(os.path.join(inputs, INPUTS_RECORD))
    if same_path(out, masks) or same_path(out, inputs):
        raise PetctError(f"--out {out} is the --masks or --inputs folder; write elsewhere")
    os.makedirs(out, exist_ok=True)
    written, failures = 0, []
    for case, rec in sorted(record.get("cases", {}).items()):
        src, dst = os.path.join(masks, f"{case}.nii.gz"), os.path.join(out, f"{case}.nii.gz")
        try:
            if not os.path.isfile(src):
                raise PetctError(f"no nnU-Net mask {src}")
            refuse_existing([dst], overwrite)
            img = nib.load(src)
            labels = np.asarray(img.dataobj).astype(np.uint8).transpose(2, 1, 0)
            if list(labels.shape) != list(rec["shape_zyx"]) or not np.allclose(
                    img.affine, _xyz_affine(rec["affine_zyx"]), atol=1e-3):
                raise PetctError(f"{src}: not on the grid nnunet-inputs wrote for {case}")
            pet = open_image(rec["pet"], "PET", case)
            mask = to_input_grid(labels, {"id": case, "affine_zyx": rec["affine_zyx"]}, pet, order=0)
            write_nifti(dst, mask, pet.affine, nib.load(rec["pet"]).header)
            written += 1
        except PetctError as e:
            failures.append(f"{case}: {e}")
    return written, failures
