"""One raw PET/CT scan (NIfTI) -> harmonized arrays on the store's grid, plus its record.

What happens to a scan (`harmonize`):

1. Headers first: each image must be 3D (a trailing singleton 4th dimension is
   squeezed; a real 4D series is an error) with a finite, invertible affine; the label,
   if any, must lie on the PET grid (same shape, voxel corners within 0.1 voxel).
2. Target grid: axis-aligned in the store's orientation (index [z, y, x] = inferior ->
   superior, posterior -> anterior, left -> right; see petct_jax/store.py) at the
   target spacing (default 3 x 2 x 2 mm), covering the PET field of view: the world
   bounding box of the PET voxels, centred, `round(extent / spacing)` voxels a side.
3. Resampling through the affines (world millimetres; any orientation or voxel size):
   for every target voxel centre, the source voxel coordinate is
   `inv(A_source) @ A_target @ (z, y, x, 1)`. When that map is a signed permutation
   plus scaling (every non-oblique NIfTI), the needed sub-box of the source is
   reordered/flipped with views and trilinear interpolation runs as three separable
   1-D passes in float32 (numpy gathers, in slabs: about 10x faster than scipy's
   `affine_transform` zoom path, same values to 1e-7, and no float64 copies). A target
   voxel whose centre falls inside a source voxel gets a value (edge voxels extend to
   the field-of-view border); anything outside gets the fill: CT -1024 HU, PET 0.
   Oblique affines fall back to `scipy.ndimage.affine_transform` with the full 3x3
   matrix (fill beyond the outermost voxel centres). Stored integer data is
   interpolated unscaled and `scl_slope/scl_inter` applied to the result (linear
   interpolation commutes with it), so a 512x512x600 int16 CT never needs a float copy
   of its own size (peak about 0.9 GB for such a scan).
4. Labels are resampled nearest-neighbour (order 0), which keeps lesions when the
   label grid is at least as coarse as the target (AutoPET PET: 2.04 x 2.04 x 3 mm vs
   2 x 2 x 3): every labelled source voxel then contains a target voxel centre. Label
   values must be non-negative integers; values above 1 are binarized (> 0 = lesion)
   and a warning is recorded; fractional or negative values are an error.
5. Body crop: bounding box of the largest connected component (6-connectivity) of
   CT > -500 HU on the target grid, padded by 3 voxels. Only the box is stored.
6. Statistics over the stored values (PET float16 SUV, CT int16 HU), exact, from
   65,536-bin histograms of the 16-bit values.

The manifest record of a case (store.commit_case), all lists in (z, y, x) order unless
noted:
    id, patient_id, cohort     strings; id unique in the store
    shape_zyx, spacing_zyx     stored array shape and voxel size (mm)
    affine_zyx                 4x4, (z, y, x, 1) index -> RAS+ world mm
    arrays                     ["pet", "ct", "seg"] or ["pet", "ct"]
    has_label                  bool
    sources                    {"pet", "ct", "seg"}: absolute input paths (seg null)
    source_sha256              {"pet", "ct", "seg"}: content hashes of those files
    source_geometry            per input: shape, voxel sizes and axis codes ("LPS"...)
    crop_box_world_mm          {"lo": [R, A, S], "hi": [R, A, S]}: RAS+ box covered by
                               the stored voxels (outer voxel faces)
    ct_coverage                fraction of the PET field of view inside the CT's
    stats                      {"pet", "ct"}: over the whole crop box (the paper's
                               per-scan z-score); "ct_foreground": CT where SEG > 0
                               (null when unlabelled or lesion-free); "ct_body": CT over
                               the body mask (largest component). Each: n, mean, std,
                               min, max, p00_5, p99_5 (percentiles, numpy 'linear');
                               ct_foreground/ct_body add "sample": <= 256 CT values at
                               evenly spaced ranks (a quantile sketch: weight each by
                               n / len(sample) to pool dataset-wide percentiles, as
                               nnU-Net's CT normalization needs)
    lesions                    connected components of SEG, 18-connectivity: list of
                               {"bbox_lo", "bbox_hi" (exclusive), "voxels",
                               "centroid_zyx" (voxel index, float)}
    lesion_count, lesion_volume_ml
    lesion_count_source        components of the label on its own grid (a drop in
                               lesion_count flags lesions lost to resampling/cropping)
    preset                     "canonical" or "reference" (PRESETS: the grid, axis order
                               and interpolation it was made with)
    warnings                   list of strings (binarized labels, Bq/mL-looking PET,
                               "plausibility warning [CHECK]: ..." from plausibility.py)
    preprocessing_version      PREPROCESSING_VERSION
    bytes, seconds             bytes of the case's arrays on disk and the time taken to
                               harmonize and write it (added by preprocess.py)
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import zlib
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from petct_jax.errors import PetctError
from petct_jax.preprocessing import plausibility as checks
from petct_jax.preprocessing.readers import CaseSpec

PREPROCESSING_VERSION = "petct-harmonize-1"
DEFAULT_SPACING_ZYX = (3.0, 2.0, 2.0)
CT_FILL_HU = -1024.0
PET_FILL = 0.0
BODY_THRESHOLD_HU = -500.0
BODY_PAD = 3
LESION_STRUCTURE = ndi.generate_binary_structure(3, 2)  # 18-connectivity (AutoPET metrics)
SAMPLE_SIZE = 256
FLOAT16_MAX = 65504.0
SUV_SUSPECT_MAX = 1000.0  # an SUV image this bright is almost surely Bq/mL
GRID_TOLERANCE_VOXELS = 0.1
MAX_TARGET_AXIS = 4096  # a bigger grid means a broken affine (e.g. metres, not mm)
OBLIQUE_TOLERANCE_VOXELS = 1e-3
DEFAULT_MAX_VOXELS = 1_500_000_000  # per image, before reading it (`--max-voxels`)
# "canonical": the physically exact harmonization this module describes (the default).
# "reference": the authors' executed code (liu-xiaofeng/MAE-for-PET-CT, autopetproc and the
# fine-tuning transform): the PET file's voxel sizes rounded to whole millimetres, the
# arrays in SimpleITK's order (k, j, i) with no reorientation, `scipy.ndimage.zoom` (order 1
# for PET, the CT resized to the zoomed PET's shape with order 1, the label with order 0),
# then the same body crop. Its grid is the zoomed array's; `affine_zyx` records where those
# voxels really lie, `spacing_zyx` the nominal target (the reference's own convention).
PRESETS = ("canonical", "reference")
GZIP_MAX_RATIO = 1100  # deflate's best ratio is about 1032:1; a bigger claim is no real data


class CaseError(PetctError):
    """A case that cannot be harmonized; names the case and the file at fault."""

    def __init__(self, case_id: str, problem: str, file: str | None = None):
        self.case_id, self.problem, self.file = case_id, problem, file
        super().__init__(f"{case_id}: {problem}" + (f": {file}" if file else ""))


# ---------------------------------------------------------------------------
# Reading NIfTI

@dataclasses.dataclass
class Image:
    """A NIfTI image whose header was checked; `read()` loads the stored (unscaled) voxels."""

    path: str
    role: str
    case_id: str
    shape: tuple[int, int, int]
    affine: np.ndarray  # (i, j, k, 1) -> RAS+ world mm, float64
    slope: float
    inter: float
    proxy: object

    def fail(self, problem: str) -> CaseError:
        return CaseError(self.case_id, f"{self.role} {problem}", self.path)

    def read(self) -> np.ndarray:
        try:
            raw = np.asarray(self.proxy.get_unscaled() if hasattr(self.proxy, "get_unscaled")
                             else self.proxy)
        except Exception as e:  # truncated gzip, short file, ...: nibabel raises many types
            raise self.fail(f"has unreadable voxel data ({type(e).__name__}: {e})") from None
        if raw.ndim > 3:
            raw = raw.reshape(self.shape)  # squeeze trailing singleton dimensions
        if not raw.dtype.isnative:
            raw = raw.astype(raw.dtype.newbyteorder("="))
        if raw.dtype.kind == "f":
            bad = raw.size - int(np.count_nonzero(np.isfinite(raw)))
            if bad:
                raise self.fail(f"has {bad} NaN/Inf voxels")
        elif raw.dtype.kind not in "iub":
            raise self.fail(f"has unsupported voxel type {raw.dtype}")
        return raw

    @property
    def voxel_mm(self) -> np.ndarray:
        return np.linalg.norm(self.affine[:3, :3], axis=0)

    def geometry(self) -> dict:
        return {"shape": list(self.shape), "voxel_mm": [round(float(v), 6) for v in self.voxel_mm],
                "axcodes": "".join(nib.aff2axcodes(self.affine))}


def _size_text(n: float) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


def _gzip_size(path: str) -> int | None:
    """Uncompressed bytes of a gzip file over all its members, streamed (output discarded,
    1 MiB at a time); None when the stream is damaged or ends early."""
    total, d, pending = 0, zlib.decompressobj(wbits=31), b""
    with open(path, "rb") as f:
        try:
            while True:
                if not pending:
                    pending = f.read(1 << 20)
                    if not pending:
                        break
                if d.eof:  # another member follows
                    d = zlib.decompressobj(wbits=31)
                total += len(d.decompress(pending, 1 << 20))
                pending = d.unused_data if d.eof else d.unconsumed_tail
            while not d.eof and (out := d.decompress(b"", 1 << 20)):
                total += len(out)
        except zlib.error:
            return None
    return total if d.eof else None


def check_claimed_size(img, path: str, role: str, case_id: str, shape: Sequence[int],
                       max_voxels: int) -> None:
    """Refuse, from sizes alone and before any voxel is read, a header that claims more
    voxels than `max_voxels` or more bytes than its file can hold.

    Uncompressed: vox_offset + voxel bytes must fit in the file. Gzip: the claim may not
    exceed GZIP_MAX_RATIO x the compressed size (deflate cannot do better than about
    1032:1); below 4 GiB, a trailer ISIZE (uncompressed size mod 2**32) smaller than the
    claim is confirmed by streaming the file (the trailer only covers the last member, and
    in a truncated file it is noise): refused when the complete stream is shorter, left
    to reading (which names the damage) when the stream is broken.
    """
    proxy = img.dataobj
    dtype = np.dtype(img.get_data_dtype())
    voxels = math.prod(int(s) for s in shape)
    claim = (f"{role} header claims {'x'.join(str(int(s)) for s in shape)} {dtype.name} "
             f"({_size_text(voxels * dtype.itemsize)})")
    if voxels > max_voxels:
        raise CaseError(case_id, f"{claim}, more than the limit of {max_voxels:,} voxels "
                                 f"(--max-voxels)", path)
    data_file = getattr(proxy, "file_like", None)
    offset = getattr(proxy, "offset", None)
    if not isinstance(data_file, str) or offset is None:
        return  # not a file-backed array proxy: nothing to compare against
    needed = int(offset) + voxels * dtype.itemsize
    size = os.path.getsize(data_file)
    isize = None
    with open(data_file, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
        if gzipped and size >= 18:  # 10-byte header + 8-byte trailer at the least
            f.seek(size - 4)
            isize = int.from_bytes(f.read(4), "little")
    if not gzipped:
        if needed > size:
            raise CaseError(case_id, f"{claim} but the file holds {size} bytes", data_file)
        return
    if needed > GZIP_MAX_RATIO * size:
        raise CaseError(case_id, f"{claim} but the file holds {size} bytes of gzip (at most "
                                 f"{_size_text(GZIP_MAX_RATIO * size)} uncompressed)", data_file)
    if needed < (1 << 32) and isize is not None and isize < needed:
        total = _gzip_size(data_file)
        if total is not None and total < needed:
            raise CaseError(case_id, f"{claim} but the file holds {size} bytes of gzip that "
                                     f"uncompress to {total} bytes", data_file)


def open_image(path: str, role: str, case_id: str, max_voxels: int = DEFAULT_MAX_VOXELS) -> Image:
    try:
        img = nib.load(path)
    except FileNotFoundError:
        raise CaseError(case_id, f"{role} file missing", path) from None
    except Exception as e:
        raise CaseError(case_id, f"{role} is not a readable NIfTI ({type(e).__name__}: {e})",
                        path) from None
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise CaseError(case_id, f"{role} has shape {shape}; expected a 3D volume", path)
    if len(shape) > 3:
        if any(s != 1 for s in shape[3:]):
            raise CaseError(case_id, f"{role} is {len(shape)}D with shape {shape}; expected a 3D "
                                     f"volume (a series of frames cannot be harmonized)", path)
        shape = shape[:3]
    check_claimed_size(img, path, role, case_id, shape, max_voxels)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CaseError(case_id, f"{role} has a degenerate affine", path)
    proxy = img.dataobj
    slope = float(getattr(proxy, "slope", 1.0))
    inter = float(getattr(proxy, "inter", 0.0))
    if not (math.isfinite(slope) and math.isfinite(inter)) or slope == 0:
        raise CaseError(case_id, f"{role} has invalid scl_slope/scl_inter {slope}/{inter}", path)
    return Image(path, role, case_id, shape, affine, slope, inter, proxy)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Geometry

def _corners(shape: Sequence[int]) -> np.ndarray:
    """(8, 4) homogeneous voxel coordinates of the outer faces of a volume."""
    edges = [(-0.5, n - 0.5) for n in shape]
    return np.array([[a, b, c, 1.0] for a in edges[0] for b in edges[1] for c in edges[2]])


def world_box(affine: np.ndarray, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """RAS+ bounding box (lo, hi) of a volume's voxels."""
    world = (affine @ _corners(shape).T)[:3]
    return world.min(axis=1), world.max(axis=1)


def target_grid(pet: Image, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The axis-aligned (z, y, x) grid over the PET field of view: (affine_zyx, shape)."""
    lo, hi = world_box(pet.affine, pet.shape)
    spacing_ras = np.array(spacing_zyx[::-1], dtype=np.float64)  # (x, y, z) = (R, A, S)
    n_ras = np.maximum(1, np.floor((hi - lo) / spacing_ras + 0.5)).astype(int)
    if n_ras.max() > MAX_TARGET_AXIS:
        raise pet.fail(f"field of view {np.round(hi - lo, 1).tolist()} mm gives a target grid of "
                       f"{n_ras[::-1].tolist()} voxels; the affine's units look wrong")
    origin = (lo + hi) / 2 - (n_ras - 1) / 2 * spacing_ras
    affine = np.zeros((4, 4))
    for t, w in enumerate((2, 1, 0)):  # index axis z, y, x -> world axis S, A, R
        affine[w, t] = spacing_ras[w]
    affine[:3, 3] = origin
    affine[3, 3] = 1.0
    return affine, tuple(int(n) for n in n_ras[::-1])


def same_grid(a: Image, b: Image) -> bool:
    if a.shape != b.shape:
        return False
    dist = np.linalg.norm(((a.affine - b.affine) @ _corners(a.shape).T)[:3], axis=0).max()
    return dist <= GRID_TOLERANCE_VOXELS * min(a.voxel_mm.min(), b.voxel_mm.min())


def overlap_fraction(pet: Image, ct: Image) -> float:
    """Fraction of the PET field of view (world box) inside the CT's world box."""
    plo, phi = world_box(pet.affine, pet.shape)
    clo, chi = world_box(ct.affine, ct.shape)
    inter = np.clip(np.minimum(phi, chi) - np.maximum(plo, clo), 0, None)
    return float(np.prod(inter) / np.prod(phi - plo))


def _axis_aligned_plan(m: np.ndarray, src_shape: Sequence[int], dst_shape: Sequence[int]):
    """For a (z, y, x) -> (i, j, k) map that is a signed permutation plus scaling:
    the source view and 1-D scale/offset that make the residual map diagonal.

    Returns None for an oblique map, "empty" when no target voxel centre lies inside
    the source, or (src_slices, perm, flips, scale, offset, dst_slices): the source
    sub-box to read, the axis order/flips that line it up with the target, and the
    target sub-box whose voxel centres lie inside source voxels (the rest is fill).
    """
    a = m[:3, :3]
    perm = [int(s) for s in np.argmax(np.abs(a), axis=0)]  # target axis t <- source axis perm[t]
    if sorted(perm) != [0, 1, 2]:
        return None
    for t in range(3):
        for s in range(3):
            if s != perm[t] and abs(a[s, t]) * dst_shape[t] > OBLIQUE_TOLERANCE_VOXELS:
                return None
    src_slices, flips, scale, offset, dst_slices = [slice(None)] * 3, [], [], [], []
    for t in range(3):
        s, k, b, n_src = perm[t], a[perm[t], t], m[perm[t], 3], src_shape[perm[t]]
        c = k * np.arange(dst_shape[t]) + b  # source coordinate of each target index
        inside = np.nonzero((c >= -0.5 - 1e-6) & (c <= n_src - 0.5 + 1e-6))[0]
        if inside.size == 0:
            return "empty"
        d_lo, d_hi = int(inside[0]), int(inside[-1]) + 1
        c_lo, c_hi = sorted((c[d_lo], c[d_hi - 1]))
        s_lo = max(0, int(math.floor(c_lo)))
        s_hi = min(n_src, int(math.floor(c_hi)) + 2)  # linear interpolation reads floor(c) + 1
        src_slices[s] = slice(s_lo, s_hi)
        if k < 0:  # read the axis reversed: coordinate (s_hi - 1) - c
            flips.append(t)
            scale.append(-k)
            offset.append((s_hi - 1 - b) - k * d_lo)
        else:
            scale.append(k)
            offset.append((b - s_lo) + k * d_lo)
        dst_slices.append(slice(d_lo, d_hi))
    return tuple(src_slices), perm, flips, np.array(scale), np.array(offset), tuple(dst_slices)


def _interpolate_axis(a: np.ndarray, axis: int, n_out: int, scale: float, offset: float,
                      order: int) -> np.ndarray:
    """1-D resampling of one axis: output index d reads source coordinate scale * d + offset,
    clamped to the source (scipy's mode 'nearest'). Order 1 returns float32.

    Works in slabs along another axis, so the temporaries stay around 256K voxels.
    """
    n = a.shape[axis]
    c = np.clip(scale * np.arange(n_out) + offset, 0, n - 1)
    shape_out = list(a.shape)
    shape_out[axis] = n_out
    if order == 0:
        out = np.empty(shape_out, dtype=a.dtype)
        return np.take(a, np.floor(c + 0.5).astype(np.intp), axis=axis, out=out)
    i0 = np.minimum(np.floor(c).astype(np.intp), max(n - 2, 0))
    i1 = np.minimum(i0 + 1, n - 1)
    w_shape = [1] * a.ndim
    w_shape[axis] = n_out
    w = (c - i0).astype(np.float32).reshape(w_shape)
    out = np.empty(shape_out, dtype=np.float32)
    slab_axis = max((d for d in range(a.ndim) if d != axis), key=lambda d: a.shape[d])
    per_index = max(1, out.size // shape_out[slab_axis])
    step = max(1, (1 << 18) // per_index)
    for start in range(0, a.shape[slab_axis], step):
        sl = tuple(slice(start, start + step) if d == slab_axis else slice(None)
                   for d in range(a.ndim))
        part = a[sl]
        lo = np.take(part, i0, axis=axis).astype(np.float32, copy=False)
        hi = np.take(part, i1, axis=axis).astype(np.float32, copy=False)
        hi -= lo  # lo + w * (hi - lo)
        hi *= w
        hi += lo
        out[sl] = hi
    return out


def resample(image: Image, raw: np.ndarray, dst_affine: np.ndarray, dst_shape: Sequence[int], *,
             order: int, fill: float, dtype=np.float32) -> np.ndarray:
    """Resample `raw` (the stored voxels of `image`) onto a (z, y, x) grid, in `dtype`.

    The image's scl_slope/scl_inter are applied to the result (float outputs only);
    `fill` is in output units.
    """
    m = np.linalg.inv(image.affine) @ dst_affine  # target (z, y, x, 1) -> source (i, j, k, 1)
    scaled = (image.slope, image.inter) != (1.0, 0.0) and np.dtype(dtype).kind == "f"
    plan = _axis_aligned_plan(m, raw.shape, dst_shape)
    if plan == "empty":
        return np.full(tuple(dst_shape), fill, dtype=dtype)
    if plan is None:  # oblique: the full matrix; 'constant' fills beyond the outer voxel centres
        out = np.empty(tuple(dst_shape), dtype=dtype)
        cval = (fill - image.inter) / image.slope if scaled else fill
        ndi.affine_transform(raw, m[:3, :3], m[:3, 3], output=out, order=order,
                             mode="constant", cval=cval)
    else:
        # Trilinear interpolation on a diagonal map is separable: three 1-D passes over
        # a reordered/flipped view of the needed sub-box, shrinking axes first so the
        # intermediates stay small. ~10x faster than scipy's zoom path, same values.
        src_slices, perm, flips, scale, offset, dst_slices = plan
        view = raw[src_slices].transpose(perm)
        for t in flips:
            view = np.flip(view, axis=t)
        if view.dtype == np.float64:
            view = view.astype(np.float32)
        sub = [sl.stop - sl.start for sl in dst_slices]
        for t in sorted(range(3), key=lambda t: sub[t] / view.shape[t]):
            view = _interpolate_axis(view, t, sub[t], scale[t], offset[t], order)
        if all(sl == slice(0, n) for sl, n in zip(dst_slices, dst_shape)):
            out = view.astype(dtype, copy=False)
        else:
            out = np.full(tuple(dst_shape), fill if not scaled else (fill - image.inter) / image.slope,
                          dtype=dtype)
            out[dst_slices] = view
        del view
    if scaled:
        out *= np.asarray(image.slope, dtype=dtype)
        out += np.asarray(image.inter, dtype=dtype)
    return out


# ---------------------------------------------------------------------------
# Body crop, statistics, lesions

def _bincount_slabs(labels: np.ndarray, minlength: int) -> np.ndarray:
    """np.bincount over a big integer array, a few million voxels at a time (bounded memory)."""
    counts = np.zeros(minlength, dtype=np.int64)
    flat = labels.reshape(-1)
    step = 1 << 22
    for start in range(0, flat.size, step):
        counts += np.bincount(flat[start:start + step], minlength=minlength)[:minlength]
    return counts


def body_box(ct: np.ndarray) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Bounding box (padded by BODY_PAD) of the largest component of CT > -500 HU,
    and the body mask inside that box; None when no voxel is above the threshold."""
    labels, count = ndi.label(ct > BODY_THRESHOLD_HU)
    if count == 0:
        return None
    sizes = _bincount_slabs(labels, count + 1)
    body = int(np.argmax(sizes[1:])) + 1
    found = ndi.find_objects(labels, max_label=body)[body - 1]
    box = tuple(slice(max(0, sl.start - BODY_PAD), min(n, sl.stop + BODY_PAD))
                for sl, n in zip(found, ct.shape))
    return box, labels[box] == body


def _histogram16(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted distinct values as float64, counts) of an int16 or float16 array, exactly."""
    bits = values.reshape(-1).view(np.uint16)
    counts = _bincount_slabs(bits, 1 << 16)
    codes = np.arange(1 << 16, dtype=np.uint16)
    vals = (codes.view(np.int16) if values.dtype == np.int16 else codes.view(np.float16))
    keep = counts > 0
    vals, counts = vals[keep].astype(np.float64), counts[keep]
    order = np.argsort(vals, kind="stable")
    return vals[order], counts[order]


def summarize(values: np.ndarray, sample: bool = False) -> dict:
    """n, mean, std, min, max, p00_5, p99_5 (numpy 'linear') of an int16/float16 array,
    plus, with `sample`, <= SAMPLE_SIZE values at evenly spaced ranks."""
    vals, counts = _histogram16(values)
    n = int(counts.sum())
    if n == 0:
        return {"n": 0}
    cum = np.cumsum(counts)

    def ranked(r: np.ndarray) -> np.ndarray:  # the value of 0-based rank r in sorted order
        return vals[np.searchsorted(cum, r, side="right")]

    def percentile(q: float) -> float:
        pos = (n - 1) * q / 100.0
        lo = math.floor(pos)
        a, b = ranked(np.array([lo, min(lo + 1, n - 1)]))
        return float(a + (b - a) * (pos - lo))

    mean = float((vals * counts).sum() / n)
    out = {
        "n": n,
        "mean": mean,
        "std": float(math.sqrt(max(0.0, ((vals - mean) ** 2 * counts).sum() / n))),
        "min": float(vals[0]),
        "max": float(vals[-1]),
        "p00_5": percentile(0.5),
        "p99_5": percentile(99.5),
    }
    if sample:
        ranks = np.round(np.linspace(0, n - 1, min(SAMPLE_SIZE, n))).astype(np.int64)
        out["sample"] = [int(v) for v in ranked(ranks)]
    return out


def lesion_index(seg: np.ndarray) -> list[dict]:
    """Connected components (18-connectivity) of a 0/1 (z, y, x) mask."""
    labels, count = ndi.label(seg, structure=LESION_STRUCTURE)
    if count == 0:
        return []
    coords = np.nonzero(labels)  # only the foreground: small
    ids = labels[coords]
    voxels = np.bincount(ids, minlength=count + 1)[1:]
    sums = [np.bincount(ids, weights=c, minlength=count + 1)[1:] for c in coords]
    return [{"bbox_lo": [s.start for s in sl], "bbox_hi": [s.stop for s in sl],
             "voxels": int(voxels[n]), "centroid_zyx": [float(c[n] / voxels[n]) for c in sums]}
            for n, sl in enumerate(ndi.find_objects(labels))]


def _source_components(mask: np.ndarray) -> int:
    """Lesion count of a label on its own grid (labelled inside its bounding box only)."""
    found = ndi.find_objects(mask.view(np.uint8))
    if not found or found[0] is None:
        return 0
    return int(ndi.label(mask[found[0]], structure=LESION_STRUCTURE)[1])


def _label_mask(seg: Image, raw: np.ndarray, warnings: list[str]) -> np.ndarray:
    """The stored label as a boolean lesion mask; rejects fractional or negative values."""
    if (seg.slope, seg.inter) != (1.0, 0.0):
        raw = raw.astype(np.float32) * np.float32(seg.slope) + np.float32(seg.inter)
    lo, hi = raw.min(), raw.max()
    if lo < 0:
        raise seg.fail(f"has negative label values (min {lo}); expected 0/1")
    if raw.dtype.kind == "f" and np.any(raw != np.floor(raw)):
        raise seg.fail("has fractional label values; expected integers 0/1 (a probability "
                       "map is not a label)")
    if hi > 1:
        warnings.append(f"label values up to {hi:g} binarized (> 0 = lesion)")
    return raw > 0


# ---------------------------------------------------------------------------

def _py(x):
    """numpy scalars -> Python numbers, for JSON."""
    return x.item() if isinstance(x, np.generic) else x


def _reference_zoom(image: Image, raw: np.ndarray, factors: Sequence[float], order: int) -> np.ndarray:
    """The reference's resampling of one image: SimpleITK's array order (k, j, i) of the
    stored voxels, scaled to float32, `scipy.ndimage.zoom` by `factors`."""
    values = raw.transpose(2, 1, 0).astype(np.float32)
    if (image.slope, image.inter) != (1.0, 0.0):
        values = values * np.float32(image.slope) + np.float32(image.inter)
    return ndi.zoom(values, factors, order=order)


def _reference_grid(pet: Image, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(zoom factors, (a, b, c, 1) index -> world affine) of the reference's PET grid: the
    file's voxel sizes rounded to whole millimetres, the array axes taken as (z, y, x)."""
    zooms = np.asarray(nib.load(pet.path).header.get_zooms()[:3], dtype=np.float64)  # ITK's spacing
    rounded = np.round(zooms)
    if np.any(rounded == 0):
        raise pet.fail(f"voxel size {zooms.tolist()} mm rounds to 0 mm: the reference preset "
                       "cannot resample it")
    factors = rounded[::-1] / np.asarray(spacing_zyx, dtype=np.float64)
    n_in = np.array(pet.shape[::-1], dtype=np.float64)
    n_out = np.array([int(round(n * f)) for n, f in zip(n_in, factors)], dtype=np.float64)
    # zoom's grid_mode=False maps output index o to input index o * (n_in - 1) / (n_out - 1)
    step = np.where(n_out > 1, (n_in - 1) / np.maximum(n_out - 1, 1), 0.0)
    affine = pet.affine[:, [2, 1, 0, 3]] @ np.diag([*step, 1.0])
    return factors, affine


def harmonize(spec: CaseSpec, spacing_zyx: Sequence[float] = DEFAULT_SPACING_ZYX, *,
              max_voxels: int = DEFAULT_MAX_VOXELS, plausibility: dict[str, str] | None = None,
              preset: str = "canonical") -> tuple[dict[str, np.ndarray], dict]:
    """Harmonize one case: (arrays {"pet", "ct"[, "seg"]}, manifest record without `bytes`).

    Raises CaseError (a PetctError) naming the case and the file for every bad input.
    Images are read one at a time and freed when resampled, to bound memory.
    `max_voxels` caps each image's header-claimed size; `plausibility` gives the level of
    each check in preprocessing/plausibility.py; None runs none of them. `petct preprocess`
    and `petct predict` always pass their --plausibility levels (all errors by default;
    predict turns the CT checks off when the PET stands in for a missing CT).
    `preset` is PRESETS' "canonical" (the module doc) or "reference" (the authors' code).
    """
    if preset not in PRESETS:
        raise PetctError(f"preset {preset!r}: expected one of {', '.join(PRESETS)}")
    if spec.error:
        raise CaseError(spec.id, spec.error, spec.error_file)
    warnings = list(spec.warnings)
    levels = dict.fromkeys(checks.CHECKS, "off") if plausibility is None else plausibility
    pet = open_image(spec.pet, "PET", spec.id, max_voxels)
    ct = open_image(spec.ct, "CT", spec.id, max_voxels)
    seg = open_image(spec.seg, "SEG", spec.id, max_voxels) if spec.seg else None
    for img in (pet, ct, seg):
        if img is not None:
            checks.report(checks.voxel_size(img), levels, img.fail, warnings)
    if seg is not None and not same_grid(pet, seg):
        raise seg.fail(f"grid (shape {list(seg.shape)}, axes {seg.geometry()['axcodes']}) does "
                       f"not match the PET grid (shape {list(pet.shape)}, axes "
                       f"{pet.geometry()['axcodes']}) within {GRID_TOLERANCE_VOXELS} voxel")
    coverage = overlap_fraction(pet, ct)
    if coverage <= 0:
        raise ct.fail("does not overlap the PET in world space (check the affines)")
    if coverage < 0.5:
        warnings.append(f"CT covers only {coverage:.0%} of the PET field of view")
    if preset == "reference":
        if not same_grid(pet, ct):
            raise ct.fail("is not on the PET grid: the reference preset resizes the CT array to "
                          "the PET's, which needs the CT resampled to the PET (AutoPET's CTres)")
        factors, grid_affine = _reference_grid(pet, spacing_zyx)
    else:
        grid_affine, grid_shape = target_grid(pet, spacing_zyx)

    # CT on the whole target grid (the body crop needs it), then crop.
    raw = ct.read()
    checks.report(checks.ct_values(ct, raw, levels), levels, ct.fail, warnings)
    if preset == "reference":
        ct_full = _reference_zoom(ct, raw, factors, order=1)
    else:
        ct_full = resample(ct, raw, grid_affine, grid_shape, order=1, fill=CT_FILL_HU)
    del raw
    found = body_box(ct_full)
    if found is None:
        raise ct.fail(f"gives an empty body mask: no CT voxel above {BODY_THRESHOLD_HU:g} HU inside the PET "
                      f"field of view")
    box, body_mask = found
    ct_box = np.rint(ct_full[box])
    del ct_full
    ct_box = np.clip(ct_box, -32768, 32767, out=ct_box).astype(np.int16)
    lo = np.array([sl.start for sl in box], dtype=np.float64)
    affine = grid_affine.copy()
    affine[:3, 3] = grid_affine[:3, :3] @ lo + grid_affine[:3, 3]
    shape = tuple(int(n) for n in ct_box.shape)

    raw = pet.read()
    checks.report(checks.pet_values(pet, raw, levels), levels, pet.fail, warnings)
    if preset == "reference":
        pet32 = _reference_zoom(pet, raw, factors, order=1)[box]
    else:
        pet32 = resample(pet, raw, affine, shape, order=1, fill=PET_FILL)
    del raw
    pet_max = float(pet32.max())
    if pet_max > FLOAT16_MAX or float(pet32.min()) < -FLOAT16_MAX:
        raise pet.fail(f"values up to {pet_max:.4g} exceed float16: this looks like Bq/mL, "
                       f"not SUV; provide the SUV image")
    if pet_max > SUV_SUSPECT_MAX:
        warnings.append(f"PET max {pet_max:.4g} looks like Bq/mL rather than SUV")
    pet16 = pet32.astype(np.float16)
    del pet32
    arrays = {"pet": pet16, "ct": ct_box}

    lesions, lesions_source, ct_foreground = [], 0, None
    if seg is not None:
        mask = _label_mask(seg, seg.read(), warnings)
        lesions_source = _source_components(mask)
        if preset == "reference":
            seg8 = ndi.zoom(mask.view(np.uint8).transpose(2, 1, 0), factors, order=0)[box]
        else:
            seg8 = resample(seg, mask.view(np.uint8), affine, shape, order=0, fill=0, dtype=np.uint8)
        del mask
        arrays["seg"] = seg8
        lesions = lesion_index(seg8)
        if lesions:
            ct_foreground = summarize(ct_box[seg8 > 0], sample=True)
        if len(lesions) < lesions_source:
            warnings.append(f"{lesions_source - len(lesions)} of {lesions_source} lesions lost "
                            f"to resampling or cropping")

    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    face_lo = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    face_hi = affine @ np.array([n - 0.5 for n in shape] + [1.0])
    paths = {"pet": pet.path, "ct": ct.path, "seg": seg.path if seg else None}
    record = {
        "id": spec.id,
        "patient_id": spec.patient_id,
        "cohort": spec.cohort,
        "shape_zyx": list(shape),
        "spacing_zyx": [float(s) for s in spacing_zyx],
        "affine_zyx": [[float(v) for v in row] for row in affine],
        "arrays": list(arrays),
        "has_label": seg is not None,
        "sources": paths,
        "source_sha256": {k: (sha256(p) if p else None) for k, p in paths.items()},
        "source_geometry": {k: img.geometry() for k, img in (("pet", pet), ("ct", ct), ("seg", seg))
                            if img is not None},
        "crop_box_world_mm": {"lo": [float(v) for v in face_lo[:3]],
                              "hi": [float(v) for v in face_hi[:3]]},
        "ct_coverage": round(coverage, 4),
        "stats": {
            "pet": summarize(pet16),
            "ct": summarize(ct_box),
            "ct_foreground": ct_foreground,
            "ct_body": summarize(ct_box[body_mask], sample=True),
        },
        "lesions": lesions,
        "lesion_count": len(lesions),
        "lesion_count_source": lesions_source,
        "lesion_volume_ml": sum(les["voxels"] for les in lesions) * voxel_ml,
        "warnings": warnings,
        "preset": preset,
        "preprocessing_version": PREPROCESSING_VERSION,
    }
    return arrays, _jsonable(record)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return _py(obj)
