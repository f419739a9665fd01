"""Analytic solids for the phantom: inside-tests on broadcastable coordinate arrays.

A shape answers `inside(x, y, z)` for coordinates in the patient reference frame (mm) and
knows its bounding box, so that painting it on a grid touches only the voxels of that box.
Coordinates are broadcastable arrays (see `Grid.coords`), points are 0-d or 1-d arrays.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

Array = np.ndarray


def rotation(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> Array:
    """Rotation matrix (degrees about x, then y, then z); its columns are the body axes."""
    ax, ay, az = np.deg2rad([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx_ = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry_ = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz_ = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz_ @ ry_ @ rx_


class Shape:
    lo: Array
    hi: Array

    def inside(self, x: Array, y: Array, z: Array) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def contains(self, p: Sequence[float]) -> bool:
        p = np.asarray(p, dtype=np.float64)
        return bool(np.asarray(self.inside(p[0:1], p[1:2], p[2:3])).reshape(-1)[0])


class Ellipsoid(Shape):
    def __init__(self, centre, semi, rot: Array | None = None):
        self.c = np.asarray(centre, dtype=np.float64)
        self.semi = np.asarray(semi, dtype=np.float64)
        self.rot = None if rot is None else np.asarray(rot, dtype=np.float64)
        if self.rot is None:
            half = self.semi
        else:
            half = np.sqrt(((self.rot * self.semi[None, :]) ** 2).sum(1))
        self.lo, self.hi = self.c - half, self.c + half

    def inside(self, x, y, z):
        dx, dy, dz = x - self.c[0], y - self.c[1], z - self.c[2]
        if self.rot is None:
            a, b, c = self.semi
            return (dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2 <= 1.0
        q = 0.0
        for k in range(3):
            r = self.rot[:, k]
            u = dx * r[0] + dy * r[1] + dz * r[2]
            q = q + (u / self.semi[k]) ** 2
        return q <= 1.0

    def grown(self, d: float) -> Ellipsoid:
        return Ellipsoid(self.c, np.maximum(self.semi + d, 1e-3), self.rot)

    def scaled(self, f: float) -> Ellipsoid:
        return Ellipsoid(self.c, self.semi * f, self.rot)

    def surface_point(self, direction) -> Array:
        """Point where the ray from the centre along `direction` leaves the ellipsoid."""
        d = np.asarray(direction, dtype=np.float64)
        d = d / np.linalg.norm(d)
        u = d if self.rot is None else self.rot.T @ d
        t = 1.0 / np.sqrt(((u / self.semi) ** 2).sum())
        return self.c + t * d


class Column(Shape):
    """Elliptic column along z whose centre and semi-axes are interpolated between knots."""

    def __init__(self, z, cx, cy, ax, ay, grow: float = 0.0):
        order = np.argsort(z)
        self.z = np.asarray(z, dtype=np.float64)[order]
        self.cx, self.cy, self.ax, self.ay = (np.asarray(v, dtype=np.float64)[order] for v in (cx, cy, ax, ay))
        self.ax = np.maximum(self.ax + grow, 1e-3)
        self.ay = np.maximum(self.ay + grow, 1e-3)
        self.lo = np.array([(self.cx - self.ax).min(), (self.cy - self.ay).min(), self.z[0]])
        self.hi = np.array([(self.cx + self.ax).max(), (self.cy + self.ay).max(), self.z[-1]])

    def section(self, z):
        return (np.interp(z, self.z, self.cx), np.interp(z, self.z, self.cy),
                np.interp(z, self.z, self.ax), np.interp(z, self.z, self.ay))

    def inside(self, x, y, z):
        cx, cy, ax, ay = (v.astype(np.float32, copy=False) for v in self.section(z))
        return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (z >= self.z[0]) & (z <= self.z[-1])


class Capsule(Shape):
    """Segment p0-p1 swept by a radius that goes linearly from r0 to r1 (a tapered tube)."""

    def __init__(self, p0, p1, r0: float, r1: float | None = None):
        self.p0 = np.asarray(p0, dtype=np.float64)
        self.p1 = np.asarray(p1, dtype=np.float64)
        self.r0, self.r1 = float(r0), float(r0 if r1 is None else r1)
        r = max(self.r0, self.r1)
        self.lo = np.minimum(self.p0, self.p1) - r
        self.hi = np.maximum(self.p0, self.p1) + r

    def inside(self, x, y, z):
        d = (self.p1 - self.p0).astype(np.float32)
        dd = np.float32(d @ d)
        px, py, pz = x - np.float32(self.p0[0]), y - np.float32(self.p0[1]), z - np.float32(self.p0[2])
        pd = px * d[0] + py * d[1] + pz * d[2]
        t = np.clip(pd * (1 / dd), 0.0, 1.0)
        # |p - t d|^2 = |p|^2 - 2 t (p.d) + t^2 |d|^2, with |p|^2 built from the 1-D terms
        dist2 = (px * px + py * py + pz * pz) + t * (t * dd - 2 * pd)
        r = np.float32(self.r0) + np.float32(self.r1 - self.r0) * t if self.r1 != self.r0 else np.float32(self.r0)
        return dist2 <= r * r


class Box(Shape):
    def __init__(self, lo, hi):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)

    def inside(self, x, y, z):
        return ((x >= self.lo[0]) & (x <= self.hi[0]) & (y >= self.lo[1]) & (y <= self.hi[1])
                & (z >= self.lo[2]) & (z <= self.hi[2]))


class Union(Shape):
    def __init__(self, *parts: Shape):
        self.parts = parts
        self.lo = np.min([p.lo for p in parts], axis=0)
        self.hi = np.max([p.hi for p in parts], axis=0)

    def inside(self, x, y, z):
        m = self.parts[0].inside(x, y, z)
        for p in self.parts[1:]:
            m = m | p.inside(x, y, z)
        return m


class Intersect(Shape):
    def __init__(self, *parts: Shape):
        self.parts = parts
        self.lo = np.max([p.lo for p in parts], axis=0)
        self.hi = np.min([p.hi for p in parts], axis=0)

    def inside(self, x, y, z):
        m = self.parts[0].inside(x, y, z)
        for p in self.parts[1:]:
            m = m & p.inside(x, y, z)
        return m


class Subtract(Shape):
    def __init__(self, base: Shape, *holes: Shape):
        self.base, self.holes = base, holes
        self.lo, self.hi = base.lo, base.hi

    def inside(self, x, y, z):
        m = self.base.inside(x, y, z)
        for h in self.holes:
            m = m & ~h.inside(x, y, z)
        return m


class Custom(Shape):
    def __init__(self, lo, hi, fn: Callable[[Array, Array, Array], Array]):
        self.lo = np.asarray(lo, dtype=np.float64)
        self.hi = np.asarray(hi, dtype=np.float64)
        self.fn = fn

    def inside(self, x, y, z):
        return self.fn(x, y, z)


class Field:
    """Smooth random texture: a sum of plane waves, about zero-mean, std about 1.

    Analytic in the reference frame, so every grid sees the same texture at the same
    world position (a noise volume resampled per grid would not).
    """

    def __init__(self, rng: np.random.Generator, n: int, wavelength: tuple[float, float]):
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n)
        self.k = (2 * np.pi / lam)[:, None] * dirs
        self.phase = rng.uniform(0, 2 * np.pi, size=n)
        self.amp = np.sqrt(2.0 / n)

    def __call__(self, x, y, z):
        out = 0.0
        for (kx, ky, kz), ph in zip(self.k.astype(np.float32), self.phase.astype(np.float32)):
            out = out + np.cos(x * kx + y * ky + z * kz + ph)
        return np.asarray(out * np.float32(self.amp), dtype=np.float32)
