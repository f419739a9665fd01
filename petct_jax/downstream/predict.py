"""`petct predict`: lesion masks for new PET/CT scans from a fine-tuned run, on the input PET grid.

    petct predict --checkpoint W --pet SUV.nii.gz --ct CT.nii.gz --out seg.nii.gz
                  [--probabilities prob.nii.gz] [--which best|latest|STEP] [--mirror]
                  [--batch-windows N] [--spacing Z,Y,X] [--overwrite]
                  [--plausibility error|warn|off[,CHECK=LEVEL...]]
    petct predict --checkpoint W --input DIR --out OUTDIR [--layout auto|autopet|nnunet|csv]
                  [--probabilities PROBDIR] [--overwrite] ...

What happens to a scan, in the order training saw it:

1. Harmonization, by the very function that built the training store
   (`petct_jax.preprocessing.harmonize.harmonize`): headers checked, CT and PET resampled through
   their affines onto the store's axis-aligned (z, y, x) grid over the PET field of view,
   body crop from the CT, per-scan statistics of the stored dtypes (PET float16 SUV,
   CT int16 HU), with the harmonization preset the run's store was made with
   (`config.data.preset`: canonical, or reference for the authors' procedure). The voxel size is the run's store spacing, found in this order:
   `STORE/store.json` of the run's `config.store`; `config.data.spacing_zyx` when the store
   is unreachable (fine-tuning records it there); `--spacing`. A `--spacing` that
   contradicts a known spacing is an error.
2. Normalization by the run's `config.data.normalization` through `data.normalize`: the
   paper's per-scan z-score uses the scan's own crop-box statistics; nnU-Net's CT scheme
   uses the dataset-wide CT statistics of the training cases, read from
   `config.data.ct_stats` when the run recorded them, else pooled (as fine-tuning does)
   from the store records of the run's training scans (`W/split.json` "train").
3. Sliding-window inference (`downstream.inference`) with the network fine-tuning built
   (`finetune.build_model`, 2 classes): window = the training patch, the run's
   `eval.overlap` (0.5), Gaussian weighting, mirroring over the 7 flips when `--mirror`
   (default: the run's `eval.mirror`); logits are averaged, then argmax, and softmax for
   the probability map.
4. Back to the input PET grid through the affines (`harmonize.resample` with the crop
   grid as source): nearest neighbour for the mask, linear for the probability map;
   voxels outside the body-crop box are background (probability 0). The mask is written
   as uint8 (0 = background, 1 = lesion; class indices for multi-class heads) with the
   input PET's affine and header (qform/sform codes, orientation, array order); the
   optional probability map (float32, the lesion = not-background probability) likewise.

Plausibility: before the network runs, each scan passes the checks of
preprocessing/plausibility.py (`--plausibility`, the syntax of `petct preprocess`; default
error): voxel sizes, PET vs CT value ranges (a swap or a PET given as CT), a CT without its
offset or clipped, and `body_masks`: the PET and CT bodies on the harmonized grid must
coincide (Dice >= plausibility.BODY_MIN_DICE), so a PET of one patient with the CT of
another, or PET and CT swapped, is refused naming both files. A failing check is an error
for the scan (the batch form reports it on one line and goes on); `warn` prints it and
predicts. Without a CT (PET-only model) the CT checks and body_masks do not run: the PET
stands in for the CT.

Channels: the model uses only the channels it was trained on (`config.data.channels`).
The CT is still needed for harmonization (the body crop, hence the z-score statistics,
come from it): a PET-only model run without `--ct` harmonizes the PET on its whole field
of view instead (no body crop; a warning says the PET statistics then differ from
training's). A model that needs CT without `--ct` is an error.

The model is built and loaded once, and one jitted network function (fixed window-batch
shape) serves every scan. The batch form lists cases with `petct_jax.preprocessing.readers` (AutoPET
or nnU-Net layout, or a CSV list), writes `OUTDIR/<case>.nii.gz`, skips cases whose
outputs exist unless `--overwrite`, reports a case that fails on one line and goes on
(exit status 1 when any failed). Outputs are written to a temporary name and renamed, so
an interrupted run never leaves a half-written mask that a re-run would skip.

Outputs never replace inputs: an output (`--out`, `--probabilities`, or a batch output
`OUTDIR/<case>.nii.gz`) that is, or resolves to, an input scan (`--pet`, `--ct`, a listed
case's files, `--input` itself) is refused before the model loads, as are `--out` and
`--probabilities` naming the same file or folder. The one-scan form replaces an existing
`--out`/`--probabilities` file only with `--overwrite`; without it the batch form writes only
a case's missing outputs, never over one that exists.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from petct_jax.data.normalize import CHANNELS, CTForegroundStats, Normalizer, check_channels, make_normalizer
from petct_jax.errors import PetctError
from petct_jax.output_paths import (is_within, refuse_existing, refuse_output_over_inputs, same_path,
                                    save_nifti)
from petct_jax.preprocessing import plausibility as checks
from petct_jax.preprocessing.readers import NIFTI_ENDINGS



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="WORKDIR",
                        help="workdir of a fine-tuning run (config.json + checkpoints/)")
    parser.add_argument("--which", default="best",
                        help="checkpoint: best (lowest validation loss; default), latest, or a step")
    parser.add_argument("--pet", default=None, help="PET (SUV) NIfTI of one scan")
    parser.add_argument("--ct", default=None, help="CT NIfTI of that scan (any grid overlapping the PET)")
    parser.add_argument("--input", default=None,
                        help="batch form: a folder in AutoPET or nnU-Net layout (or a CSV case list)")
    parser.add_argument("--layout", default="auto", choices=("auto", "autopet", "nnunet", "csv"),
                        help="batch form: input layout (default: detected)")
    parser.add_argument("--out", required=True,
                        help="output mask (.nii.gz) for one scan; a folder for the batch form")
    parser.add_argument("--probabilities", default=None,
                        help="also write the lesion probability map (float32): a .nii.gz file, or a "
                             "folder in the batch form")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing outputs: one scan: an existing --out/--probabilities "
                             "file (default: refuse); batch form: redo cases whose outputs exist "
                             "(default: skip them)")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=None,
                        help="mirroring test-time augmentation, 8x the network calls (default: the "
                             "run's eval.mirror)")
    parser.add_argument("--batch-windows", type=int, default=None,
                        help="windows per network call (default: the run's eval.batch_windows, else 2)")
    parser.add_argument("--spacing", default=None,
                        help="store voxel size z,y,x in mm; only needed when the run's store is "
                             "unreachable and its config records none")
    checks.add_argument(parser, checks.PREDICT_CHECKS, "warn,body_masks=off")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------- the run's settings


def _get(cfg: Any, dotted: str, default: Any = None) -> Any:
    """`cfg.a.b` for a ConfigDict/dict, or `default` when any part is missing or empty."""
    for part in dotted.split("."):
        try:
            cfg = cfg[part]
        except (KeyError, TypeError, AttributeError):
            return default
    if cfg is None or cfg == "" or cfg == ():
        return default
    return cfg.to_dict() if hasattr(cfg, "to_dict") else cfg


def parse_spacing(text: str | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(text, str):
        from petct_jax.preprocessing.preprocess import parse_spacing as parse
        return parse(text)
    values = tuple(float(v) for v in text)
    if len(values) != 3 or not all(v > 0 for v in values):
        raise PetctError(f"spacing {text!r}: expected three positive numbers z,y,x in mm")
    return values


def run_spacing(config: Any, override: str | Sequence[float] | None = None) -> tuple[tuple[float, ...], str]:
    """(spacing_zyx, where it came from): the run's store, its config, or `override`."""
    known, source = None, None
    store_root = _get(config, "store")
    if store_root:
        from petct_jax.store import read_info
        try:
            known, source = parse_spacing(read_info(str(store_root))["spacing_zyx"]), f"{store_root}/store.json"
        except Exception:  # unreachable store (moved, other machine, no credentials): fall back
            known = None
    if known is None and _get(config, "data.spacing_zyx") is not None:
        known, source = parse_spacing(_get(config, "data.spacing_zyx")), "config.data.spacing_zyx"
    if override is not None:
        spacing = parse_spacing(override)
        if known is not None and not np.allclose(spacing, known):
            raise PetctError(f"--spacing {list(spacing)} differs from the run's {list(known)} ({source}); "
                             "prediction must harmonize as training did")
        return spacing, source or "--spacing"
    if known is None:
        raise PetctError(f"cannot find the run's store spacing: store {store_root!r} is unreachable and "
                         "the config records no data.spacing_zyx; pass --spacing Z,Y,X (mm)")
    return known, source


def run_normalizer(config: Any, channels: Sequence[str], workdir: str | None = None) -> Normalizer:
    """The training run's normalizer (see the module doc for where nnU-Net's CT statistics come from)."""
    scheme = _get(config, "data.normalization", "zscore")
    if scheme != "nnunet" or "ct" not in channels:
        return make_normalizer(scheme if scheme != "nnunet" else "zscore")  # PET: per-scan z-score either way
    stats = _get(config, "data.ct_stats")
    if stats:
        try:
            return Normalizer("nnunet", CTForegroundStats(**dict(stats)))
        except TypeError as e:
            raise PetctError(f"config.data.ct_stats={stats!r}: expected lo, hi, mean, std, source ({e})") from None
    # As fine-tuning did: pooled over the records of the scans it trained on (W/split.json "train").
    store_root = _get(config, "store")
    split_path = os.path.join(workdir or ".", "split.json")
    try:
        from petct_jax.store import Store
        with open(split_path, encoding="utf-8") as f:
            train_ids = json.load(f)["train"]
        store = Store(str(store_root))
        records = [store.record(i) for i in train_ids]
    except Exception as e:
        raise PetctError(f"nnunet normalization needs the training scans' CT statistics: the config has no "
                         f"data.ct_stats, and {split_path} with store {store_root!r} cannot give them "
                         f"({type(e).__name__}: {e})") from None
    return make_normalizer("nnunet", records)


# ---------------------------------------------------------------- the predictor


@dataclasses.dataclass
class Prediction:
    """One scan's result on the input PET grid (the PET file's array order)."""
    case: str
    mask: np.ndarray  # uint8
    probability: np.ndarray | None  # float32 in [0, 1], lesion probability
    affine: np.ndarray  # the input PET's
    header: Any  # the input PET's nibabel header
    record: dict  # the harmonization record (crop box, stats, warnings)
    seconds: float

    def lesion_ml(self) -> float:
        voxel_ml = abs(float(np.linalg.det(self.affine[:3, :3]))) / 1000.0
        return float(np.count_nonzero(self.mask)) * voxel_ml


@dataclasses.dataclass
class Predictor:
    """Everything needed to segment a scan: one compiled network and the run's data settings.

    `predict_fn` maps (batch_windows, *window, len(channels)) normalized windows to
    (batch_windows, *window, num_classes) logits (tests inject a fixed function).
    """
    predict_fn: Callable[[Any], Any]
    channels: tuple[str, ...]
    window: tuple[int, int, int]
    num_classes: int
    spacing_zyx: tuple[float, float, float]
    normalizer: Normalizer = Normalizer()
    batch_windows: int = 2
    mirror: bool = False
    overlap: float = 0.5
    description: str = "injected predict_fn"
    plausibility: dict[str, str] = dataclasses.field(
        default_factory=lambda: checks.default_levels(checks.PREDICT_CHECKS))
    preset: str = "canonical"  # harmonization preset of the training data (config.data.preset)

    @property
    def needs_ct(self) -> bool:
        return "ct" in self.channels

    def harmonize(self, pet: str, ct: str | None, case: str) -> tuple[dict[str, np.ndarray], dict]:
        """The scan on the store grid, exactly as preprocessing made the training store."""
        from petct_jax.preprocessing.harmonize import harmonize
        from petct_jax.preprocessing.readers import CaseSpec

        if ct is None and self.needs_ct:
            raise PetctError(f"{case}: the model was trained on {'+'.join(c.upper() for c in self.channels)} "
                             f"and needs a CT (--ct)")
        for role, path in (("PET", pet), ("CT", ct)):
            if path is not None and not os.path.isfile(path):
                raise PetctError(f"{case}: {role} file missing: {path}")
        # Without a CT the PET stands in for it: every SUV is above the -500 HU body
        # threshold, so the "body" is the whole PET field of view (no crop) and the rest
        # of harmonization is unchanged. Only a PET-only model gets here; the CT checks
        # would refuse the PET in the CT's place, so they do not run on it.
        levels = {c: self.plausibility.get(c, "off") for c in checks.CHECKS}
        if ct is None:
            levels.update(dict.fromkeys(checks.CT_CHECKS, "off"))
        spec = CaseSpec(id=case, patient_id=case, cohort="predict", pet=pet, ct=ct if ct is not None else pet)
        arrays, record = harmonize(spec, self.spacing_zyx, plausibility=levels, preset=self.preset)
        if ct is None:
            # voxel_size ran on the same file as PET and as its stand-in: one warning
            record["warnings"] = list(dict.fromkeys(record["warnings"]))
            record["warnings"].append("no CT: no body crop; PET z-score statistics over the whole field of "
                                      "view (training used the CT body box)")
        else:
            self._check_bodies(arrays, record, pet, ct, case)
        return arrays, record

    def _check_bodies(self, arrays: dict[str, np.ndarray], record: dict, pet: str, ct: str, case: str) -> None:
        """body_masks on the harmonized grid, counted inside both source fields of view."""
        from petct_jax.preprocessing.harmonize import open_image

        if self.plausibility.get("body_masks", "off") == "off":
            return
        grid = np.asarray(record["affine_zyx"], dtype=np.float64)
        views = []
        for role, path in (("PET", pet), ("CT", ct)):
            image = open_image(path, role, case)  # the header only
            views.append((np.linalg.inv(image.affine) @ grid, image.shape))
        findings = checks.body_masks(arrays["pet"], arrays["ct"], self.spacing_zyx, pet, ct,
                                     self.plausibility, views)
        checks.report(findings, self.plausibility, lambda problem: PetctError(f"{case}: {problem}"),
                      record["warnings"])

    def image(self, arrays: dict[str, np.ndarray], record: dict) -> np.ndarray:
        """(Z, Y, X, C) float32 network input, normalized as the training data pipeline does."""
        return np.stack([self.normalizer(c, arrays[c], record) for c in self.channels], axis=-1)

    def logits(self, image: np.ndarray, progress: bool = False) -> np.ndarray:
        from petct_jax.downstream.inference import sliding_window_predict

        return sliding_window_predict(self.predict_fn, image, self.window, num_classes=self.num_classes,
                                      overlap=self.overlap, batch_windows=self.batch_windows,
                                      mirror=self.mirror, progress=progress)

    def predict(self, pet: str, ct: str | None = None, *, case: str | None = None,
                probabilities: bool = False, progress: bool = False) -> Prediction:
        """Segment one scan; the result lies on the input PET's grid."""
        import nibabel as nib
        from petct_jax.preprocessing.harmonize import open_image

        start = time.perf_counter()
        case = case or _case_from_path(pet)
        arrays, record = self.harmonize(pet, ct, case)
        image = self.image(arrays, record)
        del arrays
        labels, prob = labels_and_probability(self.logits(image, progress), probabilities)
        pet_image = open_image(pet, "PET", case)
        mask = to_input_grid(labels, record, pet_image, order=0)
        prob = None if prob is None else np.clip(to_input_grid(prob, record, pet_image, order=1), 0.0, 1.0)
        return Prediction(case, mask, prob, pet_image.affine, nib.load(pet).header, record,
                          time.perf_counter() - start)


def labels_and_probability(logits: np.ndarray, probabilities: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """(uint8 labels = argmax, lesion probability = 1 - softmax background, or None) from
    averaged logits (Z, Y, X, K)."""
    labels = np.argmax(logits, axis=-1).astype(np.uint8)
    if not probabilities:
        return labels, None
    shifted = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(shifted)
    background = e[..., 0] / e.sum(axis=-1)
    return labels, (1.0 - background).astype(np.float32)


def to_input_grid(volume: np.ndarray, record: dict, pet_image: Any, *, order: int) -> np.ndarray:
    """Resample a (z, y, x) volume on the record's crop grid onto the input PET's voxels
    (through the affines); voxels outside the crop box get 0 (background)."""
    from petct_jax.preprocessing.harmonize import Image, resample

    crop = Image(path="<prediction>", role="prediction", case_id=record["id"],
                 shape=tuple(volume.shape), affine=np.asarray(record["affine_zyx"], dtype=np.float64),
                 slope=1.0, inter=0.0, proxy=None)
    dtype = np.uint8 if order == 0 else np.float32
    return resample(crop, volume, pet_image.affine, pet_image.shape, order=order, fill=0, dtype=dtype)


# ---------------------------------------------------------------- loading a run


def _parse_which(which: str | int) -> str | int:
    if isinstance(which, int) or which in ("best", "latest"):
        return which
    try:
        return int(which)
    except ValueError:
        raise PetctError(f"--which {which!r}: expected best, latest or a step number") from None


def run_preset(config: Any) -> str:
    """The harmonization preset of the run's training data (runs from before presets were
    recorded were canonical)."""
    return str(_get(config, "data.preset", "canonical"))


def run_channels(config: Any) -> tuple[str, ...]:
    """The input channels the run was trained on, in network order."""
    return check_channels(tuple(_get(config, "data.channels", CHANNELS)))


def load_predictor(workdir: str, which: str | int = "best", *, spacing: str | Sequence[float] | None = None,
                   batch_windows: int | None = None, mirror: bool | None = None,
                   plausibility: dict[str, str] | None = None) -> Predictor:
    """Build the run's network, load one checkpoint's parameters, jit the predict function.

    `batch_windows`, `mirror`: None takes the run's `eval` settings (its test evaluation).
    `plausibility`: the level of each check (plausibility.PREDICT_CHECKS; None: all errors).
    """
    from petct_jax.downstream.common import NUM_CLASSES
    from petct_jax.train.restore import checkpoint_step, read_run_config

    if not os.path.isdir(workdir):
        raise PetctError(f"{workdir}: no such run directory")
    config = read_run_config(workdir)
    task = _get(config, "task")
    if task != "seg":
        raise PetctError(f"{workdir}: holds a {task!r} run; predict needs a fine-tuned segmentation run "
                         "(task 'seg', made by petct finetune)")
    for key in ("model.name", "data.patch"):
        if _get(config, key) is None:
            raise PetctError(f"{workdir}/config.json: no {key}")
    channels = run_channels(config)
    window = tuple(int(p) for p in _get(config, "data.patch"))
    batch_windows = int(batch_windows or _get(config, "eval.batch_windows", 2))
    if batch_windows < 1:
        raise PetctError(f"--batch-windows {batch_windows}: must be >= 1")
    mirror = bool(_get(config, "eval.mirror", False) if mirror is None else mirror)
    spacing_zyx, _ = run_spacing(config, spacing)
    normalizer = run_normalizer(config, channels, workdir)
    step = checkpoint_step(workdir, _parse_which(which))  # before building: a clear error for no checkpoint
    model = load_model(workdir, config, step, NUM_CLASSES)

    from petct_jax.downstream.inference import make_predict_fn
    return Predictor(make_predict_fn(model), channels, window, NUM_CLASSES, spacing_zyx, normalizer,
                     batch_windows=batch_windows, mirror=mirror,
                     overlap=float(_get(config, "eval.overlap", 0.5)),
                     plausibility=plausibility or checks.default_levels(checks.PREDICT_CHECKS),
                     preset=run_preset(config),
                     description=f"{workdir} step {step} ({_get(config, 'model.name')}, "
                                 f"{'+'.join(c.upper() for c in channels)}, window {list(window)})")


def load_model(workdir: str, config: Any, step: int, num_classes: int) -> Any:
    """The network fine-tuning built (`finetune.build_model`) with the parameters of checkpoint `step`."""
    import jax
    from flax import nnx

    from petct_jax.downstream.finetune import build_model
    from petct_jax.train.restore import load_params

    model = build_model(config, nnx.Rngs(0))
    target = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    _, params, _ = load_params(workdir, step, target)
    # Orbax restores the stored shapes whatever the target says: check them here.
    flat_target = dict(jax.tree_util.tree_flatten_with_path(target)[0])
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        want = flat_target.get(path)
        if want is None or tuple(value.shape) != tuple(want.shape):
            name = "/".join(str(getattr(k, "key", k)) for k in path)
            channels = list(_get(config, "data.channels", CHANNELS))
            raise PetctError(
                f"{workdir}: checkpoint step {step} parameter {name} has shape {tuple(value.shape)}, the "
                f"model of config.json expects {None if want is None else tuple(want.shape)} "
                f"({len(channels)} input channel(s) {channels}, {num_classes} classes)")
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


# ---------------------------------------------------------------- writing


def write_nifti(path: str, data: np.ndarray, affine: np.ndarray, header: Any) -> None:
    """Write `data` with the input PET's geometry; atomic (temporary name, then rename)."""
    import nibabel as nib

    header = header.copy()
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, affine, header=header)
    img.header.set_slope_inter(1.0, 0.0)
    if data.dtype.kind == "u":
        img.header["cal_min"], img.header["cal_max"] = 0, max(int(data.max()), 1)
    else:
        img.header["cal_min"], img.header["cal_max"] = 0.0, 1.0
    save_nifti(img, path)


def write_prediction(pred: Prediction, out: str | None, probabilities: str | None = None) -> None:
    """Write the mask to `out` and the probability map to `probabilities`; None skips one."""
    if out is not None:
        write_nifti(out, pred.mask, pred.affine, pred.header)
    if probabilities is not None and pred.probability is not None:
        write_nifti(probabilities, pred.probability, pred.affine, pred.header)


def check_one_scan_outputs(args: argparse.Namespace) -> None:
    """The one-scan form's outputs replace neither its inputs nor each other, nor (without
    --overwrite) an existing file."""
    inputs = (("--pet", args.pet), ("--ct", args.ct))
    outputs = [("--out", args.out)] + ([("--probabilities", args.probabilities)] if args.probabilities else [])
    for option, path in outputs:
        refuse_output_over_inputs(path, inputs, option)
    if args.probabilities and same_path(args.out, args.probabilities):
        raise PetctError(f"--probabilities {args.probabilities} is the same file as --out {args.out}: "
                         "the map would replace the mask")
    for option, path in outputs:
        refuse_existing([path], getattr(args, "overwrite", False), option)


def check_folder_outputs(args: argparse.Namespace, specs: Sequence[Any]) -> None:
    """The batch form's output folders are not the input, not each other, and no output file
    of any case is one of the listed input files."""
    folders = [("--out", args.out)] + ([("--probabilities", args.probabilities)] if args.probabilities else [])
    for option, folder in folders:
        refuse_output_over_inputs(folder, [("--input", args.input)], option)
    if args.probabilities and same_path(args.out, args.probabilities):
        raise PetctError(f"--probabilities {args.probabilities} is the same folder as --out {args.out}: "
                         "the maps would replace the masks")
    # One stat per file (not outputs x inputs comparisons): inputs by inode and by resolved path.
    by_inode, by_path = {}, {}
    for spec in specs:
        for role, path in (("PET", spec.pet), ("CT", spec.ct), ("SEG", spec.seg)):
            if path and os.path.exists(path):
                st = os.stat(path)
                by_inode[(st.st_dev, st.st_ino)] = by_path[os.path.realpath(path)] = f"{spec.id} {role} {path}"
    for option, folder in folders:
        if not os.path.isdir(folder):
            continue  # created by the run: nothing in it can be an input
        for spec in specs:
            out = os.path.join(folder, f"{spec.id}.nii.gz")
            hit = by_path.get(os.path.realpath(out))
            if hit is None and os.path.exists(out):
                st = os.stat(out)
                hit = by_inode.get((st.st_dev, st.st_ino))
            if hit is not None:
                raise PetctError(f"{option} {folder}: output {out} is the same file as input {hit}: "
                                 "refusing to overwrite an input")
    # Masks inside the input tree would be listed as scans (or labels) by the next run over it.
    if os.path.isdir(args.input):
        for option, folder in folders:
            if is_within(folder, args.input):
                raise PetctError(f"{option} {folder} lies inside --input {args.input}: its masks would "
                                 "be read as input files; write them elsewhere")


def _check_nifti_name(path: str, option: str) -> None:
    if not path.endswith(NIFTI_ENDINGS):
        raise PetctError(f"{option} {path}: must end in .nii.gz or .nii")


def _case_from_path(path: str) -> str:
    name = os.path.basename(path)
    for ending in NIFTI_ENDINGS:
        if name.endswith(ending):
            return name[: -len(ending)] or "scan"
    return name or "scan"


# ---------------------------------------------------------------- the command


def _summary_line(pred: Prediction, out: str) -> str:
    lesions = _components(pred.mask)
    return (f"{pred.case}: {lesions} lesion(s), {pred.lesion_ml():.1f} mL in {pred.seconds:.1f} s -> {out}")


def _components(mask: np.ndarray) -> int:
    from scipy import ndimage as ndi
    return int(ndi.label(mask > 0, structure=ndi.generate_binary_structure(3, 2))[1])


def predict_one(predictor: Predictor, args: argparse.Namespace) -> int:
    pred = predictor.predict(args.pet, args.ct, probabilities=bool(args.probabilities),
                             progress=not args.no_progress)
    write_prediction(pred, args.out, args.probabilities)
    for w in pred.record.get("warnings", []):
        print(f"petct predict: warning: {pred.case}: {w}", file=sys.stderr)
    print(f"petct predict: {_summary_line(pred, args.out)}")
    return 0


def predict_folder(predictor: Predictor, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from petct_jax.preprocessing.readers import list_cases

    specs = list_cases(args.input, args.layout)
    for option, folder in (("--out", args.out), ("--probabilities", args.probabilities)):
        if folder and os.path.exists(folder) and not os.path.isdir(folder):
            raise PetctError(f"{option} {folder}: the batch form writes into a folder; this is a file")
    check_folder_outputs(args, specs)
    todo, skipped, failed = [], [], []
    for spec in specs:
        outs = [os.path.join(args.out, f"{spec.id}.nii.gz")]
        if args.probabilities:
            outs.append(os.path.join(args.probabilities, f"{spec.id}.nii.gz"))
        if not args.overwrite and all(os.path.exists(p) for p in outs):
            skipped.append(spec.id)
        else:
            # Without --overwrite only the missing outputs are written (a mask already there,
            # e.g. before --probabilities was asked for, is kept as it is).
            todo.append((spec, [p if args.overwrite or not os.path.exists(p) else None for p in outs]))
    bar = tqdm(total=len(todo), unit="scan", desc="predict", disable=args.no_progress,
               file=sys.stderr, dynamic_ncols=True)
    written = 0
    try:
        for spec, outs in todo:
            try:
                if spec.error:
                    raise PetctError(f"{spec.id}: {spec.error}" + (f": {spec.error_file}" if spec.error_file else ""))
                pred = predictor.predict(spec.pet, spec.ct, case=spec.id,
                                         probabilities=bool(args.probabilities), progress=not args.no_progress)
                write_prediction(pred, outs[0], outs[1] if len(outs) > 1 else None)
                written += 1
                for w in pred.record.get("warnings", []):
                    bar.write(f"petct predict: warning: {spec.id}: {w}", file=sys.stderr)
                mask_path = os.path.join(args.out, f"{spec.id}.nii.gz")
                bar.write(f"petct predict: {_summary_line(pred, mask_path)}", file=sys.stdout)
            except PetctError as e:
                failed.append(str(e))
                bar.write(f"FAILED {e}", file=sys.stderr)
            except Exception as e:  # one broken scan must not stop a cohort (as preprocess)
                failed.append(f"{spec.id}: internal error {type(e).__name__}: {e}")
                bar.write(f"FAILED {failed[-1]}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
    print(f"petct predict: {written} predicted, {len(skipped)} already there, {len(failed)} failed -> {args.out}")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    if (args.input is None) == (args.pet is None):
        raise PetctError("give either --pet (and --ct) for one scan, or --input DIR for a folder of scans")
    if args.input is not None and args.ct is not None:
        raise PetctError("--ct belongs to the one-scan form (--pet); the batch form reads CTs from --input")
    levels = checks.parse_levels(getattr(args, "plausibility", "error"), checks.PREDICT_CHECKS)
    if args.pet is not None:  # fail before loading anything
        from petct_jax.train.restore import read_run_config
        _check_nifti_name(args.out, "--out")
        if args.probabilities:
            _check_nifti_name(args.probabilities, "--probabilities")
        for option, path in (("--pet", args.pet), ("--ct", args.ct)):
            if path is not None and not os.path.isfile(path):
                raise PetctError(f"{option} {path}: no such file")
        check_one_scan_outputs(args)
        channels = run_channels(read_run_config(args.checkpoint))
        if "ct" in channels and args.ct is None:
            raise PetctError(f"the model in {args.checkpoint} was trained on "
                             f"{'+'.join(c.upper() for c in channels)} and needs --ct")
    predictor = load_predictor(args.checkpoint, args.which, spacing=args.spacing,
                               batch_windows=args.batch_windows, mirror=args.mirror, plausibility=levels)
    print(f"petct predict: model {predictor.description}; store spacing {list(predictor.spacing_zyx)} mm",
          file=sys.stderr)
    if args.input is not None:
        return predict_folder(predictor, args)
    return predict_one(predictor, args)
