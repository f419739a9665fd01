"""Random 3D training patches read from the store: geometry, RandZoom, foreground sampling.

A patch is `PatchConfig.patch` voxels (z, y, x; default 96 x 128 x 128) cut from the
scan after an optional magnification `scale`:

* RandZoom, as the reference's MAE recipe (MONAI `RandZoomd(prob=0.5, min_zoom=0.9,
  max_zoom=1.1, mode="trilinear", keep_size=False)` on the whole volume, then
  `SpatialPadd` with zeros and `RandSpatialCropd`): the zoomed volume has
  floor(n * scale) voxels per axis, voxel centres map back with torch's
  align_corners=False rule, u = (i + 0.5) * n / floor(n * scale) - 0.5 (clamped to the
  volume), and the crop start is uniform over the zoomed volume (or the patch is centred
  with symmetric zero padding where the zoomed volume is smaller). We compute exactly
  that patch, but read only the region it covers (about patch / scale voxels, plus one
  for interpolation) and resample that region separably (trilinear = linear along each
  axis; labels nearest): the whole volume is never loaded or zoomed.
* Fine-tuning augmentation (`augment.py`) multiplies its own scaling into `scale` and
  may rotate about z; the rotated patch is resampled from the bounding box of its
  voxel centres (bilinear in y-x, linear in z: still one resample of one read region).

Padding is applied after normalization, so a padded voxel is 0 (the mean), as the
reference's zero padding of z-scored arrays.

Foreground oversampling (segmentation): a patch asked to contain foreground picks one
of the scan's lesions uniformly from the store's lesion index (a small lesion counts as
much as a large one; nnU-Net's per-voxel choice favours large lesions), a random voxel
of its bounding box as the centre (nnU-Net's habit), and shifts the window to stay in
the volume. A scan without lesions falls back to a random patch, as in nnU-Net. Which
patches must contain foreground is decided by the pipeline (`pipeline.py`) from the
sample's global index, so the count per global batch is exact.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from petct_jax.data import augment as aug
from petct_jax.data.normalize import Normalizer, check_channels
from petct_jax.errors import PetctError
from petct_jax.store import float32_reads

DEFAULT_PATCH = (96, 128, 128)
TASKS = ("mae", "seg")
IMAGE_DTYPES = ("float32", "float16")
SLAB_ROWS = 8  # output z-rows resampled together (Geometry._apply_slabs)


@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """How training patches are cut. Presets: `PatchConfig.for_task("mae" | "seg")`."""
    patch: tuple[int, int, int] = DEFAULT_PATCH
    channels: tuple[str, ...] = ("pet", "ct")
    normalization: str = "zscore"  # or "nnunet"
    zoom_prob: float = 0.5  # the reference's MAE RandZoom
    zoom_range: tuple[float, float] = (0.9, 1.1)
    foreground_fraction: float = 0.0  # share of each global batch centred on a lesion
    labels: bool = False  # also return the segmentation
    augment: aug.AugmentConfig = aug.AugmentConfig()
    # The image's dtype: "float16" halves what worker processes, the host and the device move
    # for networks that compute in 16 bits (values are the float32 result rounded once), at
    # the price of numpy's slow float16 cast (~15 CPU ms per default patch; RESULTS.md).
    dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        object.__setattr__(self, "channels", check_channels(self.channels))
        object.__setattr__(self, "zoom_range", tuple(float(z) for z in self.zoom_range))
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise PetctError(f"data.patch={self.patch}: expected three positive sizes (z, y, x)")
        if not 0.0 <= self.zoom_prob <= 1.0 or self.zoom_range[0] <= 0 \
                or self.zoom_range[0] > self.zoom_range[1]:
            raise PetctError(f"data.zoom_prob={self.zoom_prob}, data.zoom_range={self.zoom_range}: "
                             "need a probability and 0 < min <= max")
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise PetctError(f"data.foreground_fraction={self.foreground_fraction}: must lie in [0, 1]")
        if self.foreground_fraction and not self.labels:
            raise PetctError("data.foreground_fraction > 0 needs labels (task 'seg')")
        if self.normalization not in ("zscore", "nnunet"):
            raise PetctError(f"data.normalization={self.normalization!r}: choose 'zscore' or 'nnunet'")
        if self.dtype not in IMAGE_DTYPES:
            raise PetctError(f"data.dtype={self.dtype!r}: choose one of {list(IMAGE_DTYPES)}")

    @classmethod
    def for_task(cls, task: str, **overrides: Any) -> "PatchConfig":
        """'mae': the reference's pretraining crops (RandZoom p=0.5, nothing else).
        'seg': labels, one third of each batch on a lesion, nnU-Net-style augmentation,
        no RandZoom (the reference's fine-tuning crops are plain random crops)."""
        if task == "mae":
            base: dict[str, Any] = {}
        elif task == "seg":
            base = dict(zoom_prob=0.0, foreground_fraction=1 / 3, labels=True,
                        augment=aug.AugmentConfig.finetune())
        else:
            raise PetctError(f"task={task!r}: choose one of {list(TASKS)}")
        base.update(overrides)
        return cls(**base)

    @classmethod
    def from_config(cls, cfg: Any, task: str = "mae") -> "PatchConfig":
        """From a PatchConfig, a mapping or an ml_collections ConfigDict (e.g. `config.data`).

        Fields missing from `cfg` take the `task` preset's values. Keys that are not
        PatchConfig fields (`num_workers`, `val_fraction`, ... which the trainer reads from
        the same group) are ignored; `augment` must hold AugmentConfig fields only.
        """
        if cfg is None:
            return cls.for_task(task)
        if isinstance(cfg, PatchConfig):
            return cfg
        items = aug._as_dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in items.items() if k in names}
        if "augment" in kwargs:
            kwargs["augment"] = aug.AugmentConfig.from_config(kwargs["augment"])
        return cls.for_task(task, **kwargs)


# ---------------------------------------------------------------------------
# Geometry: where the patch's voxels come from.

def zoomed_size(n: int, scale: float) -> int:
    """Voxels along an axis of n after zooming by `scale` (torch/MONAI: floor)."""
    return n if scale == 1.0 else max(int(math.floor(n * scale)), 1)


def window_start(n: int, nz: int, p: int, rng: np.random.Generator,
                 centre: int | None = None) -> int:
    """Start of the patch window in zoomed coordinates (negative = zero padding before)."""
    if nz <= p:
        return -((p - nz) // 2)  # SpatialPadd's symmetric padding, then the only crop
    if centre is None:
        return int(rng.integers(0, nz - p + 1))  # RandSpatialCropd
    cz = (centre + 0.5) * nz / n - 0.5
    return int(np.clip(int(round(cz)) - p // 2, 0, nz - p))


@dataclasses.dataclass
class _Axis:
    """One axis of a separable window: output voxels [a, b) come from volume [lo, hi)."""
    a: int
    b: int
    lo: int
    hi: int
    u: np.ndarray | None  # source coordinates relative to lo; None = identity (no resampling)


def axis_window(n: int, nz: int, p: int, start: int) -> _Axis:
    a, b = max(0, -start), min(p, nz - start)
    if b <= a:
        return _Axis(0, 0, 0, 0, None)
    if nz == n:
        return _Axis(a, b, start + a, start + b, None)
    u = (np.arange(start + a, start + b, dtype=np.float64) + 0.5) * (n / nz) - 0.5
    u = np.clip(u, 0.0, n - 1.0)
    lo, hi = int(np.floor(u[0])), min(int(np.floor(u[-1])) + 2, n)
    return _Axis(a, b, lo, hi, u - lo)


def _resample_axis(x: np.ndarray, u: np.ndarray, axis: int, linear: bool) -> np.ndarray:
    m = x.shape[axis]
    if not linear:
        return np.take(x, np.clip(np.floor(u + 0.5).astype(np.intp), 0, m - 1), axis=axis)
    i0 = np.floor(u).astype(np.intp)
    i1 = np.minimum(i0 + 1, m - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = (u - i0).astype(np.float32).reshape(shape)
    a = np.take(x, i0, axis=axis)  # C-contiguous (indexing, x[..., i0], is not)
    b = np.take(x, i1, axis=axis)
    b -= a  # in place: a + (b - a) * w without temporaries
    b *= w
    a += b
    return a


class Geometry:
    """Maps a read region to the patch. `lo`/`hi`: the region to read (inside the
    volume); `apply(region)`: the patch, zero where it has no source; `where`: the
    patch voxels that come from the volume (a box of slices or a boolean mask)."""

    def __init__(self, shape: Sequence[int], patch: Sequence[int], scale: float,
                 starts: Sequence[int], angle: float = 0.0,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)):
        self.patch = tuple(int(p) for p in patch)
        nz = [zoomed_size(int(n), scale) for n in shape]
        self.axes = [axis_window(int(n), z, p, s) for n, z, p, s in zip(shape, nz, patch, starts)]
        self.rotated = angle != 0.0
        if not self.rotated:
            self.lo = tuple(ax.lo for ax in self.axes)
            self.hi = tuple(ax.hi for ax in self.axes)
            self.where = tuple(slice(ax.a, ax.b) for ax in self.axes)
            return
        # Rotation about z, in millimetres about the patch centre: z stays separable.
        (_, py, px), (_, ny, nx) = self.patch, shape
        sy, sx = float(spacing[1]), float(spacing[2])
        cy, cx = [(s + (p - 1) / 2 + 0.5) * n / z - 0.5
                  for s, p, n, z in zip(starts[1:], self.patch[1:], shape[1:], nz[1:])]
        dy = (np.arange(py) - (py - 1) / 2) * (ny / nz[1]) * sy
        dx = (np.arange(px) - (px - 1) / 2) * (nx / nz[2]) * sx
        cos, sin = math.cos(angle), math.sin(angle)
        yy = (cos * dy[:, None] - sin * dx[None, :]) / sy + cy
        xx = (sin * dy[:, None] + cos * dx[None, :]) / sx + cx
        valid = (yy >= -0.5) & (yy <= ny - 0.5) & (xx >= -0.5) & (xx <= nx - 0.5)
        yy, xx = np.clip(yy, 0, ny - 1), np.clip(xx, 0, nx - 1)
        z = self.axes[0]
        if valid.any() and z.b > z.a:
            ylo, yhi = int(np.floor(yy[valid].min())), min(int(np.floor(yy[valid].max())) + 2, ny)
            xlo, xhi = int(np.floor(xx[valid].min())), min(int(np.floor(xx[valid].max())) + 2, nx)
            # Points without a source are masked later; keep their indices in the region.
            yy, xx = np.clip(yy, ylo, yhi - 1), np.clip(xx, xlo, xhi - 1)
        else:
            ylo = yhi = xlo = xhi = 0
            valid[:] = False
        self.lo, self.hi = (z.lo, ylo, xlo), (z.hi, yhi, xhi)
        self._yx = (yy - ylo, xx - xlo, valid)
        mask = np.zeros(self.patch, dtype=bool)
        mask[z.a:z.b] = valid[None]
        self.where = mask

    @property
    def empty(self) -> bool:
        return any(b <= a for a, b in zip(self.lo, self.hi))

    @property
    def covers_patch(self) -> bool:
        """Every patch voxel has a source (no padding, no rotated-out corners)."""
        return not self.rotated and all(ax.a == 0 and ax.b == p for ax, p in zip(self.axes, self.patch))

    @property
    def identity(self) -> bool:
        """The region maps voxel for voxel onto `where` (no zoom, no rotation)."""
        return not self.rotated and all(ax.u is None for ax in self.axes)

    def apply(self, region: np.ndarray | None, *, linear: bool = True,
              out: np.ndarray | None = None,
              prepare: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """Resample `region` (the box lo..hi) into the patch, or into `out` (a zeroed
        patch-shaped array or view, e.g. one channel of the image). `prepare` (e.g. the
        normalization) is applied to the region first, slab by slab where it can be."""
        if out is None:
            out = np.zeros(self.patch, dtype=np.float32 if linear else np.uint8)
        if self.empty:
            return out
        if not self.rotated:
            self._apply_slabs(region, linear, out[self.where], prepare)
            return out
        r = region if prepare is None else prepare(region)
        if self.axes[0].u is not None:
            r = _resample_axis(r, self.axes[0].u, 0, linear)
        yy, xx, valid = self._yx
        flat = r.reshape(r.shape[0], -1)
        width = r.shape[2]
        if linear:
            y0, x0 = np.floor(yy).astype(np.intp), np.floor(xx).astype(np.intp)
            y1, x1 = np.minimum(y0 + 1, r.shape[1] - 1), np.minimum(x0 + 1, width - 1)
            wy, wx = (yy - y0).astype(np.float32), (xx - x0).astype(np.float32)
            top = flat[:, y0 * width + x0] * (1 - wx) + flat[:, y0 * width + x1] * wx
            bottom = flat[:, y1 * width + x0] * (1 - wx) + flat[:, y1 * width + x1] * wx
            res = top + (bottom - top) * wy
        else:
            yi = np.clip(np.floor(yy + 0.5).astype(np.intp), 0, r.shape[1] - 1)
            xi = np.clip(np.floor(xx + 0.5).astype(np.intp), 0, width - 1)
            res = flat[:, yi * width + xi]
        res = np.where(valid, res, 0).astype(out.dtype, copy=False)
        z = self.axes[0]
        out[z.a:z.b] = res
        return out

    def _apply_slabs(self, region: np.ndarray, linear: bool, out: np.ndarray,
                     prepare: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """The separable resampling, SLAB_ROWS output z-rows at a time: each slab's source
        rows are prepared and resampled along x, y, then z while they sit in the cache (1.7x
        faster than whole-region passes for a default-size zoomed patch; same values)."""
        z, rows = self.axes[0], region.shape[0]
        for j0 in range(0, z.b - z.a, SLAB_ROWS):
            j1 = min(j0 + SLAB_ROWS, z.b - z.a)
            if z.u is None:
                r, uz = region[j0:j1], None
            else:
                s0 = int(np.floor(z.u[j0]))
                s1 = min(int(np.floor(z.u[j1 - 1])) + 2, rows)
                r, uz = region[s0:s1], z.u[j0:j1] - s0
            if prepare is not None:
                r = prepare(r)
            for axis, u in self._order(r.shape, uz):
                r = _resample_axis(r, u, axis, linear)
            out[j0:j1] = r

    def _order(self, shape: Sequence[int], uz: np.ndarray | None) -> list[tuple[int, np.ndarray]]:
        """The axes to resample, in the order that gathers fewest voxels along x (single
        voxels; y and z move whole rows, ~3x cheaper): x last when the region is larger
        than the patch (zooming out), else x first."""
        steps = [(a, u) for a, u in ((2, self.axes[2].u), (1, self.axes[1].u), (0, uz))
                 if u is not None]
        shrinking = shape[2] > len(self.axes[2].u) if self.axes[2].u is not None else False
        return steps[::-1] if shrinking else steps


def draw_geometry(record: Mapping, config: PatchConfig, rng: np.random.Generator,
                  force_foreground: bool = False) -> Geometry:
    """Draw RandZoom, spatial augmentation and the window position for one patch."""
    shape = [int(s) for s in record["shape_zyx"]]
    zoom = 1.0
    if config.zoom_prob and rng.random() < config.zoom_prob:
        zoom = float(rng.uniform(*config.zoom_range))
    aug_scale, angle = aug.draw_spatial(config.augment, rng)
    scale = zoom * aug_scale
    centre: Sequence[int | None] = (None, None, None)
    lesions = record.get("lesions") or []
    if force_foreground and lesions:
        lesion = lesions[int(rng.integers(len(lesions)))]
        centre = [int(rng.integers(lo, max(hi, lo + 1)))
                  for lo, hi in zip(lesion["bbox_lo"], lesion["bbox_hi"])]
    starts = [window_start(n, zoomed_size(n, scale), p, rng, c)
              for n, p, c in zip(shape, config.patch, centre)]
    return Geometry(shape, config.patch, scale, starts, angle,
                    record.get("spacing_zyx", (1.0, 1.0, 1.0)))


def sample_patch(store: Any, record: Mapping, config: PatchConfig, normalizer: Normalizer,
                 rng: np.random.Generator, *, force_foreground: bool = False,
                 out: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One training patch: {"image": (Z, Y, X, C) `config.dtype`, "label": (Z, Y, X) uint8},
    written into `out` if given (arrays of those shapes and dtypes, e.g. the slots of a batch;
    their old contents do not matter) and else into new arrays."""
    geom = draw_geometry(record, config, rng, force_foreground)
    names = list(config.channels) + (["seg"] if config.labels else [])
    if geom.empty:
        region = {name: None for name in names}
    else:
        region = store.read(record["id"], names, geom.lo, geom.hi,
                            dtypes=float32_reads(config.channels))
    if out is None:
        out = {"image": np.empty((*config.patch, len(config.channels)), config.dtype)}
        if config.labels:
            out["label"] = np.empty(config.patch, np.uint8)
    image = out["image"]
    work = image if image.dtype == np.float32 else np.empty(image.shape, np.float32)
    for c, name in enumerate(config.channels):
        x = work[..., c]  # a view: resampling and augmentation write into the image
        if not geom.covers_patch:
            x.fill(0)  # padding: 0 is the mean after normalization
        if geom.identity and not geom.empty:
            normalizer(name, region[name], record, out=x[geom.where])
        elif not geom.empty:
            geom.apply(region[name], out=x,
                       prepare=lambda r, name=name: normalizer(name, r, record))
        aug.intensity(x, geom.where, config.augment, rng)
    flips = aug.draw_flips(config.augment, rng)
    if flips or work is not image:  # numpy copies first where source and target overlap
        image[...] = np.flip(work, flips)
    if config.labels:
        label = out["label"]
        if not geom.covers_patch:
            label.fill(0)
        geom.apply(region["seg"], linear=False, out=label)
        if flips:
            label[...] = np.flip(label, flips)
    return dict(out)
