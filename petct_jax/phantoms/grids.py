"""Axis-aligned voxel grids in RAS+ world millimetres.

Every file the phantom generator writes is an axis-aligned grid: each array axis runs along
one world axis (R/L, A/P or S/I), possibly flipped and in any order, exactly like NIfTI
files from different converters. `Grid` keeps that mapping explicit so the analytic phantom
can be evaluated at the voxel centres of any grid with broadcasting (one 1-D coordinate
vector per array axis instead of a full coordinate volume), and so that one grid can be
resampled onto another through the affines alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# axis code -> (world axis, direction) in RAS+: +x = patient's Right, +y = Anterior,
# +z = Superior (the NIfTI / nibabel convention).
_CODES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


@dataclass(frozen=True)
class Grid:
    """A voxel grid: `shape` (array order) and a 4x4 voxel -> RAS+ mm `affine`.

    The affine must be axis-aligned (one non-zero per column of its 3x3 part).
    """

    shape: tuple[int, int, int]
    affine: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.affine, dtype=np.float64)
        nz = np.abs(a[:3, :3]) > 1e-9 * np.abs(a[:3, :3]).max()
        if not (nz.sum(0) == 1).all() or not (nz.sum(1) == 1).all():
            raise ValueError("Grid needs an axis-aligned affine")
        object.__setattr__(self, "affine", a)
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_box(cls, axcodes: str, spacing_xyz, lo, hi) -> Grid:
        """Grid whose voxels tile the world box [lo, hi] (RAS+ mm, per world axis x, y, z).

        `axcodes` names, per array axis, the direction of increasing index (nibabel's
        `aff2axcodes` letters): "RAS" is nibabel canonical, "LPS" is what ITK writes for
        DICOM data, "SPL" stores z first. The box is centred; sizes are rounded up to whole
        voxels.
        """
        axcodes = axcodes.upper()
        if sorted(_CODES[c][0] for c in axcodes) != [0, 1, 2]:
            raise ValueError(f"bad axis codes {axcodes!r}")
        lo, hi, sp = (np.asarray(v, dtype=np.float64) for v in (lo, hi, spacing_xyz))
        affine = np.eye(4)
        affine[:3, :3] = 0.0
        shape = []
        for a, code in enumerate(axcodes):
            w, sign = _CODES[code]
            n = max(1, int(np.ceil((hi[w] - lo[w]) / sp[w] - 1e-6)))
            centre = 0.5 * (lo[w] + hi[w])
            first = centre - sign * 0.5 * (n - 1) * sp[w]
            affine[w, a] = sign * sp[w]
            affine[w, 3] = first
            shape.append(n)
        return cls(tuple(shape), affine)

    # ------------------------------------------------------------------ geometry
    @property
    def world_axis(self) -> tuple[int, int, int]:
        """World axis (0=x, 1=y, 2=z) that each array axis runs along."""
        return tuple(int(np.argmax(np.abs(self.affine[:3, a]))) for a in range(3))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) per array axis."""
        return tuple(float(np.abs(self.affine[:3, a]).max()) for a in range(3))

    @property
    def axcodes(self) -> str:
        out = ""
        for a, w in enumerate(self.world_axis):
            pos = self.affine[w, a] > 0
            out += ("RAS" if pos else "LPI")[w]
        return out

    def axis_coords(self, a: int) -> np.ndarray:
        """World coordinate (mm, along `world_axis[a]`) of the voxel centres of array axis a."""
        w = self.world_axis[a]
        return self.affine[w, 3] + self.affine[w, a] * np.arange(self.shape[a])

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """World box (lo, hi per x, y, z) covered by the voxels, edges included."""
        lo, hi = np.zeros(3), np.zeros(3)
        for a, w in enumerate(self.world_axis):
            c = self.axis_coords(a)
            half = 0.5 * self.spacing[a]
            lo[w], hi[w] = c.min() - half, c.max() + half
        return lo, hi

    def block(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Array slices of the voxels whose centres lie in the world box [lo, hi]; None if empty."""
        out = []
        for a, w in enumerate(self.world_axis):
            c = self.axis_coords(a)
            idx = np.nonzero((c >= lo[w]) & (c <= hi[w]))[0]
            if idx.size == 0:
                return None
            out.append(slice(int(idx[0]), int(idx[-1]) + 1))
        return tuple(out)

    def coords(self, sl=None, dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """World x, y, z of the voxel centres (of block `sl`), as broadcastable arrays.

        Each returned array has its length on the array axis that runs along that world
        axis and 1 elsewhere, so expressions in (x, y, z) broadcast to the block's shape
        in the grid's own array order.
        """
        sl = sl or (slice(None),) * 3
        out: list[np.ndarray] = [None, None, None]  # type: ignore[list-item]
        for a, w in enumerate(self.world_axis):
            c = self.axis_coords(a)[sl[a]].astype(dtype)
            shape = [1, 1, 1]
            shape[a] = c.size
            out[w] = c.reshape(shape)
        return out[0], out[1], out[2]

    def slab(self, axis: int, start: int, stop: int) -> Grid:
        """The sub-grid of indices start:stop along array axis `axis` (same voxel centres)."""
        shape = list(self.shape)
        shape[axis] = stop - start
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ np.eye(3)[axis] * start + self.affine[:3, 3]
        return Grid(tuple(shape), affine)

    def slabs(self, max_voxels: int) -> list[tuple[int, int, int]]:
        """(axis, start, stop) chunks along the world-z array axis, each <= max_voxels."""
        axis = self.world_axis.index(2)
        per = max(1, int(np.prod(self.shape)) // self.shape[axis])
        step = max(1, max_voxels // per)
        return [(axis, s, min(s + step, self.shape[axis])) for s in range(0, self.shape[axis], step)]

    def world_to_voxel(self, points) -> np.ndarray:
        """Continuous voxel indices of world points (..., 3)."""
        pts = np.asarray(points, dtype=np.float64)
        inv = np.linalg.inv(self.affine)
        return pts @ inv[:3, :3].T + inv[:3, 3]

    def voxel_to_world(self, ijk) -> np.ndarray:
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def to_json(self) -> dict:
        return {"shape": list(self.shape), "spacing": [round(s, 6) for s in self.spacing],
                "axcodes": self.axcodes, "affine": np.round(self.affine, 6).tolist()}


def resample_linear(src: np.ndarray, src_grid: Grid, dst_grid: Grid, fill: float,
                    scaling: tuple[float, float] = (1.0, 0.0)) -> np.ndarray:
    """Trilinear resampling of `src` onto `dst_grid` through both affines (world space).

    Both grids are axis-aligned, so trilinear interpolation factors into three 1-D linear
    interpolations along the array axes, done one axis at a time (fast, little memory).
    Points outside the source field of view (beyond the outer voxel edges) get `fill`.
    `src` may hold stored integers; `scaling` (slope, inter) is applied at the end, which is
    exact because interpolation is linear.
    """
    assert src.shape == src_grid.shape
    src_axis_of_world = {w: b for b, w in enumerate(src_grid.world_axis)}
    order = [src_axis_of_world[w] for w in dst_grid.world_axis]
    out = np.transpose(src, order)   # any dtype: becomes float32 after the first axis
    valid = []
    # continuous source index along each destination axis
    targets = []
    for a, w in enumerate(dst_grid.world_axis):
        b = src_axis_of_world[w]
        t = (dst_grid.axis_coords(a) - src_grid.affine[w, 3]) / src_grid.affine[w, b]
        targets.append(t)
    # do the axes that shrink the array most first
    ratio = [len(targets[a]) / out.shape[a] for a in range(3)]
    for a in sorted(range(3), key=lambda k: ratio[k]):
        n = out.shape[a]
        t = targets[a]
        ok = (t >= -0.5) & (t <= n - 0.5)
        valid.append((a, ok))
        tc = np.clip(t, 0, n - 1)
        if n == 1:
            out = np.take(out, np.zeros(len(t), dtype=np.intp), axis=a).astype(np.float32)
            continue
        i0 = np.minimum(np.floor(tc).astype(np.intp), n - 2)
        wgt = (tc - i0).astype(np.float32)
        shape = [1, 1, 1]
        shape[a] = len(t)
        wgt = wgt.reshape(shape)
        lo_, hi_ = np.take(out, i0, axis=a), np.take(out, i0 + 1, axis=a)
        out = lo_ * (1 - wgt) + hi_ * wgt    # float32 (wgt is float32)
    out = out.astype(np.float32, copy=False)
    if tuple(scaling) != (1.0, 0.0):
        out = out * np.float32(scaling[0]) + np.float32(scaling[1])
    for a, ok in valid:
        if not ok.all():
            idx = [slice(None)] * 3
            idx[a] = ~ok
            out[tuple(idx)] = fill
    return out
