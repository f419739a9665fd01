"""Raw PET/CT cohorts on disk -> lists of cases (file paths, ids, patients).

Three layouts are understood; `detect_layout` picks one for `--layout auto`:

* `autopet`: `ROOT/<patient>/<study>/` folders (AutoPET names them `PETCT_<hash>/<date...>`),
  or `ROOT/<patient>/` holding the files directly. File names, first match wins
  (case-insensitive, `.nii.gz` or `.nii`):
    PET: `SUV`, then `PET`.  The AutoPET release ships both `PET` (Bq/mL) and `SUV`;
         the paper's authors renamed SUV to `PET`. Preferring `SUV` is right for both
         layouts; a lone `PET` is taken as SUV, and harmonization records a warning
         when its values look like Bq/mL (see harmonize.py).
    CT:  `CTres`, then `CT_resample`, then `CT`.  CTres (already on the PET grid) is
         what the reference used; the original CT is the fallback. Either way CT is
         resampled through the affines, so both are correct.
    SEG: `SEG`, then `tumorSeg`; none = an unlabelled case (pretraining data).
  Case id `<patient>_<study>` (sanitized), patient id `<patient>`.
* `nnunet`: `ROOT/dataset.json` (`channel_names` such as {"0": "CT", "1": "PET"}: a name
  containing "PET" or "SUV" is the PET channel, one containing "CT" the CT channel;
  `file_ending`, default `.nii.gz`), `imagesTr/<case>_<XXXX><ending>` with labels in
  `labelsTr/<case><ending>` (optional), and `imagesTs/` likewise (labels from
  `labelsTs/` if present). Case id = case name; patient id = the case name minus a
  trailing `_<digits>` study suffix, or the group `patient` (else group 1) of
  `--patient-regex`.
* `csv`: a CSV file with columns `subject_id`, `pet_path`, `ct_path`, and optionally
  `scan_id` and `seg_path` (the reference split file has these; other columns such as
  `index` or `split` are ignored). Relative paths are relative to the CSV's folder; an
  empty `seg_path` means unlabelled. Case id `<subject_id>_<scan_id>`, patient id
  `subject_id`.

Problems found while listing (a missing modality, a duplicate id) do not stop the
listing: the case carries an `error`, and the driver records it as a failure.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import sys
import unicodedata
from collections import Counter
from typing import Iterable

from petct_jax.errors import PetctError

LAYOUTS = ("autopet", "nnunet", "csv")
NIFTI_ENDINGS = (".nii.gz", ".nii")
AUTOPET_PET = ("SUV", "PET")
AUTOPET_CT = ("CTres", "CT_resample", "CT")
AUTOPET_SEG = ("SEG", "tumorSeg")
DEFAULT_PATIENT_REGEX = r"^(?P<patient>.+?)_\d+$"


@dataclasses.dataclass(frozen=True)
class CaseSpec:
    """One scan to harmonize: where its files are and what to call it."""

    id: str
    patient_id: str
    cohort: str
    pet: str | None
    ct: str | None
    seg: str | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None  # set when the case cannot be processed (e.g. missing PET)
    error_file: str | None = None


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip()).strip("._-")


def sanitize_id(text: str) -> str:
    """A file-name-safe id: runs of characters outside [A-Za-z0-9._-] become '_'.

    Leading dots and separators are dropped, so an id never names a hidden folder
    (the store stages writes in `.<id>.partial`). A name with characters outside ASCII
    ('患者', 'ÄÖÜ_0001') keeps the ASCII forms Unicode has for its letters and gets a hash
    of the whole name ('id_9db4a3b3', 'AOU_0001_5c1e...'), as does a name with nothing left
    ('...'): every name has an id, the same for the same name and different for different
    names, so such a folder neither stops its cohort nor collides with another ('患者_0001'
    and '病人_0001' would both be '0001' otherwise).
    """
    out = _safe(text)
    if out and text.isascii():
        return out
    letters = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    digest = hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{_safe(letters.encode('ascii', 'replace').decode()) or 'id'}_{digest}"


def _nifti_files(folder: str) -> dict[str, str]:
    """Map lower-case stem (name without .nii/.nii.gz) -> path for the NIfTI files of a folder."""
    found: dict[str, str] = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found
    for name in names:
        for ending in NIFTI_ENDINGS:
            if name.lower().endswith(ending) and os.path.isfile(os.path.join(folder, name)):
                found.setdefault(name[: -len(ending)].lower(), os.path.join(folder, name))
                break
    return found


def _pick(files: dict[str, str], names: Iterable[str]) -> str | None:
    for name in names:
        if name.lower() in files:
            return files[name.lower()]
    return None


_AUTOPET_NAMES = {n.lower() for n in (*AUTOPET_PET, *AUTOPET_CT, *AUTOPET_SEG)}


def _is_study_dir(folder: str) -> bool:
    return bool(_AUTOPET_NAMES & set(_nifti_files(folder)))


def _subdirs(folder: str) -> list[str]:
    try:
        return sorted(os.path.join(folder, d) for d in os.listdir(folder)
                      if not d.startswith(".") and os.path.isdir(os.path.join(folder, d)))
    except OSError:
        return []


def detect_layout(path: str) -> str:
    """Which layout `path` is in; PetctError naming what was expected if none."""
    if os.path.isfile(path):
        if path.lower().endswith((".csv", ".tsv")):
            return "csv"
        raise PetctError(f"{path}: a file input must be a .csv case list")
    if not os.path.isdir(path):
        raise PetctError(f"{path}: no such file or folder")
    if os.path.isfile(os.path.join(path, "dataset.json")):
        return "nnunet"
    if _is_study_dir(path) or any(_is_study_dir(d) or any(_is_study_dir(s) for s in _subdirs(d))
                                  for d in _subdirs(path)):
        return "autopet"
    raise PetctError(f"{path}: cannot tell the layout: expected a .csv file, an nnU-Net folder "
                     f"(dataset.json, imagesTr/) or AutoPET study folders "
                     f"(<patient>/<study>/SUV.nii.gz, CTres.nii.gz, SEG.nii.gz)")


# ---------------------------------------------------------------------------
# AutoPET

def _autopet_case(folder: str, patient: str, study: str | None, cohort: str) -> CaseSpec:
    files = _nifti_files(folder)
    pet, ct, seg = _pick(files, AUTOPET_PET), _pick(files, AUTOPET_CT), _pick(files, AUTOPET_SEG)
    case_id = sanitize_id(f"{patient}_{study}" if study else patient)
    warnings = []
    if pet is not None and _pick(files, ("SUV",)) is None:
        warnings.append(f"PET taken from {os.path.basename(pet)} as SUV (no SUV.nii.gz)")
    error = None
    if pet is None or ct is None:
        missing = " and ".join(m for m, f in (("PET", pet), ("CT", ct)) if f is None)
        names = {"PET": AUTOPET_PET, "CT": AUTOPET_CT}
        expected = "; ".join(f"{m}: " + "/".join(f"{n}.nii.gz" for n in names[m])
                             for m in ("PET", "CT") if m in missing)
        error = f"missing {missing} (expected {expected})"
    return CaseSpec(id=case_id, patient_id=sanitize_id(patient), cohort=cohort, pet=pet, ct=ct,
                    seg=seg, warnings=tuple(warnings), error=error,
                    error_file=folder if error else None)


def list_autopet(root: str, cohort: str) -> list[CaseSpec]:
    root = os.path.abspath(root)
    if _is_study_dir(root):  # a single study folder
        return [_autopet_case(root, os.path.basename(root), None, cohort)]
    cases = []
    for patient_dir in _subdirs(root):
        patient = os.path.basename(patient_dir)
        if _is_study_dir(patient_dir):
            cases.append(_autopet_case(patient_dir, patient, None, cohort))
        for study_dir in _subdirs(patient_dir):
            if _is_study_dir(study_dir):
                cases.append(_autopet_case(study_dir, patient, os.path.basename(study_dir), cohort))
    return cases


# ---------------------------------------------------------------------------
# nnU-Net raw

def channel_roles(channel_names: dict) -> dict[str, str]:
    """{"pet": "0001", "ct": "0000"} from dataset.json's channel_names."""
    roles: dict[str, str] = {}
    for key, name in channel_names.items():
        lower = str(name).lower()
        role = "pet" if ("pet" in lower or "suv" in lower) else "ct" if "ct" in lower else None
        if role is None:
            continue
        if role in roles:
            raise PetctError(f"dataset.json: two channels look like {role.upper()}: {channel_names}")
        roles[role] = f"{int(key):04d}"
    for role in ("pet", "ct"):
        if role not in roles:
            raise PetctError(f"dataset.json: no {role.upper()} channel in channel_names "
                             f"{channel_names} (a name containing 'PET'/'SUV' and one containing 'CT')")
    return roles


def patient_from_case(case: str, patient_regex: str | None = None) -> str:
    m = re.match(patient_regex or DEFAULT_PATIENT_REGEX, case)
    if not m:
        return case
    if "patient" in m.groupdict():
        return m.group("patient")
    return m.group(1) if m.groups() else m.group(0)


def list_nnunet(root: str, cohort: str, patient_regex: str | None = None) -> list[CaseSpec]:
    root = os.path.abspath(root)
    path = os.path.join(root, "dataset.json")
    try:
        with open(path, encoding="utf-8") as f:
            dataset = json.load(f)
        roles = channel_roles(dataset["channel_names"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise PetctError(f"{path}: not a readable nnU-Net dataset.json ({e})") from None
    ending = dataset.get("file_ending", ".nii.gz")
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", "labelsTs")):
        image_dir, label_dir = os.path.join(root, images), os.path.join(root, labels)
        if not os.path.isdir(image_dir):
            continue
        channels: dict[str, dict[str, str]] = {}
        for name in sorted(os.listdir(image_dir)):
            m = pattern.match(name)
            if m:
                channels.setdefault(m["case"], {})[m["channel"]] = os.path.join(image_dir, name)
        for case, files in channels.items():
            pet, ct = files.get(roles["pet"]), files.get(roles["ct"])
            seg = os.path.join(label_dir, case + ending)
            seg = seg if os.path.isfile(seg) else None
            warnings = ()
            if seg is None and os.path.isdir(label_dir):
                warnings = (f"no label {labels}/{case}{ending}; stored as unlabelled",)
            error = None
            if pet is None or ct is None:
                missing = [f"{m} ({images}/{case}_{roles[m.lower()]}{ending})"
                           for m, f in (("PET", pet), ("CT", ct)) if f is None]
                error = "missing " + " and ".join(missing)
            cases.append(CaseSpec(
                id=sanitize_id(case), patient_id=sanitize_id(patient_from_case(case, patient_regex)),
                cohort=cohort, pet=pet, ct=ct, seg=seg, warnings=warnings, error=error,
                error_file=image_dir if error else None))
    if patient_regex is None and len(cases) > 1 and len({c.patient_id for c in cases}) == 1:
        print(f"petct preprocess: warning: all {len(cases)} cases of {root} map to patient "
              f"{cases[0].patient_id!r}; pass --patient-regex if that is wrong", file=sys.stderr)
    return cases


# ---------------------------------------------------------------------------
# CSV

def list_csv(path: str, cohort: str) -> list[CaseSpec]:
    path = os.path.abspath(path)
    base = os.path.dirname(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            sample = f.read(4096)
            f.seek(0)
            dialect = csv.Sniffer().sniff(sample, delimiters=",;\t") if sample else csv.excel
            rows = list(csv.DictReader(f, dialect=dialect))
    except (OSError, csv.Error) as e:
        raise PetctError(f"{path}: cannot read the case list ({e})") from None
    if not rows:
        raise PetctError(f"{path}: the case list has no rows")
    rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in rows]
    missing = [c for c in ("subject_id", "pet_path", "ct_path") if c not in rows[0]]
    if missing:
        raise PetctError(f"{path}: missing column(s) {', '.join(missing)}; expected subject_id, "
                         f"scan_id, pet_path, ct_path, seg_path (seg_path and scan_id optional)")

    def resolve(p: str) -> str | None:
        return os.path.normpath(os.path.join(base, p)) if p else None

    cases = []
    for n, row in enumerate(rows, 2):  # line 1 is the header
        subject, scan = row["subject_id"], row.get("scan_id", "")
        pet, ct, seg = resolve(row["pet_path"]), resolve(row["ct_path"]), resolve(row.get("seg_path", ""))
        if not subject:
            raise PetctError(f"{path}: line {n}: empty subject_id")
        error = error_file = None
        for role, p in (("PET", pet), ("CT", ct), ("SEG", seg)):
            if role != "SEG" and not p:
                error, error_file = f"line {n}: missing {role} (empty {role.lower()}_path)", path
                break
            if p and not os.path.isfile(p):
                error, error_file = f"missing {role}: no such file", p
                break
        cases.append(CaseSpec(id=sanitize_id(f"{subject}_{scan}" if scan else subject),
                              patient_id=sanitize_id(subject), cohort=cohort, pet=pet, ct=ct,
                              seg=seg, error=error, error_file=error_file))
    return cases


# ---------------------------------------------------------------------------

def default_cohort(path: str) -> str:
    path = os.path.abspath(path)
    name = os.path.basename(path)
    if os.path.isfile(path):
        name = os.path.splitext(name)[0]
    return sanitize_id(name)


def list_cases(path: str, layout: str = "auto", cohort: str | None = None,
               patient_regex: str | None = None, id_prefix: str = "") -> list[CaseSpec]:
    """All cases of a raw cohort, in a stable order; duplicate ids carry an error."""
    if layout == "auto":
        layout = detect_layout(path)
    if layout not in LAYOUTS:
        raise PetctError(f"unknown layout {layout!r}; expected auto or one of {', '.join(LAYOUTS)}")
    if not os.path.exists(path):
        raise PetctError(f"{path}: no such file or folder")
    if patient_regex is not None:
        try:
            re.compile(patient_regex)
        except re.error as e:
            raise PetctError(f"--patient-regex {patient_regex!r}: {e}") from None
    cohort = cohort or default_cohort(path)
    if layout == "autopet":
        cases = list_autopet(path, cohort)
    elif layout == "nnunet":
        cases = list_nnunet(path, cohort, patient_regex)
    else:
        cases = list_csv(path, cohort)
    if not cases:
        raise PetctError(f"{path}: no cases found in the {layout} layout")
    if id_prefix:
        cases = [dataclasses.replace(c, id=sanitize_id(id_prefix + c.id)) for c in cases]
    counts = Counter(c.id for c in cases)
    out = []
    for c in cases:
        if counts[c.id] > 1 and c.error is None:
            others = [o.pet or o.error_file for o in cases if o.id == c.id and o is not c]
            c = dataclasses.replace(c, error=f"duplicate case id (also made from {others[0]})",
                                    error_file=c.pet or c.error_file)
        out.append(c)
    return out
