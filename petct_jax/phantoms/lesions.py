"""FDG-avid lesions: where they go, how they look in PET and CT, how they evolve.

Sites follow the usual lymphoma / lung cancer / melanoma patterns of AutoPET: lymph-node
stations (cervical, axillary, mediastinal, para-aortic, iliac, inguinal), lung, liver and
bone, plus deliberately hard placements next to physiological hot spots (bladder, renal
pelvis, heart). Every lesion has a CT signature (soft tissue in fat or lung, hypodense in
liver, lytic or sclerotic in bone), and some are low-contrast in PET, so that PET alone is
not enough. Positions are drawn in the patient reference frame (so a follow-up scan finds
them at the same anatomical place); sizes are in world mm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from petct_jax.phantoms.anatomy import BONE, SOFT_TISSUES, T, Anatomy, spine_y
from petct_jax.phantoms.shapes import Ellipsoid, Shape, Union

NODE_OK = SOFT_TISSUES
# site: (weight, allowed tissue labels at the centre, diameter range in mm, hard reason)
SITES: dict[str, tuple[float, tuple[int, ...], tuple[float, float], str | None]] = {
    "cervical": (0.09, NODE_OK, (6, 30), None),
    "axillary": (0.09, NODE_OK, (6, 30), None),
    "mediastinal": (0.11, NODE_OK + (T["lung"],), (6, 30), None),
    "para_aortic": (0.09, NODE_OK, (6, 30), None),
    "iliac": (0.07, NODE_OK, (6, 30), None),
    "inguinal": (0.07, NODE_OK, (6, 30), None),
    "lung": (0.12, (T["lung"],), (4, 40), None),
    "liver": (0.12, (T["liver"],), (6, 40), None),
    "bone": (0.10, BONE, (6, 35), None),
    "perivesical": (0.05, NODE_OK, (6, 22), "near_bladder"),
    "renal_hilum": (0.04, NODE_OK + (T["blood"],), (6, 22), "near_kidney"),
    "paracardiac": (0.05, NODE_OK + (T["lung"],), (6, 22), "near_heart"),
}
_SITE_NAMES = tuple(SITES)
_SITE_P = np.array([SITES[s][0] for s in _SITE_NAMES])
_SITE_P = _SITE_P / _SITE_P.sum()


@dataclass
class Lesion:
    id: str
    site: str
    shape: str                     # sphere | ellipsoid | blob
    ref_centre: np.ndarray         # patient reference frame, mm
    radii: np.ndarray              # semi-axes, world mm
    axes: np.ndarray               # 3x3, columns = semi-axis directions (RAS+)
    parts: list[tuple[np.ndarray, float]]   # blob lobes: (offset from centre, radius), world mm
    suv: float                     # activity concentration (before resolution blur)
    suv_background: float          # tissue the lesion sits in
    hu: float                      # CT density
    hard: str | None               # low_contrast | near_bladder | near_kidney | near_heart
    necrotic: bool = False
    core_suv: float = 0.0
    centre: np.ndarray = field(default_factory=lambda: np.zeros(3))   # world mm (per study)

    def solid(self) -> Shape:
        """The lesion in world coordinates."""
        core = Ellipsoid(self.centre, self.radii, self.axes)
        if not self.parts:
            return core
        return Union(core, *[Ellipsoid(self.centre + off, (r, r, r)) for off, r in self.parts])

    def necrotic_core(self) -> Shape:
        return Ellipsoid(self.centre, self.radii * 0.45, self.axes)

    def to_json(self) -> dict:
        return {
            "id": self.id, "site": self.site, "shape": self.shape,
            "centre_mm": _r(self.centre), "radii_mm": _r(self.radii), "axes": _r(self.axes),
            "parts": [{"centre_mm": _r(self.centre + off), "radius_mm": round(float(r), 3)}
                      for off, r in self.parts],
            "suv": round(self.suv, 4), "suv_background": round(self.suv_background, 4),
            "contrast": round(self.suv / max(self.suv_background, 1e-3), 3),
            "ct_hu": round(self.hu, 2), "hard": self.hard, "necrotic": self.necrotic,
        }


def _r(a) -> list:
    return np.round(np.asarray(a, dtype=np.float64), 3).tolist()


def _random_axes(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _propose(site: str, an: Anatomy, rng: np.random.Generator, r_ref: float) -> np.ndarray:
    u = rng.uniform
    side = 1.0 if rng.random() < 0.5 else -1.0
    if site == "cervical":
        return np.array([side * u(20, 42), u(-12, 22), u(-292, -212)])
    if site == "axillary":
        return np.array([side * u(130, 172), u(-30, 30), u(-390, -318)])
    if site == "mediastinal":
        return np.array([u(-18, 22), u(-12, 45), u(-455, -345)])
    if site == "para_aortic":
        z = u(-775, -610)
        t = (z + 352) / (-785 + 352)
        xa, ya = -22 + 6 * t, -30 + 26 * t
        return np.array([xa + side * u(16, 28), ya + u(-6, 10), z])
    if site == "iliac":
        a = an.landmarks["aorta_bifurcation"]
        b = an.landmarks["iliac_end_r" if side > 0 else "iliac_end_l"]
        p = a + u(0.3, 1.0) * (b - a)
        return p + np.array([side * u(10, 18), u(-12, 6), u(-6, 6)])
    if site == "inguinal":
        return np.array([side * u(52, 92), u(35, 68), u(-990, -935)])
    if site in ("lung", "liver"):
        shape = an.named["lung_r" if side > 0 else "lung_l"] if site == "lung" else an.named["liver"]
        return u(shape.lo, shape.hi)
    if site == "bone":
        k = rng.integers(4)
        if k == 0:   # vertebral body
            z = u(-780, -300)
            return np.array([u(-6, 6), spine_y(z) + u(-6, 6), z])
        if k == 1:   # sacrum
            z = u(-860, -805)
            return np.array([u(-15, 15), spine_y(z) + u(-5, 5), z])
        if k == 2:   # ilium
            s = an.named["ilium_r" if side > 0 else "ilium_l"]
            return u(s.lo, s.hi)
        z = u(-1080, -930)    # proximal femur shaft
        t = (z + 915) / (-1330 + 915)
        return np.array([side * (118 - 32 * t), 12 * t, z])
    organ = {"perivesical": "bladder", "renal_hilum": "kidney_r" if side > 0 else "kidney_l",
             "paracardiac": "heart"}[site]
    ell = an.named[organ]
    if site == "perivesical":
        d = np.array([side * u(0.4, 1.0), u(-1.0, 0.3), u(-0.2, 0.8)])
    elif site == "renal_hilum":
        d = np.array([-side * u(0.6, 1.0), u(0.0, 0.8), u(-0.5, 0.5)])
    else:
        d = np.array([u(-1.0, 0.2), u(-0.3, 0.8), u(-1.0, 0.3)])
    d /= np.linalg.norm(d)
    return ell.surface_point(d) + d * (r_ref + u(1.5, 5.0))


def draw_lesion(lid: str, rng: np.random.Generator, an: Anatomy, suv_table: np.ndarray,
                hu_table: np.ndarray, contrast: bool, world_scale: np.ndarray, size_scale: float,
                min_radius: float, accept, site: str | None = None) -> Lesion | None:
    """One lesion at a random site; `accept(ref_point, world_radius)` checks fields of view.

    Returns None when no valid position was found (the caller just draws another site).
    """
    site = site or str(rng.choice(_SITE_NAMES, p=_SITE_P))
    _, allowed, (dmin, dmax), hard = SITES[site]
    diameter = float(np.exp(rng.uniform(np.log(dmin), np.log(dmax))))
    r = max(0.5 * diameter * size_scale, min_radius)
    kind = str(rng.choice(["sphere", "ellipsoid", "blob"], p=[0.45, 0.35, 0.2]))
    axes = _random_axes(rng)
    if kind == "sphere":
        radii = np.full(3, r)
    else:
        radii = r * np.array([1.0, rng.uniform(0.65, 1.0), rng.uniform(0.8, 1.35)])
    radii = np.maximum(radii, min_radius)
    parts: list[tuple[np.ndarray, float]] = []
    if kind == "blob":
        for _ in range(int(rng.integers(2, 5))):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            parts.append((d * r * rng.uniform(0.5, 0.9), max(r * rng.uniform(0.4, 0.7), min_radius)))
    r_ref = float(r / world_scale.mean())
    for _ in range(60):
        p = _propose(site, an, rng, r_ref)
        lab = an.labels_at(p[None])[0]
        if lab not in allowed:
            continue
        if site in ("liver", "lung", "bone"):
            # keep most of the lesion in its organ: probe half-way out along the axes
            probe = p[None] + 0.5 * r_ref * np.vstack([np.eye(3), -np.eye(3)])
            labs = an.labels_at(probe)
            if np.isin(labs, allowed).sum() < (4 if site == "bone" else 5):
                continue
        if not accept(p, float(radii.max())):
            continue
        break
    else:
        return None
    bg = float(suv_table[lab])
    low = hard is None and rng.random() < 0.25
    if low:
        hard = "low_contrast"
        suv = float(np.clip(max(2.5, bg * rng.uniform(1.3, 1.8)), 2.5, 20.0))
    else:
        suv = float(np.exp(rng.uniform(np.log(min(max(2.5, 1.8 * bg), 19.0)), np.log(20.0))))
    if site == "liver":
        hu = float(hu_table[T["liver"]] - rng.uniform(18, 45))        # hypodense metastasis
    elif site == "bone":
        hu = float(rng.uniform(40, 160) if rng.random() < 0.6 else rng.uniform(650, 1100))
    elif site == "lung":
        hu = float(rng.uniform(15, 45))
    else:
        hu = float(rng.uniform(28, 48) + (rng.uniform(10, 30) if contrast else 0.0))
    necrotic = diameter > 24 and rng.random() < 0.35
    return Lesion(lid, site, kind, p, radii, axes, parts, suv, bg, hu, hard, necrotic,
                  float(rng.uniform(0.6, 1.2)))


def evolve(lesions: list[Lesion], rng: np.random.Generator, min_radius: float) -> list[Lesion]:
    """Follow-up: lesions shrink, grow, change uptake or disappear."""
    out = []
    for les in lesions:
        if rng.random() < 0.25:
            continue
        g = rng.uniform(0.55, 1.5)
        radii = np.maximum(les.radii * g, min_radius)
        parts = [(off * g, max(r * g, min_radius)) for off, r in les.parts]
        suv = float(np.clip(max(les.suv * rng.uniform(0.6, 1.4), 1.3 * les.suv_background), 2.5, 20.0))
        out.append(replace(les, radii=radii, parts=parts, suv=suv, centre=np.zeros(3)))
    return out
