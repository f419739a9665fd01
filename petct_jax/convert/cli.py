"""`petct convert`: weights between PyTorch (nnU-Net, MONAI) and petct-jax.

    petct convert torch2jax --arch plain_unet --in nnunet_v2_mim_best.pth --out converted/
        [--kwargs-json '{"num_classes": 2}'] [--overwrite]
    petct convert jax2torch --in converted/ --out weights.safetensors   (or weights.pth)
    petct convert jax2nnunet --run W --out DIR [--which best] [--overwrite]
    petct convert nnunet2jax --in DIR_OR_CHECKPOINT --out converted/ [--fold all]
    petct convert nnunet-inputs --model DIR (--input RAW | --pet P --ct C) --out IMAGES
    petct convert nnunet-masks --inputs IMAGES --masks NNUNET_OUT --out MASKS

torch2jax writes `model.json` (arch + constructor arguments) and an Orbax checkpoint of the
parameters under `params/`; `petct_jax.convert.load_converted(dir)` rebuilds the model.
jax2torch reads such a folder (`petct_jax.convert.load_model`) and writes a state_dict that
loads with `load_state_dict(strict=True)` into the PyTorch twin. The nnU-Net v2 forms
(results folders, pretrained weights, and the input/mask step around `nnUNetv2_predict`)
are described in `petct_jax.convert.nnunet_folder`.
"""

from __future__ import annotations

import argparse
import json
import math

from petct_jax.errors import PetctError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    t2j = sub.add_parser("torch2jax", help="PyTorch weights file -> converted JAX model directory")
    t2j.add_argument("--arch", required=True,
                     help="plain_unet, resenc_unet or swin_unetr")
    t2j.add_argument("--in", dest="src", required=True,
                     help=".pth/.pt (loaded with weights_only=True), .safetensors or .npz: a "
                          "state_dict or a checkpoint holding one")
    t2j.add_argument("--out", required=True, help="directory to write (model.json + params/)")
    t2j.add_argument("--kwargs-json", default="{}",
                     help="constructor arguments, torch names (JSON object); by default read "
                          "off the weights where possible")
    t2j.add_argument("--preset", default="reference", choices=("reference", "canonical"),
                     help="harmonization preset of the data the weights were trained on, recorded "
                          "in model.json (default reference: the authors' released weights saw "
                          "their preprocessing; fine-tuning refuses a store of the other preset)")
    t2j.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
    j2t = sub.add_parser("jax2torch", help="JAX model (converted directory) -> PyTorch weights")
    j2t.add_argument("--in", dest="src", required=True, help="converted model directory")
    j2t.add_argument("--out", required=True, help="F.safetensors or F.pth")
    j2n = sub.add_parser("jax2nnunet", help="petct run -> nnU-Net v2: a fine-tuned run as a results "
                                            "folder, an MAE run as -pretrained_weights")
    j2n.add_argument("--run", required=True, help="workdir of a fine-tuning or MAE run")
    j2n.add_argument("--which", default="best", help="checkpoint: best, latest or a step")
    j2n.add_argument("--out", required=True,
                     help="folder to write, e.g. $nnUNet_results/Dataset901_PETCT/"
                          "nnUNetTrainer__nnUNetPlans__3d_fullres")
    j2n.add_argument("--dataset-name", default="Dataset901_PETCT", help="plans' dataset_name")
    j2n.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    n2j = sub.add_parser("nnunet2jax", help="nnU-Net v2 results folder or nnssl checkpoint -> "
                                            "converted JAX model directory")
    n2j.add_argument("--in", dest="src", required=True,
                     help="results folder (plans.json, dataset.json, fold_F/) or a checkpoint .pth "
                          "with an nnssl adaptation_plan")
    n2j.add_argument("--fold", default="all", help="results folder: which fold_F (default all)")
    n2j.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    n2j.add_argument("--configuration", default=None,
                     help="plans configuration (default: the checkpoint's, else 3d_fullres)")
    n2j.add_argument("--out", required=True, help="directory to write (model.json + params/)")
    n2j.add_argument("--overwrite", action="store_true", help="replace an existing conversion")
    inp = sub.add_parser("nnunet-inputs", help="scans -> the images an exported results folder "
                                               "expects (harmonized and normalized as training)")
    inp.add_argument("--model", required=True, help="results folder written by jax2nnunet")
    inp.add_argument("--input", default=None, help="folder in AutoPET or nnU-Net layout, or a CSV")
    inp.add_argument("--pet", default=None, help="one scan: its PET (SUV) NIfTI")
    inp.add_argument("--ct", default=None, help="one scan: its CT NIfTI")
    inp.add_argument("--case", default=None, help="one scan: its case name (default: from --pet)")
    inp.add_argument("--out", required=True, help="folder for CASE_0000.nii.gz, ...")
    inp.add_argument("--overwrite", action="store_true", help="replace images written before")
    msk = sub.add_parser("nnunet-masks", help="nnU-Net's masks of nnunet-inputs images -> masks on "
                                              "each input PET's grid")
    msk.add_argument("--inputs", required=True, help="the nnunet-inputs --out folder")
    msk.add_argument("--masks", required=True, help="nnUNetv2_predict's -o folder")
    msk.add_argument("--out", required=True, help="folder for CASE.nii.gz on the PET grids")
    msk.add_argument("--overwrite", action="store_true", help="replace masks written before")


def run(args: argparse.Namespace) -> int:
    from petct_jax import convert

    if args.direction == "torch2jax":
        try:
            kwargs = json.loads(args.kwargs_json)
        except json.JSONDecodeError as e:
            raise PetctError(f"--kwargs-json is not valid JSON: {e}") from None
        if not isinstance(kwargs, dict):
            raise PetctError("--kwargs-json must be a JSON object")
        model = convert.from_torch(args.src, arch=args.arch, **kwargs)
        # the network's own record of its arguments, else what was given (checked on save)
        config = getattr(model, "config", None)
        out = convert.save_converted(model, args.arch, kwargs if config is None else config,
                                     args.out, overwrite=args.overwrite, extra={"preset": args.preset})
        print(f"{args.arch}: {_n_params(model):,} parameters from {args.src} -> {out}")
        return 0

    if args.direction in ("jax2nnunet", "nnunet2jax", "nnunet-inputs", "nnunet-masks"):
        return _run_nnunet(args)

    model = convert.load_model(args.src)
    state = convert.to_torch(model)
    out = convert.save_state_dict(state, args.out)
    print(f"{type(model).__name__}: {len(state)} state_dict keys from {args.src} -> {out}")
    return 0


def _run_nnunet(args: argparse.Namespace) -> int:
    from petct_jax.convert import nnunet_folder as nf

    if args.direction == "jax2nnunet":
        kind, out = nf.export_run(args.run, args.out, which=args.which, overwrite=args.overwrite,
                                  dataset_name=args.dataset_name)
        print(f"{args.run} -> {kind} {out}")
        return 0
    if args.direction == "nnunet2jax":
        from petct_jax import convert

        model, info = nf.read_nnunet(args.src, fold=args.fold, checkpoint=args.checkpoint,
                                     configuration=args.configuration)
        extra = {"nnunet": info, **({"preset": info["preset"]} if "preset" in info else {})}
        out = convert.save_converted(model, info["arch"], model.config, args.out,
                                     overwrite=args.overwrite, extra=extra)
        print(f"{info['arch']}: {_n_params(model):,} parameters from {args.src} -> {out}")
        return 0
    failures: list[str]
    if args.direction == "nnunet-inputs":
        cases, unlisted = _input_cases(args)
        failures = unlisted + nf.write_inputs(args.model, cases, args.out, overwrite=args.overwrite)
        total = len(cases) + len(unlisted)
        print(f"{total - len(failures)} of {total} scans -> {args.out}")
    else:
        written, failures = nf.write_masks(args.inputs, args.masks, args.out, overwrite=args.overwrite)
        print(f"{written} masks -> {args.out}")
    for line in failures:
        print(f"failed: {line}")
    return 1 if failures else 0


def _input_cases(args: argparse.Namespace) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(case, pet, ct) of the scans to write, and the listed cases that cannot be (one line each)."""
    if (args.input is None) == (args.pet is None):
        raise PetctError("nnunet-inputs: give --input RAW, or --pet (and --ct) for one scan")
    if args.pet is not None:
        from petct_jax.downstream.predict import _case_from_path
        return [(args.case or _case_from_path(args.pet), args.pet, args.ct)], []
    from petct_jax.preprocessing.readers import list_cases

    cases, failures = [], []
    for spec in list_cases(args.input):
        if spec.error is not None:
            failures.append(f"{spec.id}: {spec.error} ({spec.error_file or args.input})")
        else:
            cases.append((spec.id, spec.pet, spec.ct))
    return cases, failures


def _n_params(model) -> int:
    import jax
    from flax import nnx

    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
