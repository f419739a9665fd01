"""Plausibility checks: does each scan hold what it claims to be?

A NIfTI that reads cleanly can still be the wrong thing: PET and CT swapped, a PET copied
as the CT, a CT missing its -1024 HU offset, a CT clipped by a bad scl_slope, an affine in
micrometres, or one scan ingested twice under two ids (which can leak across a split).
Each check has a name, a threshold and a level; the level is `error` (the case fails like
any other bad case: recorded in failures.jsonl, the rest of the cohort goes on), `warn`
(the case goes in; a line `plausibility warning [NAME] case ID: ...` is printed and the
same text kept in the record's `warnings`) or `off`.

    petct preprocess ... --plausibility error            (the default: every check errors)
    petct preprocess ... --plausibility warn,ct_range=off (all warn, ct_range not run)
    petct preprocess ... --plausibility ct_offset=warn    (the rest stay errors)

Values are checked on each source image as stored (scl_slope/scl_inter applied), before
resampling, so fill values and the crop do not enter. Shares of voxels come from an even
3-D subsample of at most SAMPLE_VOXELS voxels (a 512x512x600 CT: every 5th voxel per
axis); minima and maxima are exact.

The checks and their thresholds (the phantoms pass all of them with margin: CT min -1024
HU, 74-85% of voxels at or below -900 HU, body median -48 to -165 HU, max <= 1108 HU; SUV
max 10-48, PET in Bq/mL max about 122k; voxels 4-8 mm):

voxel_size    every image (PET, CT, SEG) has voxel sizes within VOXEL_MM = 0.3-10 mm
              (clinical PET 2-5 mm, CT 0.5-5 mm). Outside means the affine's units are
              wrong (micrometres, metres): such an affine made a 1x1x1-voxel case.
ct_range      the CT looks like Hounsfield units: its minimum is at most CT_AIR_HU = -900
              HU (air is -1000, stored as -1024) and at least CT_AIR_SHARE = 10% of its
              voxels are that low (a CT field of view is mostly air: 60-85% in practice).
              A PET given as CT, or PET and CT swapped, has no voxel that low.
pet_range     the PET does not look like HU: fewer than PET_NEGATIVE_SHARE = 10% of its
              voxels are at or below PET_NEGATIVE = -500 (in SUV or Bq/mL; reconstruction
              noise is never that negative over a tenth of the image). A CT given as PET,
              or PET and CT swapped, has its air there.
ct_offset     the CT is not raw scanner numbers without the -1024 HU intercept: refused
              when its minimum lies within CT_OFFSET_MIN = -100..+100 and the median of
              the voxels above minimum + 500 (the body) lies within CT_OFFSET_BODY =
              +800..+1300 (soft tissue is about 0 HU, +1024 without the offset).
ct_saturated  the CT is not clipped: at most CT_SATURATED_SHARE = 1% of its voxels sit at
              the stored integer type's maximum, or at its minimum when that means more
              than -1024 HU (air below it was cut off; a minimum meaning <= -1024 HU is
              air or padding). For float storage the same limit holds at 32767 HU, the
              int16 limit a conversion would clip to. A wrong slope clips whole tissue
              classes; metal implants stay far below 1% (and at 3071 HU, not the limit).
duplicate     no two case ids share a PET file's content (sha256, as the manifest records
              in source_sha256): the same scan through a copied or symlinked folder under
              another patient id is refused, against the store and earlier in the same
              run (the first id keeps the scan). Run by `petct preprocess` in the parent
              process before any case is dispatched (a re-run of the same id is no
              duplicate).

body_masks    (`petct predict` only, PREDICT_CHECKS) the PET and CT bodies coincide on
              the harmonized grid: Dice >= BODY_MIN_DICE = 0.80 of the CT body (> -500
              HU) and the PET body (> half its tissue level), each filled per slice,
              opened by BODY_OPEN_MM = 10 mm (the table goes) and reduced to its largest
              component, inside both fields of view (body_overlap, body_masks). A PET of
              one patient with the CT of another lying elsewhere or of another build, or
              PET and CT swapped, is refused naming both files.

`harmonize(..., plausibility=None)` runs none of the image checks; `petct preprocess`
always passes its levels (CHECKS); `petct predict` passes its own (PREDICT_CHECKS, the
same `--plausibility` syntax through parse_levels) with the CT checks off when the PET
stands in for a missing CT, and runs body_masks on harmonize's output.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from scipy import ndimage as ndi

from petct_jax.errors import PetctError

CHECKS = ("voxel_size", "ct_range", "pet_range", "ct_offset", "ct_saturated", "duplicate")
# `petct predict` checks one scan at a time: no duplicate check, and the body masks of PET
# and CT compared on the grid harmonization gave both.
PREDICT_CHECKS = ("voxel_size", "ct_range", "pet_range", "ct_offset", "ct_saturated", "body_masks")
CT_CHECKS = ("ct_range", "ct_offset", "ct_saturated")
LEVELS = ("error", "warn", "off")

VOXEL_MM = (0.3, 10.0)
CT_AIR_HU = -900.0
CT_AIR_SHARE = 0.10
PET_NEGATIVE = -500.0
PET_NEGATIVE_SHARE = 0.10
CT_OFFSET_MIN = (-100.0, 100.0)
CT_OFFSET_BODY = (800.0, 1300.0)
CT_SATURATED_SHARE = 0.01
CT_AIR_STORED_HU = -1024.0
INT16_MAX = 32767.0
SAMPLE_VOXELS = 1 << 21
BODY_CT_HU = -500.0
BODY_PET_FLOOR = 1e-3
BODY_OPEN_MM = 10.0
BODY_PET_FRACTION = 0.5
BODY_MIN_DICE = 0.80


def default_levels(names: Sequence[str] = CHECKS) -> dict[str, str]:
    return {name: "error" for name in names}


def add_argument(parser: Any, names: Sequence[str], example: str) -> None:
    """The `--plausibility` option of a command that runs the checks `names`."""
    parser.add_argument("--plausibility", default="error",
                        help="level of the plausibility checks, error|warn|off, with optional "
                             f"overrides CHECK=LEVEL (e.g. {example}); checks: "
                             + ", ".join(names) + " (default %(default)s)")


def parse_levels(text: str, names: Sequence[str] = CHECKS) -> dict[str, str]:
    """`--plausibility`: a level for all checks and/or NAME=LEVEL overrides, comma-separated;
    `names` are the checks the command runs (CHECKS for preprocess, PREDICT_CHECKS for predict)."""
    levels = default_levels(names)
    overrides = {}
    for n, item in enumerate(t.strip() for t in str(text).split(",")):
        name, sep, level = item.partition("=")
        if not sep and n == 0 and item in LEVELS:
            levels = {c: item for c in names}
            continue
        if not sep or name.strip() not in names or level.strip() not in LEVELS:
            raise PetctError(f"--plausibility {text!r}: expected LEVEL[,CHECK=LEVEL...] with LEVEL one "
                             f"of {'|'.join(LEVELS)} and CHECK one of {', '.join(names)} (got {item!r})")
        overrides[name.strip()] = level.strip()
    levels.update(overrides)
    return levels


@dataclasses.dataclass
class Finding:
    check: str
    message: str


def report(findings: Iterable[Finding], levels: dict[str, str] | None, fail: Callable[[str], Exception],
           warnings: list[str]) -> None:
    """Raise `fail(problem)` naming every finding at level error; append the warnings."""
    levels = levels or default_levels()
    findings = list(findings)
    errors = [f for f in findings if levels[f.check] == "error"]
    for f in findings:
        if levels[f.check] == "warn":
            warnings.append(f"plausibility warning [{f.check}]: {f.message}")
    if errors:
        raise fail("fails plausibility: " + "; ".join(f"[{f.check}] {f.message}" for f in errors)
                   + " (--plausibility CHECK=warn|off to accept)")


def voxel_size(image) -> list[Finding]:
    mm = image.voxel_mm
    if np.all((mm >= VOXEL_MM[0]) & (mm <= VOXEL_MM[1])):
        return []
    return [Finding("voxel_size", f"voxel size {[float(f'{v:.4g}') for v in mm]} mm is outside "
                                  f"{VOXEL_MM[0]:g}-{VOXEL_MM[1]:g} mm: the affine's units look wrong")]


def _scaled_range(image, raw: np.ndarray) -> tuple[float, float]:
    ends = np.array([raw.min(), raw.max()], dtype=np.float64) * image.slope + image.inter
    return float(ends.min()), float(ends.max())


def _sample(raw: np.ndarray) -> np.ndarray:
    """An even strided subsample (a view, then at most SAMPLE_VOXELS copied), unscaled."""
    step = max(1, math.ceil((raw.size / SAMPLE_VOXELS) ** (1 / raw.ndim)))
    return np.asarray(raw[(slice(None, None, step),) * raw.ndim]).reshape(-1)


def ct_values(image, raw: np.ndarray, levels: dict[str, str] | None) -> list[Finding]:
    """ct_range, ct_offset and ct_saturated on the CT's stored voxels."""
    levels = levels or default_levels()
    wanted = [c for c in ("ct_range", "ct_offset", "ct_saturated") if levels[c] != "off"]
    if not wanted:
        return []
    lo, hi = _scaled_range(image, raw)
    sample = _sample(raw)
    hu = sample.astype(np.float64) * image.slope + image.inter
    findings = []
    if "ct_range" in wanted:
        air = float(np.mean(hu <= CT_AIR_HU))
        if lo > CT_AIR_HU or air < CT_AIR_SHARE:
            findings.append(Finding("ct_range", (
                f"CT min {lo:.4g}, {air:.0%} of voxels <= {CT_AIR_HU:g} (expected min <= "
                f"{CT_AIR_HU:g} HU and >= {CT_AIR_SHARE:.0%} air): not a CT in HU (a PET given "
                f"as CT, or PET and CT swapped?)")))
    if "ct_offset" in wanted and CT_OFFSET_MIN[0] <= lo <= CT_OFFSET_MIN[1]:
        body = hu[hu > lo + 500]
        median = float(np.median(body)) if body.size else None
        if median is not None and CT_OFFSET_BODY[0] <= median <= CT_OFFSET_BODY[1]:
            findings.append(Finding("ct_offset", (
                f"CT min {lo:.4g} HU and body median {median:.4g} HU (soft tissue is about 0): "
                f"the -1024 HU offset (scl_inter) looks missing")))
    if "ct_saturated" in wanted:
        limits = []  # (share of voxels at a clip limit that counts, HU it means, limit's name)
        if raw.dtype.kind in "iu":
            info = np.iinfo(raw.dtype)
            for end in (info.max, info.min):
                meaning = end * image.slope + image.inter
                if end == info.max or meaning > CT_AIR_STORED_HU:
                    limits.append((float(np.mean(sample == end)), meaning,
                                   f"stored {end}, the limit of {raw.dtype.name}"))
        else:
            limits.append((float(np.mean(hu == INT16_MAX)), INT16_MAX, "the int16 limit"))
        for share, meaning, limit in limits:
            if share > CT_SATURATED_SHARE:
                findings.append(Finding("ct_saturated", (
                    f"{share:.1%} of CT voxels sit at {meaning:.6g} HU ({limit}): clipped, a "
                    f"wrong scl_slope?")))
    return findings


def pet_values(image, raw: np.ndarray, levels: dict[str, str] | None) -> list[Finding]:
    levels = levels or default_levels()
    if levels["pet_range"] == "off":
        return []
    lo, _ = _scaled_range(image, raw)
    if lo > PET_NEGATIVE:
        return []
    values = _sample(raw).astype(np.float64) * image.slope + image.inter
    share = float(np.mean(values <= PET_NEGATIVE))
    if share < PET_NEGATIVE_SHARE:
        return []
    return [Finding("pet_range", (
        f"PET min {lo:.4g}, {share:.0%} of voxels <= {PET_NEGATIVE:g}: PET is never this "
        f"negative; this looks like a CT in HU (PET and CT swapped?)"))]


def duplicates(specs: Sequence, committed: Iterable[dict], hash_file: Callable[[str], str],
               threads: int = 4) -> dict[str, tuple[str, str]]:
    """{case id: (message, PET path)} for the specs whose PET content (sha256) belongs to
    another id: a committed case, or an earlier spec of this run (which keeps it).

    PET files are hashed here, in parallel threads (hashlib releases the GIL); a file that
    cannot be read is left to the case's own harmonization to report.
    """
    owner: dict[str, tuple[str, str]] = {}
    for rec in committed:
        digest = (rec.get("source_sha256") or {}).get("pet")
        if digest:
            owner.setdefault(digest, (rec["id"], "already in the store"))

    def digest_of(path: str) -> str | None:
        try:
            return hash_file(path)
        except OSError:
            return None

    with cf.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        digests = list(pool.map(digest_of, [s.pet for s in specs]))
    found = {}
    for spec, digest in zip(specs, digests):
        if digest is None:
            continue
        first = owner.get(digest)
        if first is not None and first[0] != spec.id:
            found[spec.id] = (f"PET has the same content (sha256 {digest[:12]}...) as case "
                              f"{first[0]!r} ({first[1]}): one scan under two ids", spec.pet)
        else:
            owner.setdefault(digest, (spec.id, "earlier in this run"))
    return found


def _disc(radius_yx: Sequence[float]) -> np.ndarray:
    """A (1, ny, nx) in-plane elliptic disc of the given radii in voxels."""
    ry, rx = (max(0, int(r)) for r in radius_yx)
    y, x = np.ogrid[-ry:ry + 1, -rx:rx + 1]
    disc = (y / max(ry, 0.5)) ** 2 + (x / max(rx, 0.5)) ** 2 <= 1.0
    return disc[None]


def _body(mask: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
    """The body in a thresholded volume: holes filled slice by slice along axis 0 (lungs,
    bowel gas and the airway reach the field of view's ends, so a 3-D fill leaves them
    out; in an axial slice the body encloses them), opened in-plane by a disc of
    BODY_OPEN_MM radius (the scanner table, 5-15 mm thick and often touching the back
    after resampling, goes), then the largest 26-connected component."""
    in_slice = np.zeros((3, 3, 3), bool)
    in_slice[1] = True
    # Foreground slices above and below: the first and last slices are then not all
    # "border" for the fill (their background reaches outside only through y and x).
    padded = np.pad(mask, ((1, 1), (0, 0), (0, 0)), constant_values=True)
    filled = ndi.binary_fill_holes(padded, structure=in_slice)[1:-1]
    opened = ndi.binary_opening(filled, structure=_disc([BODY_OPEN_MM / float(s) for s in spacing_zyx[1:]]))
    labels, count = ndi.label(opened, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return opened
    sizes = np.bincount(labels.reshape(-1), minlength=count + 1)
    return labels == int(np.argmax(sizes[1:])) + 1


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut of a histogram that maximizes the between-class variance."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m[-1] * w0 - m * w0[-1]) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def body_overlap(pet: np.ndarray, ct: np.ndarray, spacing_zyx: Sequence[float],
                 views: Sequence[tuple[np.ndarray, Sequence[int]]] = ()) -> tuple[float, float]:
    """(Dice of the PET and CT body masks, the PET threshold used) on one shared grid.

    CT body: voxels above BODY_CT_HU = -500 HU (as the body crop), then `_body`. PET body:
    -500 HU lies half way from air to soft tissue, so the PET's edge is at half its tissue
    level: voxels above BODY_PET_FRACTION = 0.5 x the median PET of a rough body (the voxels
    above an Otsu threshold on log10 of the PET, values below BODY_PET_FLOOR x its maximum
    counted as that floor: in SUV or Bq/mL the log histogram has an air mode and a tissue
    mode), then the same `_body` (a hot spot outside the body goes with the smaller
    components).
    `views`: per source image, (4x4 map from this grid's (z, y, x) index to the image's
    voxel index, the image's shape); the Dice counts only voxels within every image's
    voxel centres (a PET wider than its CT sees arms the CT never imaged, and beyond the
    outermost centres resampling blends in fill values). Arrays with more than SAMPLE_VOXELS
    voxels are compared on an even stride (every n-th voxel per axis).
    """
    step = max(1, math.ceil((pet.size / SAMPLE_VOXELS) ** (1 / 3)))
    sub = (slice(None, None, step),) * 3
    pet = np.asarray(pet[sub], dtype=np.float32)
    spacing = [float(v) * step for v in spacing_zyx]
    ct_body = _body(np.asarray(ct[sub]) > BODY_CT_HU, spacing)
    top = float(pet.max())
    if not top > 0:
        return 0.0, float("nan")
    logs = np.log10(np.maximum(pet, BODY_PET_FLOOR * top))
    rough = pet > 10.0 ** _otsu(logs)
    threshold = BODY_PET_FRACTION * float(np.median(pet[rough]))
    pet_body = _body(pet > threshold, spacing)
    if views:
        idx = np.stack(np.meshgrid(*[np.arange(0, n, step) for n in ct.shape], indexing="ij"), -1)
        view = np.ones(ct_body.shape, bool)
        for to_voxel, shape in views:
            v = idx @ np.asarray(to_voxel)[:3, :3].T + np.asarray(to_voxel)[:3, 3]
            view &= np.all((v >= -1e-3) & (v <= np.asarray(shape) - 1 + 1e-3), axis=-1)
        ct_body, pet_body = ct_body & view, pet_body & view
    total = int(ct_body.sum()) + int(pet_body.sum())
    dice = 2.0 * int((ct_body & pet_body).sum()) / total if total else 0.0
    return dice, threshold


def body_masks(pet: np.ndarray, ct: np.ndarray, spacing_zyx: Sequence[float], pet_path: str,
               ct_path: str, levels: dict[str, str] | None,
               views: Sequence[tuple[np.ndarray, Sequence[int]]] = ()) -> list[Finding]:
    """body_masks: the PET and CT bodies must coincide on their shared (harmonized) grid.

    A PET of one patient with the CT of another, or PET and CT swapped, gives bodies that
    do not: refused when the Dice of the two masks (body_overlap) is below BODY_MIN_DICE
    = 0.80. Measured on the phantoms (petct_jax.phantoms), inside both fields of view:
    a scan's own PET and CT 0.87-0.96 (14 tiny patients: seed 0's first 8 and one of each
    seed 0-5, 4x3x3 mm grid) and 0.89-0.98 (6 small ones, seed 0, 3x2x2 mm); swapped 0.01-
    0.06. PET of one phantom patient with the CT of another: 0.66-0.89 (86 tiny pairs) and
    0.70-0.88 (30 small pairs): the phantoms share one body template at nearly one place,
    so another patient of a similar build lying where this one lay can pass. Refused are
    bodies elsewhere or of another build: another patient's CT moved 4 cm 0.24-0.51, 40%
    wider 0.53-0.76 (tests/test_predict_plausibility.py); 25% wider does not always fail.
    """
    levels = levels or default_levels(PREDICT_CHECKS)
    if levels.get("body_masks", "off") == "off":
        return []
    dice, threshold = body_overlap(pet, ct, spacing_zyx, views)
    if dice >= BODY_MIN_DICE:
        return []
    return [Finding("body_masks", (
        f"the body in PET {pet_path} (above {threshold:.3g}) and in CT {ct_path} (above "
        f"{BODY_CT_HU:g} HU) overlap by Dice {dice:.2f} (expected >= {BODY_MIN_DICE:g}): not "
        f"the same scan (PET of one patient with the CT of another, or PET and CT swapped?)"))]
