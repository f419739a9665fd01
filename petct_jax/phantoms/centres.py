"""Scanner centres and size presets.

A centre fixes how a study lands on disk: voxel sizes and fields of view of PET and CT, the
NIfTI orientation (axis codes of the stored arrays), how CT and PET are stored, image noise
and PET resolution. A size preset scales the whole cohort: `standard` is realistic (PET 2-4
mm, CT 512x512 at 1-1.4 mm), `small` (the default, for CPU demos) is a half-size body
on coarser grids, `tiny` is for unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spacing:
    pet: tuple[float, float]       # in-plane, slice (mm)
    ct: tuple[float, float]
    pet_fov: float                 # in-plane field of view, mm (square)
    ct_fov: float


@dataclass(frozen=True)
class Centre:
    name: str
    description: str
    axcodes: str                   # per stored array axis: direction of increasing index
    ct_storage: tuple[str, float, float]   # (dtype, scl_slope, scl_inter) of CT on disk
    pet_storage: str               # "float32", or "int16" (scaled by nibabel)
    pet_fwhm: float                # PET resolution, mm
    pet_noise: float               # noise std at SUV 1 (relative, before smoothing)
    ct_noise: float                # HU
    contrast_p: float              # share of contrast-enhanced CTs
    weight: float                  # share of studies from this centre
    sizes: dict[str, Spacing]


CENTRES: tuple[Centre, ...] = (
    Centre("A", "AutoPET-like: PET 4.07 mm x 3 mm, CT 512x512 0.98 mm, ITK (LPS) orientation",
           "LPS", ("int16", 1.0, 0.0), "float32", 5.5, 0.16, 12.0, 0.8, 0.40,
           {"standard": Spacing((4.07, 3.0), (0.98, 3.0), 814.0, 501.76),
            "small": Spacing((3.5, 3.5), (1.75, 3.5), 330.0, 260.0),
            "tiny": Spacing((7.0, 7.0), (4.5, 7.0), 200.0, 160.0)}),
    Centre("B", "low-count scanner: PET 4 mm x 2 mm, CT 1.37 mm over 700 mm, RAS orientation",
           "RAS", ("int16", 1.0, 0.0), "float32", 7.0, 0.26, 20.0, 0.3, 0.25,
           {"standard": Spacing((4.0, 2.0), (1.37, 2.0), 600.0, 701.44),
            "small": Spacing((4.0, 3.0), (2.0, 3.0), 330.0, 320.0),
            "tiny": Spacing((8.0, 6.0), (5.0, 6.0), 200.0, 190.0)}),
    Centre("C", "z-first arrays (SPL), CT int16 with scl_inter -1024, PET 3 mm",
           "SPL", ("int16", 1.0, -1024.0), "float32", 5.0, 0.12, 8.0, 0.6, 0.20,
           {"standard": Spacing((3.0, 3.0), (1.17, 2.5), 576.0, 599.04),
            "small": Spacing((3.6, 3.0), (1.8, 3.0), 330.0, 280.0),
            "tiny": Spacing((6.0, 6.0), (4.0, 6.0), 200.0, 170.0)}),
    Centre("D", "feet-first (RPI), CT int16 scl_slope 0.5, PET int16 scaled, PET 2.73 mm",
           "RPI", ("int16", 0.5, -1024.0), "int16", 6.5, 0.20, 15.0, 0.5, 0.15,
           {"standard": Spacing((2.73, 2.5), (0.98, 2.5), 698.88, 501.76),
            "small": Spacing((3.8, 3.2), (1.9, 3.2), 330.0, 250.0),
            "tiny": Spacing((7.5, 6.5), (4.5, 6.5), 200.0, 160.0)}),
)
CENTRE_BY_NAME = {c.name: c for c in CENTRES}


@dataclass(frozen=True)
class SizePreset:
    name: str
    body_scale: float              # world mm per reference mm (times the patient's own size)
    description: str


SIZES: dict[str, SizePreset] = {
    "tiny": SizePreset("tiny", 0.3, "unit tests: 0.3x body on 6-8 mm PET voxels"),
    "small": SizePreset("small", 0.5, "CPU demo: half-size body, PET 3-4 mm, CT about 2 mm"),
    "standard": SizePreset("standard", 1.0, "realistic: adult body, PET 2-4 mm, CT 512x512"),
}
