"""One study: plan it (patient, centre, grids, lesions) and render its PET and CT volumes.

Planning is cheap and fully deterministic from (seed, case index), so a follow-up study can
re-plan its baseline to evolve the same lesions, and a worker process can plan any case on
its own. Rendering evaluates the analytic phantom at the voxel centres of the CT grid and of
the PET grid (both in world mm), then adds the scanner's physics: partial-volume smoothing
and noise for CT; resolution blur (Gaussian, FWHM in mm) and count-dependent noise for PET.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from petct_jax.phantoms.anatomy import (T, Anatomy, Patient, StudyAnatomy, body_posterior, build_anatomy,
                                            tissue_tables)
from petct_jax.phantoms.centres import CENTRE_BY_NAME, CENTRES, Centre, SizePreset
from petct_jax.phantoms.grids import Grid, resample_linear
from petct_jax.phantoms.lesions import SITES, Lesion, draw_lesion, evolve
from petct_jax.phantoms.shapes import Box

F18_HALF_LIFE_MIN = 109.77
P_TWO_STUDIES = 0.13          # AutoPET: 1,014 studies of 900 patients
P_CONTROL = 0.45              # AutoPET: about half of the studies are tumour-free
MAX_LESIONS = 10


# ---------------------------------------------------------------------------- patients
@dataclass
class PatientPlan:
    index: int
    patient_id: str
    n_studies: int
    control: bool
    centre: str
    first_date: dt.date
    anatomy: Patient


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *[int(k) for k in key]]))


def plan_patient(seed: int, index: int) -> PatientPlan:
    rng = _rng(seed, 1, index)
    pid = "PETCT_" + hashlib.sha256(f"petct-phantoms:{seed}:{index}".encode()).hexdigest()[:10]
    n = 2 if rng.random() < P_TWO_STUDIES else 1
    # controls on a golden-ratio sequence: every prefix of the cohort has about P_CONTROL of
    # them (independent draws would give 7 to 15 of 24 patients)
    offset = _rng(seed, 0).random()
    control = bool((offset + index * 0.6180339887498949) % 1.0 < P_CONTROL)
    w = np.array([c.weight for c in CENTRES])
    centre = CENTRES[int(rng.choice(len(CENTRES), p=w / w.sum()))].name
    first = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 11 * 365)))
    return PatientPlan(index, pid, n, control, centre, first, Patient.draw(rng))


def case_table(seed: int, n_cases: int) -> list[tuple[int, int]]:
    """(patient index, study number 1/2) of cases 0..n-1; a prefix of any longer cohort."""
    out: list[tuple[int, int]] = []
    p = 0
    while len(out) < n_cases:
        n = plan_patient(seed, p).n_studies
        for s in range(1, n + 1):
            if len(out) < n_cases:
                out.append((p, s))
        p += 1
    return out


# ---------------------------------------------------------------------------- studies
@dataclass
class StudyPlan:
    seed: int
    case_index: int
    study_number: int
    patient: PatientPlan
    size: SizePreset
    centre: Centre
    date: dt.date
    accession: int
    st: StudyAnatomy
    anatomy: Anatomy
    scale: np.ndarray              # world mm per reference mm, per axis
    shift: np.ndarray              # world position of the reference origin (vertex)
    contrast: bool
    hu: np.ndarray
    suv: np.ndarray
    pet_grid: Grid
    ct_grid: Grid
    lesions: list[Lesion]
    dose_mbq: float
    uptake_min: float
    suv_factor: float              # SUV = PET [Bq/mL] * suv_factor
    pet_noise: float
    table_y: float                 # world y of the table top

    @property
    def case(self) -> str:
        return f"{self.patient.patient_id}_{self.study_number:02d}"

    @property
    def study_id(self) -> str:
        """AutoPET-style study folder name."""
        return f"{self.date:%m-%d-%Y}-NA-PET-CT Ganzkoerper  primaer mit KM-{self.accession:05d}"

    def to_world(self, ref) -> np.ndarray:
        return np.asarray(ref) * self.scale + self.shift


def _min_radius(centre: Centre, size: SizePreset) -> float:
    """Smallest lesion semi-axis: the PET voxel holding the centre must be in the mask."""
    ip, sl = centre.sizes[size.name].pet
    return 0.5 * float(np.sqrt(2 * ip * ip + sl * sl)) + 0.05


def lesion_scale(size: SizePreset) -> float:
    """Lesions shrink less than the body in the small presets, so they stay learnable."""
    return float(np.sqrt(size.body_scale))


def plan_study(seed: int, size: SizePreset, case_index: int, patient_index: int, study_number: int) -> StudyPlan:
    pp = plan_patient(seed, patient_index)
    rng = _rng(seed, 2, case_index)
    if study_number == 1:
        centre, date = CENTRE_BY_NAME[pp.centre], pp.first_date
    else:
        base = plan_study(seed, size, case_index - 1, patient_index, study_number - 1)
        centre = base.centre if rng.random() < 0.85 else CENTRES[int(rng.integers(len(CENTRES)))]
        date = base.date + dt.timedelta(days=int(rng.integers(60, 420)))
    accession = int(rng.integers(10000, 100000))
    st = StudyAnatomy.draw(rng)
    anatomy = build_anatomy(pp.anatomy, st)
    contrast = bool(rng.random() < centre.contrast_p)
    hu, suv = tissue_tables(rng, contrast)
    bs = size.body_scale
    scale = bs * pp.anatomy.scale_xyz
    shift = np.array([rng.uniform(-15, 15), rng.uniform(-25, 10), rng.uniform(-80, 80)]) * bs

    sp = centre.sizes[size.name]
    ip, sl = sp.pet
    top, bottom = shift[2] + rng.uniform(-25, 45) * scale[2], shift[2] + rng.uniform(-1170, -1070) * scale[2]
    h = sp.pet_fov / 2
    pet_grid = Grid.from_box(centre.axcodes, (ip, ip, sl), (-h, -h, bottom), (h, h, top))
    plo, phi = pet_grid.bounds()
    hc = sp.ct_fov / 2
    ct_top = phi[2] - rng.uniform(0.0, 2.5) * sl
    ct_bottom = plo[2] + rng.uniform(-1.5, 2.5) * sl
    ct_grid = Grid.from_box(centre.axcodes, (sp.ct[0], sp.ct[0], sp.ct[1]), (-hc, -hc, ct_bottom), (hc, hc, ct_top))
    clo, chi = ct_grid.bounds()

    def accept(p_ref, radius) -> bool:
        """Lesion fully inside the PET field of view and the CT reconstruction circle."""
        w = p_ref * scale + shift
        m = radius + 2.0
        in_pet = np.all(w - m >= plo) and np.all(w + m <= phi)
        in_ct = (np.hypot(w[0], w[1]) + m <= hc) and (w[2] - m >= clo[2]) and (w[2] + m <= chi[2])
        return bool(in_pet and in_ct)

    rmin = _min_radius(centre, size)
    lesions: list[Lesion] = []
    if study_number > 1:
        lesions = []
        for les in evolve(base.lesions, rng, rmin):
            # the anatomy moved on (bladder filling, arms, field of view): keep a lesion only if
            # it is still in its tissue and in view, and re-read its surroundings
            lab = int(anatomy.labels_at(les.ref_centre[None])[0])
            if lab not in SITES[les.site][1] or not accept(les.ref_centre, float(les.radii.max())):
                continue
            les.suv_background = float(suv[lab])
            les.suv = float(np.clip(max(les.suv, 1.3 * les.suv_background), 2.5, 20.0))
            if les.site == "liver":     # stays hypodense by the same margin, contrast or not
                les.hu = float(hu[T["liver"]] - (base.hu[T["liver"]] - les.hu))
            lesions.append(les)
        n_new = 0 if pp.control else int(rng.poisson(0.7))
        next_id = 1 + max([int(les.id[1:]) for les in base.lesions] + [0])
    else:
        n_new = 0 if pp.control else min(MAX_LESIONS, 1 + int(rng.poisson(2.5)))
        next_id = 1
    tries = 0
    while n_new > 0 and len(lesions) < MAX_LESIONS and tries < 4 * MAX_LESIONS:
        tries += 1
        les = draw_lesion(f"L{next_id}", rng, anatomy, suv, hu, contrast, scale, lesion_scale(size), rmin,
                          accept)
        if les is None:
            continue
        lesions.append(les)
        next_id += 1
        n_new -= 1
    for les in lesions:
        les.centre = les.ref_centre * scale + shift

    weight = pp.anatomy.weight_kg
    dose = float(np.clip(weight * rng.uniform(3.0, 4.0), 150, 450))
    uptake = float(rng.uniform(55, 75))
    suv_factor = weight * 1000.0 / (dose * 1e6 * 2 ** (-uptake / F18_HALF_LIFE_MIN))
    table_y = float(body_posterior(pp.anatomy) * scale[1] + shift[1] - max(4.0, 2 * sp.ct[0]))
    return StudyPlan(seed, case_index, study_number, pp, size, centre, date, accession, st, anatomy,
                     scale, shift, contrast, hu, suv, pet_grid, ct_grid, lesions, dose, uptake, suv_factor,
                     float(rng.uniform(0.8, 1.25)) * centre.pet_noise, table_y)


# ---------------------------------------------------------------------------- rendering
def _sub(arr: np.ndarray, sl) -> np.ndarray:
    return arr[tuple(s if arr.shape[i] > 1 else slice(None) for i, s in enumerate(sl))]


def _blocks(grid: Grid, shape, scale, shift, coords):
    """Block of `grid` covering `shape` and the shape's coordinates there (its own frame)."""
    lo = shape.lo * scale + shift
    hi = shape.hi * scale + shift
    sl = grid.block(lo, hi)
    if sl is None:
        return None, None
    return sl, tuple(_sub(c, sl) for c in coords)


def paint_labels(plan: StudyPlan, grid: Grid) -> np.ndarray:
    """Tissue label at each voxel centre of `grid`."""
    lab = np.zeros(grid.shape, np.uint8)
    X, Y, Z = grid.coords()
    s, t = plan.scale.astype(np.float32), plan.shift.astype(np.float32)
    ref = ((X - t[0]) / s[0], (Y - t[1]) / s[1], (Z - t[2]) / s[2])
    for shape, label, only in plan.anatomy.ops:
        sl, xyz = _blocks(grid, shape, plan.scale, plan.shift, ref)
        if sl is None:
            continue
        x, y, z = xyz
        view = lab[sl]
        m = np.broadcast_to(shape.inside(x, y, z), view.shape)
        if only is not None:
            m = m & np.isin(view, only)
        if callable(label):
            view[m] = np.broadcast_to(label(x, y, z), view.shape)[m]
        else:
            view[m] = label
    return lab


def _world_masks(grid: Grid, shapes):
    X, Y, Z = grid.coords()
    one, zero = np.ones(3), np.zeros(3)
    for shape in shapes:
        sl, xyz = _blocks(grid, shape, one, zero, (X, Y, Z))
        if sl is None:
            yield None, None
            continue
        shp = tuple(s.stop - s.start for s in sl)
        yield sl, np.broadcast_to(shape.inside(*xyz), shp)


SLAB_VOXELS = 4_000_000      # CT is rendered slab by slab to bound memory on 512x512 grids


@dataclass
class Rendered:
    ct_raw: np.ndarray             # int16 as stored
    ct_scaling: tuple[float, float]
    ctres: np.ndarray              # float32 HU on the PET grid, -1024 outside the CT FOV
    pet_raw: np.ndarray            # float32 Bq/mL, or int16 scaled by pet_scaling
    pet_scaling: tuple[float, float]
    suv: np.ndarray                # float32
    seg: np.ndarray                # uint8
    lesion_stats: list[dict]

    @property
    def ct_hu(self) -> np.ndarray:
        """CT in HU, as a reader's get_fdata() returns it (float32)."""
        return self.ct_raw.astype(np.float32) * np.float32(self.ct_scaling[0]) + np.float32(self.ct_scaling[1])


def _paint_values(out: np.ndarray, grid: Grid, shapes, values) -> list:
    """Paint world-frame shapes with constant values; returns (slices, mask) per shape."""
    masks = []
    for (sl, m), v in zip(_world_masks(grid, shapes), values):
        masks.append((sl, m))
        if sl is not None and v is not None:
            out[sl][m] = v
    return masks


def render_ct(plan: StudyPlan, noise: np.random.Generator) -> tuple[np.ndarray, tuple[float, float]]:
    """CT on its own grid, stored int16 with the centre's (slope, inter)."""
    c, g = plan.centre, plan.ct_grid
    fov = c.sizes[plan.size.name].ct_fov
    table = Box([-0.42 * fov, plan.table_y - max(6.0, 2 * g.spacing[0]), -1e5], [0.42 * fov, plan.table_y, 1e5])
    lesions = [les.solid() for les in plan.lesions]
    cores = [les.necrotic_core() for les in plan.lesions]
    _, slope, inter = c.ct_storage
    raw = np.empty(g.shape, np.int16)
    for axis, a, b in g.slabs(SLAB_VOXELS):
        sg = g.slab(axis, a, b)
        hu = plan.hu[paint_labels(plan, sg)]
        _paint_values(hu, sg, [table], [plan.hu[T["table"]]])
        _paint_values(hu, sg, lesions, [les.hu for les in plan.lesions])
        _paint_values(hu, sg, cores, [les.hu - 20.0 if les.necrotic else None for les in plan.lesions])
        # in-plane partial volume (slabs stay independent), then white noise
        hu = gaussian_filter(hu, [0.0 if k == axis else 0.5 for k in range(3)], truncate=2.0)
        hu += noise.standard_normal(hu.shape, dtype=np.float32) * np.float32(c.ct_noise)
        X, Y, _ = sg.coords()
        hu[np.broadcast_to(X * X + Y * Y > (fov / 2) ** 2, hu.shape)] = -1024.0   # reconstruction circle
        idx = [slice(None)] * 3
        idx[axis] = slice(a, b)
        raw[tuple(idx)] = np.clip(np.round((hu - inter) / slope), (-1024 - inter) / slope, (3071 - inter) / slope)
    return raw, (float(slope), float(inter))


def render_study(plan: StudyPlan) -> Rendered:
    c = plan.centre
    noise = _rng(plan.seed, 3, plan.case_index)
    ct_raw, ct_scaling = render_ct(plan, noise)

    # ---- PET (and SEG, CTres) on the PET grid
    g = plan.pet_grid
    act = plan.suv[paint_labels(plan, g)]
    seg = np.zeros(g.shape, np.uint8)
    lesion_masks = _paint_values(act, g, [les.solid() for les in plan.lesions], [les.suv for les in plan.lesions])
    _paint_values(seg, g, [les.solid() for les in plan.lesions], [1] * len(plan.lesions))
    _paint_values(act, g, [les.necrotic_core() for les in plan.lesions],
                  [les.core_suv if les.necrotic else None for les in plan.lesions])
    # resolution: Gaussian PSF of the centre's FWHM, sigma in voxels per array axis
    sigma = [c.pet_fwhm / (2 * np.sqrt(2 * np.log(2))) / s for s in g.spacing]
    act = gaussian_filter(act, sigma, mode="nearest", truncate=3.0)
    # count-dependent noise: std proportional to sqrt(signal), spatially correlated as after
    # iterative reconstruction
    n = gaussian_filter(noise.standard_normal(act.shape, dtype=np.float32), 0.7, truncate=2.0)
    n /= max(float(n.std()), 1e-6)
    suv = np.maximum(act + np.float32(plan.pet_noise) * np.sqrt(np.maximum(act, 0)) * n, 0)
    bqml = np.round(suv / plan.suv_factor)
    if c.pet_storage == "int16":
        pslope = float(np.float32(max(bqml.max(), 1.0) / 32000.0))   # as the header stores it
        pet_raw = np.round(bqml / pslope).astype(np.int16)
        bqml = pet_raw.astype(np.float64) * pslope
        pet_scaling = (pslope, 0.0)
    else:
        pet_raw = bqml.astype(np.float32)
        pet_scaling = (1.0, 0.0)
    # SUV on a 1/4096 grid: exact in float32 and compresses well
    suv = (np.round(bqml * plan.suv_factor * 4096.0) / 4096.0).astype(np.float32)
    ctres = np.round(resample_linear(ct_raw, plan.ct_grid, g, fill=-1024.0, scaling=ct_scaling))

    stats = []
    for sl, m in lesion_masks:
        if sl is None or not m.any():
            stats.append({"seg_voxels": 0, "suv_max": None})
        else:
            stats.append({"seg_voxels": int(m.sum()), "suv_max": round(float(suv[sl][m].max()), 4)})
    return Rendered(ct_raw, ct_scaling, ctres.astype(np.float32), pet_raw, pet_scaling, suv, seg, stats)
