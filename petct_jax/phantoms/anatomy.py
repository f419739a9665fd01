"""Whole-body anatomy of the phantom, from the top of the head to the thighs.

The anatomy lives in a patient reference frame: millimetres of a reference adult
(about 1.75 m), RAS+ axes (+x = patient's right, +y = anterior, +z = superior), origin at
the vertex on the mid-sagittal plane, so the body extends to negative z. A study maps it to
world coordinates with a per-axis scale (patient size times the size preset's body scale)
plus a translation (patient position on the table): world = ref * scale + shift.

`build_anatomy` turns a patient and a study into an ordered list of painting operations
(shape, tissue label); later operations overwrite earlier ones. Tissue labels map to HU and
SUV through per-study tables (`tissue_tables`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from petct_jax.phantoms.shapes import (Box, Capsule, Column, Custom, Ellipsoid, Field, Intersect,
                                           Shape, Subtract, Union, rotation)

# ---------------------------------------------------------------------------- tissues
TISSUES = ("air", "fat", "muscle", "soft", "bowel", "gas", "lung", "myocardium", "blood", "liver",
           "spleen", "kidney", "renal_pelvis", "bladder", "stomach", "grey_matter", "white_matter",
           "csf", "cortical_bone", "marrow", "disc", "gland", "bowel_hot", "brown_fat", "table",
           "cord")
T = {name: i for i, name in enumerate(TISSUES)}
N_TISSUES = len(TISSUES)
SOFT_TISSUES = tuple(T[n] for n in ("fat", "muscle", "soft", "bowel", "brown_fat"))
BONE = (T["cortical_bone"], T["marrow"])


def tissue_tables(rng: np.random.Generator, contrast: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-study HU and SUV for every tissue label (values vary between patients and scans)."""
    u = rng.uniform
    hu = np.zeros(N_TISSUES, np.float32)
    suv = np.zeros(N_TISSUES, np.float32)

    def s(name, h, v):
        hu[T[name]], suv[T[name]] = h, v

    grey = u(6.0, 10.0)
    myo = u(1.0, 2.5) if rng.random() < 0.4 else u(2.5, 8.0)   # fasting often suppresses it
    liver = u(2.0, 3.0)
    fat_hu = u(-110, -90)
    bowel_hu = u(25, 40)
    s("air", -1000, 0.0)
    s("fat", fat_hu, u(0.3, 0.5))
    s("muscle", u(45, 58), u(0.6, 1.0))
    s("soft", u(30, 45), u(0.8, 1.2))
    s("bowel", bowel_hu, u(0.9, 1.5))
    s("gas", u(-1000, -950), 0.0)
    s("lung", u(-870, -830), u(0.3, 0.5))
    s("myocardium", u(100, 125) if contrast else u(40, 50), myo)
    s("blood", u(150, 230) if contrast else u(35, 45), u(1.4, 2.1))
    s("liver", u(95, 115) if contrast else u(55, 65), liver)
    s("spleen", u(110, 130) if contrast else u(44, 52), liver * u(0.7, 0.95))
    s("kidney", u(150, 200) if contrast else u(30, 38), u(2.0, 4.0))
    s("renal_pelvis", u(5, 15), u(5.0, 30.0))
    s("bladder", u(3, 15), u(5.0, 50.0))
    s("stomach", u(10, 25), u(1.0, 2.0))
    s("grey_matter", u(35, 42), grey)
    s("white_matter", u(26, 32), grey * u(0.3, 0.4))
    s("csf", u(3, 12), 0.2)
    s("cortical_bone", u(800, 1150), 0.5)
    s("marrow", u(180, 300), u(1.0, 1.8))
    s("disc", u(70, 90), 0.5)
    s("gland", u(70, 90) if contrast else u(40, 50), u(1.5, 3.5))
    s("bowel_hot", bowel_hu, u(2.5, 6.0))
    s("brown_fat", fat_hu + 15, u(2.0, 6.0))
    s("table", u(-250, -100), 0.0)
    s("cord", u(25, 35), u(0.8, 1.2))
    return hu, suv


# ---------------------------------------------------------------------------- patient
@dataclass
class Patient:
    """Anatomy parameters of one patient (shared by all the patient's studies)."""

    scale_xyz: np.ndarray          # patient size relative to the reference adult (x, y, z)
    fat: float                     # subcutaneous fat thickness, reference mm
    muscle: float                  # body-wall muscle thickness
    visceral: float                # share of visceral fat in the abdomen, 0..1
    liver_scale: float
    spleen_scale: float
    heart_rot: tuple[float, float, float]
    kidney_dz: tuple[float, float]
    lung_scale: float
    vessel_seed: int
    weight_kg: float

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Patient:
        height = rng.normal(1.0, 0.05)
        girth = float(np.clip(rng.normal(1.0, 0.06), 0.88, 1.15))
        scale = np.clip(np.array([girth, girth * rng.normal(1.0, 0.03), height]), 0.85, 1.18)
        fat = float(np.clip(rng.lognormal(np.log(16.0), 0.45), 5.0, 45.0))
        weight = 72.0 * scale[2] * scale[0] * scale[1] * (1 + (fat - 16.0) / 60.0)
        return cls(scale_xyz=scale, fat=fat, muscle=float(rng.uniform(12, 20)),
                   visceral=float(np.clip(0.25 + (fat - 10) / 50 + rng.normal(0, 0.08), 0.1, 0.85)),
                   liver_scale=float(rng.uniform(0.9, 1.12)), spleen_scale=float(rng.uniform(0.8, 1.25)),
                   heart_rot=(float(rng.uniform(-15, 5)), float(rng.uniform(-25, -10)),
                              float(rng.uniform(15, 35))),
                   kidney_dz=(float(rng.uniform(-10, 10)), float(rng.uniform(-25, 0))),
                   lung_scale=float(rng.uniform(0.92, 1.08)), vessel_seed=int(rng.integers(2**31)),
                   weight_kg=float(np.clip(weight * rng.normal(1.0, 0.05), 42.0, 140.0)))


@dataclass
class StudyAnatomy:
    """What changes between two scans of the same patient."""

    arms: str                      # "down" (by the side) or "up" (above the head)
    bladder_radius: float          # reference mm (filling)
    bowel_field: Field
    gas_field: Field
    hot_bowel: list[tuple[np.ndarray, np.ndarray]]   # physiological bowel uptake blobs
    brown_fat: bool

    @classmethod
    def draw(cls, rng: np.random.Generator) -> StudyAnatomy:
        hot = []
        for _ in range(int(rng.integers(0, 4))):
            c = np.array([rng.uniform(-110, 110), rng.uniform(-20, 70), rng.uniform(-860, -620)])
            hot.append((c, rng.uniform(8, 20, size=3)))
        return cls(arms="up" if rng.random() < 0.45 else "down",
                   bladder_radius=float(rng.uniform(22, 48)),
                   bowel_field=Field(rng, 10, (25.0, 70.0)), gas_field=Field(rng, 8, (20.0, 45.0)),
                   hot_bowel=hot, brown_fat=bool(rng.random() < 0.12))


@dataclass
class Anatomy:
    """Ordered painting operations plus named shapes (lesion sites, landmarks)."""

    ops: list[tuple[Shape, object, tuple[int, ...] | None]] = field(default_factory=list)
    named: dict[str, Shape] = field(default_factory=dict)
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)

    def add(self, shape: Shape, label, only: tuple[int, ...] | None = None, name: str | None = None):
        """Paint `label` (a tissue id, or a function of (x, y, z) giving ids) inside `shape`,
        only over voxels currently labelled one of `only` when given."""
        self.ops.append((shape, label, only))
        if name:
            self.named[name] = shape
        return shape

    def labels_at(self, pts: np.ndarray) -> np.ndarray:
        """Tissue label at reference-frame points (N, 3)."""
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float32))
        x, y, z = pts[:, 0], pts[:, 1], pts[:, 2]
        out = np.zeros(len(pts), np.uint8)
        for shape, label, only in self.ops:
            m = shape.inside(x, y, z)
            if only is not None:
                m = m & np.isin(out, only)
            if not np.any(m):
                continue
            out[m] = label(x, y, z)[m] if callable(label) else label
        return out


# ---------------------------------------------------------------------------- the body
# Torso knots (reference adult, lean = without subcutaneous fat): z, semi-x, semi-y, centre-y,
# and the share of the patient's fat thickness found at that level.
_TORSO = np.array([
    # z      ax     ay    cy   fat
    [-262.0, 62.0, 50.0, -5.0, 0.4],
    [-284.0, 150.0, 84.0, -4.0, 0.6],
    [-320.0, 163.0, 100.0, 0.0, 0.7],
    [-420.0, 156.0, 108.0, 0.0, 0.8],
    [-520.0, 148.0, 108.0, 0.0, 1.0],
    [-620.0, 140.0, 104.0, 2.0, 1.3],
    [-760.0, 150.0, 104.0, 2.0, 1.3],
    [-860.0, 160.0, 100.0, 0.0, 1.1],
    [-940.0, 150.0, 92.0, 5.0, 0.9],
    [-956.0, 100.0, 58.0, 5.0, 0.7],
])
# Spine knots: z, vertebral body centre y, semi-x, semi-y.
_SPINE = np.array([
    [-175.0, -18.0, 12.0, 10.0],
    [-290.0, -28.0, 15.0, 12.0],
    [-330.0, -62.0, 17.0, 14.0],
    [-560.0, -58.0, 21.0, 17.0],
    [-700.0, -40.0, 25.0, 19.0],
    [-790.0, -48.0, 26.0, 19.0],
    [-810.0, -62.0, 40.0, 16.0],
    [-880.0, -78.0, 30.0, 12.0],
])
# Vertebra boundaries: 7 cervical, 12 thoracic, 5 lumbar, then the sacrum (one block).
_VERTEBRA_Z = np.concatenate([np.linspace(-175, -290, 8), np.linspace(-290, -565, 13)[1:],
                              np.linspace(-565, -795, 6)[1:]])
_DISC_HALF = np.interp(_VERTEBRA_Z, [-290, -565, -795], [1.6, 2.5, 4.5])


def spine_y(z) -> np.ndarray:
    return np.interp(z, _SPINE[:, 0][::-1], _SPINE[:, 1][::-1])


def torso_section(z, fat: float = 0.0):
    """Lean torso semi-axes / centre at z (plus `fat` times the local fat share)."""
    zk = _TORSO[::-1, 0]
    ax = np.interp(z, zk, _TORSO[::-1, 1])
    ay = np.interp(z, zk, _TORSO[::-1, 2])
    cy = np.interp(z, zk, _TORSO[::-1, 3])
    share = np.interp(z, zk, _TORSO[::-1, 4])
    return ax + fat * share, ay + fat * share, cy


def _disc_mask(z) -> np.ndarray:
    """True at intervertebral disc levels (a test on z alone, so it stays cheap)."""
    z = np.asarray(z)
    zf = z.reshape(-1)
    j = np.searchsorted(-_VERTEBRA_Z, -zf).clip(1, len(_VERTEBRA_Z) - 1)
    d = np.minimum(np.abs(zf - _VERTEBRA_Z[j - 1]), np.abs(zf - _VERTEBRA_Z[j]))
    half = np.maximum(_DISC_HALF[j - 1], _DISC_HALF[j])
    return ((d <= half) & (zf > -800)).reshape(z.shape)


def build_anatomy(pt: Patient, st: StudyAnatomy) -> Anatomy:
    an = Anatomy()
    fat, mus = pt.fat, pt.muscle
    zt = _TORSO[:, 0]
    ax, ay, cy = _TORSO[:, 1], _TORSO[:, 2], _TORSO[:, 3]
    share = _TORSO[:, 4]
    zeros = np.zeros_like(zt)

    torso_out = Column(zt, zeros, cy, ax + fat * share, ay + fat * share)
    torso_lean = Column(zt, zeros, cy, ax, ay)
    torso_in = Column(zt, zeros, cy, ax - mus, ay - mus)
    neck_z = [-305.0, -250.0, -190.0]
    neck_out = Column(neck_z, [0, 0, 0], [-6, -4, 0], [52 + 0.4 * fat, 48 + 0.4 * fat, 50],
                      [54 + 0.4 * fat, 52 + 0.4 * fat, 56])
    neck_lean = Column(neck_z, [0, 0, 0], [-6, -4, 0], [52, 48, 46], [54, 52, 52])
    head_out = Ellipsoid([0, 5, -110], [78, 98, 114])
    head_lean = Ellipsoid([0, 5, -110], [74, 94, 110])

    thighs_out, thighs_lean = [], []
    tz = [-1330.0, -1100.0, -940.0, -875.0]
    for side in (1, -1):
        tcx = [side * 80.0, side * 86.0, side * 90.0, side * 86.0]
        tcy = [8.0, 5.0, 2.0, 0.0]
        tax, tay = np.array([54.0, 62.0, 68.0, 58.0]), np.array([56.0, 64.0, 70.0, 62.0])
        thighs_out.append(Column(tz, tcx, tcy, tax + 0.9 * fat, tay + 0.9 * fat))
        thighs_lean.append(Column(tz, tcx, tcy, tax, tay))

    # arms: capsules, with a shoulder cap joining them to the torso
    arm_r = 40.0
    arm_fat = 0.6 * fat
    arms_out, arms_lean, arm_bones = [], [], []
    for side in (1, -1):
        if st.arms == "down":
            xa = 163 + 0.75 * fat + arm_r + arm_fat + 6
            segs = [((side * 118, -5, -292), (side * xa, -8, -335), arm_r),
                    ((side * xa, -8, -335), (side * xa, -2, -600), arm_r, 0.85 * arm_r),
                    ((side * xa, -2, -600), (side * (xa - 8), 8, -850), 0.85 * arm_r, 0.62 * arm_r),
                    ((side * (xa - 8), 8, -860), (side * (xa - 10), 14, -930), 0.6 * arm_r, 0.5 * arm_r)]
            bones = [((side * xa, -8, -345), (side * xa, -2, -590), 11.0),
                     ((side * xa, -2, -615), (side * (xa - 8), 8, -845), 8.0)]
        else:
            xa = 78 + 4 + arm_r + arm_fat + 10
            segs = [((side * 118, -5, -290), (side * xa, -5, -250), arm_r),
                    ((side * xa, -5, -250), (side * xa, -8, 20), arm_r, 0.85 * arm_r),
                    ((side * xa, -8, 20), (side * 30, -5, 120), 0.85 * arm_r, 0.62 * arm_r)]
            bones = [((side * xa, -5, -240), (side * xa, -8, 10), 11.0),
                     ((side * xa, -8, 30), (side * 35, -5, 115), 8.0)]
        for seg in segs:
            p0, p1, r0 = seg[0], seg[1], seg[2]
            r1 = seg[3] if len(seg) > 3 else r0
            arms_out.append(Capsule(p0, p1, r0 + arm_fat, r1 + arm_fat))
            arms_lean.append(Capsule(p0, p1, r0, r1))
        arm_bones += bones

    body_out = Union(head_out, neck_out, torso_out, *thighs_out, *arms_out)
    an.named["body"] = body_out
    # 1. subcutaneous fat everywhere in the body, 2. lean tissue, 3. interiors
    an.add(body_out, T["fat"])
    an.add(Union(torso_lean, neck_lean, *thighs_lean, *arms_lean), T["muscle"])
    an.add(head_lean, T["soft"])

    # thorax interior: mediastinal fat; abdomen/pelvis interior: bowel mixed with visceral fat
    diaphragm = -545.0
    an.add(Intersect(torso_in, Box([-400, -400, diaphragm], [400, 400, -300])), T["fat"], name="thorax")
    thr = np.float32(np.sqrt(2) * _erfinv(2 * pt.visceral - 1))
    bowel_f, gas_f = st.bowel_field, st.gas_field

    def bowel_label(x, y, z):
        f = bowel_f(x, y, z)
        lab = np.where(f > thr, np.uint8(T["bowel"]), np.uint8(T["fat"]))
        g = gas_f(x, y, z)
        return np.where((lab == T["bowel"]) & (g > 1.45), np.uint8(T["gas"]), lab)

    abdomen = Intersect(torso_in, Box([-400, -400, -960], [400, 400, diaphragm]))
    an.add(abdomen, bowel_label, name="abdomen")
    an.add(Intersect(neck_lean, Column([-300, -200], [0, 0], [2, 4], [34, 32], [34, 34])), T["soft"])

    # paraspinal, psoas and gluteal muscles
    for side in (1, -1):
        an.add(Column([-830, -700, -560, -300], [side * 38] * 4,
                      [-78, -68, -90, -90], [22, 26, 24, 20], [22, 24, 22, 18]), T["muscle"])
        an.add(Capsule((side * 28, -50, -610), (side * 62, -10, -880), 14, 22), T["muscle"])
        an.add(Intersect(Ellipsoid((side * 80, -70, -885), (62, 42, 75)), torso_lean), T["muscle"])
        an.add(Ellipsoid((side * 45, 10, -172), (12, 14, 18)), T["gland"])     # parotids
        an.add(Ellipsoid((side * 16, 24, -268), (9, 8, 17)), T["gland"])       # thyroid lobes

    # ---- head
    skull_out = Ellipsoid([0, 3, -95], [68, 87, 88])
    skull_in = skull_out.grown(-7)
    an.add(Subtract(skull_out, Box([-100, 40, -400], [100, 200, -150])), T["cortical_bone"])
    brain = Intersect(skull_in, Box([-100, -100, -168], [100, 100, 0]))
    an.add(brain, T["grey_matter"], name="brain")
    an.add(Intersect(skull_in.scaled(0.82), brain), T["white_matter"])
    an.add(Intersect(Ellipsoid([0, -48, -150], [44, 28, 20]), skull_in), T["grey_matter"])
    for side in (1, -1):
        an.add(Ellipsoid((side * 20, 8, -80), (11, 17, 14)), T["grey_matter"])   # basal ganglia
        an.add(Ellipsoid((side * 9, -2, -70), (5, 24, 10)), T["csf"])            # ventricles
        an.add(Ellipsoid((side * 32, 72, -118), (12, 12, 12)), T["csf"])        # eyes
        an.add(Ellipsoid((side * 26, 50, -150), (13, 15, 15)), T["air"])        # maxillary sinus
    an.add(Capsule((0, 20, -195), (0, 12, -405), 9), T["air"], name="trachea")

    # ---- thorax
    heart = Ellipsoid([-22, 30, -490], [56, 46, 62], rotation(*pt.heart_rot))
    an.named["heart"] = heart
    liver = Intersect(Ellipsoid([62, 8, -560], np.array([100, 88, 80]) * pt.liver_scale,
                                rotation(0, 8, -10)), torso_in)
    ls = pt.lung_scale
    lungs = []
    for side in (1, -1):
        lung = Subtract(Intersect(Ellipsoid((side * 80, 4, -425), np.array([70, 88, 135]) * ls), torso_in),
                        Box([-20, -400, -560], [20, 400, -250]), heart.grown(4),
                        Ellipsoid([62, 8, -560], np.array([104, 92, 84]) * pt.liver_scale, rotation(0, 8, -10)),
                        Ellipsoid([-55, 20, -590], [60, 50, 60]))
        lungs.append(an.add(lung, T["lung"], name="lung_r" if side > 0 else "lung_l"))
    # pulmonary vessels: tapering tubes from the hila, kept inside the lungs
    vr = np.random.default_rng(pt.vessel_seed)
    for side in (1, -1):
        hilum = np.array([side * 38.0, 2.0, -440.0])
        for _ in range(10):
            d = vr.normal(size=3) * [0.8, 0.6, 1.0] + [side * 0.9, 0, 0]
            d /= np.linalg.norm(d)
            an.add(Capsule(hilum, hilum + d * vr.uniform(60, 110), 5.0, 1.5), T["blood"], only=(T["lung"],))
    an.add(Subtract(heart, heart.grown(-11)), T["myocardium"])
    an.add(heart.grown(-11), T["blood"])
    aorta = [Capsule((-4, 30, -470), (2, 28, -352), 14), Capsule((2, 28, -352), (-22, -30, -352), 13),
             Capsule((-22, -30, -352), (-16, -4, -785), 12)]
    ivc = Capsule((22, -8, -515), (18, 0, -785), 11)
    iliac = [Capsule((-16, -4, -785), (side * 62, 12, -880), 8) for side in (1, -1)]
    iliac += [Capsule((side * 62, 12, -880), (side * 80, 42, -965), 7) for side in (1, -1)]
    for v in (*aorta, ivc, *iliac):
        an.add(v, T["blood"])
    an.named["aorta"] = Union(*aorta)
    an.landmarks["aorta_bifurcation"] = np.array([-16.0, -4.0, -785.0])
    an.landmarks["iliac_end_r"] = np.array([62.0, 12.0, -880.0])
    an.landmarks["iliac_end_l"] = np.array([-62.0, 12.0, -880.0])

    # ---- abdomen
    an.add(liver, T["liver"], name="liver")
    spleen = Ellipsoid([-92, -42, -565], np.array([32, 45, 58]) * pt.spleen_scale, rotation(0, 0, 25))
    an.add(Intersect(spleen, torso_in), T["spleen"], name="spleen")
    stomach = Intersect(Ellipsoid([-52, 36, -575], [42, 38, 50]), torso_in)
    an.add(stomach, T["stomach"], name="stomach")
    an.add(Intersect(stomach, Box([-200, -200, -552], [200, 200, 0])), T["gas"])
    for side, dz in ((1, pt.kidney_dz[1]), (-1, pt.kidney_dz[0])):
        kid = Ellipsoid((side * 70, -40, -655 + dz), (28, 24, 55), rotation(0, side * -12, side * 15))
        an.add(kid, T["kidney"], name="kidney_r" if side > 0 else "kidney_l")
        an.add(Ellipsoid((side * 58, -34, -655 + dz), (10, 10, 22)), T["renal_pelvis"])
    br = st.bladder_radius
    bladder = Ellipsoid([0, 42, -905 + 0.3 * (br - 35)], [1.15 * br, br, 0.9 * br])
    an.add(bladder, T["bladder"], name="bladder")
    for c, semi in st.hot_bowel:
        an.add(Ellipsoid(c, semi), T["bowel_hot"], only=(T["bowel"],))
    if st.brown_fat:
        for side in (1, -1):
            an.add(Ellipsoid((side * 70, -10, -300), (40, 30, 30)), T["brown_fat"], only=(T["fat"],))

    # ---- skeleton
    spine_ax = Column(_SPINE[:, 0], np.zeros(len(_SPINE)), _SPINE[:, 1], _SPINE[:, 2], _SPINE[:, 3])
    spine_mar = Column(_SPINE[:, 0], np.zeros(len(_SPINE)), _SPINE[:, 1], _SPINE[:, 2] - 5, _SPINE[:, 3] - 5)
    an.add(spine_ax, T["cortical_bone"], name="vertebrae")
    an.add(spine_mar, T["marrow"])
    discs = Custom(spine_ax.lo, spine_ax.hi, lambda x, y, z: _disc_mask(z))
    an.add(Intersect(spine_ax, discs), T["disc"])
    cz = np.array([-175.0, -330.0, -560.0, -800.0])
    ccy = spine_y(cz) - np.interp(cz, _SPINE[::-1, 0], _SPINE[::-1, 3]) - np.array([9, 11, 12, 12])
    canal = Column(cz, np.zeros(4), ccy, [7, 8, 9, 9], [7, 8, 9, 9])
    arch = Column(cz, np.zeros(4), ccy - 2, [14, 15, 17, 18], [13, 14, 16, 16])
    spinous = Column(cz, np.zeros(4), ccy - [22, 26, 28, 28], [4, 5, 6, 6], [12, 15, 16, 16])
    not_disc = Custom(arch.lo - 50, arch.hi + 50, lambda x, y, z: ~_disc_mask(z))
    an.add(Intersect(Union(arch, spinous), not_disc), T["cortical_bone"])
    an.add(canal, T["cord"])

    # ribs: a thin shell just inside the thoracic wall, striped along z (ribs slope down
    # anteriorly), plus sternum, clavicles and scapulae
    def ribs(x, y, z):
        a, b, c = (v.astype(np.float32) for v in torso_section(z, 0.0))
        a, b = a - mus, b - mus
        r = (x / a) ** 2 + ((y - c) / b) ** 2
        shell = (r <= 1.0) & (r >= ((a - 9) / a) ** 2)
        phase = (z + 0.35 * (y + 60)) / 24.0
        stripe = (phase - np.floor(phase)) < 0.38
        return shell & stripe & (z < -300) & (z > -600 + 0.5 * (y + 60))

    an.add(Custom([-200, -150, -620], [200, 150, -295], ribs), T["cortical_bone"], only=SOFT_TISSUES + (T["lung"],))
    an.add(Column([-520, -330], [0, 0], [92, 94], [15, 17], [6, 6]), T["cortical_bone"])
    for side in (1, -1):
        an.add(Capsule((side * 16, 82, -305), (side * 150, -5, -292), 8), T["cortical_bone"])
        an.add(Ellipsoid((side * 96, -84, -385), (42, 7, 68), rotation(0, 0, side * 25)), T["cortical_bone"])

    # pelvis, femurs, arm bones
    for side in (1, -1):
        wing = Ellipsoid((side * 88, -32, -805), (52, 28, 66), rotation(0, side * 15, side * -20))
        an.add(Intersect(Subtract(wing, wing.grown(-8)), Box([-300, -300, -868], [300, 300, -745])),
               T["cortical_bone"], name="ilium_r" if side > 0 else "ilium_l")
        an.add(Intersect(wing.grown(-8), Box([-300, -300, -868], [300, 300, -745]), wing.grown(-3)),
               T["marrow"])
        head = np.array([side * 86.0, 6.0, -898.0])
        an.add(Ellipsoid(head, (30, 30, 30)), T["cortical_bone"])      # acetabulum rim
        an.add(Ellipsoid(head, (24, 24, 24)), T["marrow"])              # femoral head
        an.add(Capsule((side * 60, 52, -915), (side * 8, 58, -920), 10), T["cortical_bone"])    # pubis
        an.add(Capsule((side * 62, -8, -905), (side * 55, -12, -955), 11), T["cortical_bone"])  # ischium
        troch = np.array([side * 118.0, 0.0, -915.0])
        an.add(Capsule(head, troch, 15), T["cortical_bone"])
        shaft = Capsule(troch, (side * 86, 12, -1330), 15)
        an.add(shaft, T["cortical_bone"], name="femur_r" if side > 0 else "femur_l")
        an.add(Capsule(troch, (side * 86, 12, -1330), 9), T["marrow"])
    for p0, p1, r in arm_bones:
        an.add(Capsule(p0, p1, r), T["cortical_bone"])
        an.add(Capsule(p0, p1, 0.55 * r), T["marrow"])
    # organ points for checks downstream (inside the organ for every patient and study)
    an.landmarks.update({
        "brain_white_matter": np.array([0.0, 3.0, -95.0]),
        "lung_r": np.array([85.0, 0.0, -380.0]),
        "lung_l": np.array([-85.0, 0.0, -380.0]),
        "heart": heart.c.copy(),
        "liver": np.array([70.0, 8.0, -560.0]),
        "spleen": spleen.c.copy(),
        "kidney_r": np.array([70.0, -40.0, -655.0 + pt.kidney_dz[1]]),
        "kidney_l": np.array([-70.0, -40.0, -655.0 + pt.kidney_dz[0]]),
        "bladder": bladder.c.copy(),
        "vertebra_L3": np.array([0.0, float(spine_y(-690.0)), -690.0]),
    })
    return an


def body_posterior(pt: Patient) -> float:
    """Most posterior reference y of the torso (where it rests on the table)."""
    z = np.linspace(-940, -300, 65)
    ax, ay, cy = torso_section(z, pt.fat)
    return float((cy - ay).min())


def _erfinv(y: float) -> float:
    """Inverse error function (scalar; scipy-free so the module stays light)."""
    from scipy.special import erfinv
    return float(erfinv(np.clip(y, -0.999, 0.999)))
