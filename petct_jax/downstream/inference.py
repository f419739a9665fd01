"""Sliding-window inference over whole scans with one compiled network call, nnU-Net style.

    predict = make_predict_fn(model)              # jitted once per model and window batch shape
    logits = sliding_window_predict(predict, image, window=(96, 128, 128), num_classes=2,
                                    batch_windows=2, mirror=True)   # (Z, Y, X, 2) float32

What it does (nnU-Net v2's `predict_sliding_window_return_logits`, restated):

- Tiles: per axis, `n = ceil((size - window) / (window * (1 - overlap))) + 1` windows
  spread evenly, the first starting at 0 and the last ending at the volume's end
  (starts `round(i * (size - window) / (n - 1))`, numpy's round half to even). MONAI
  instead steps by `int(window * (1 - overlap))` and shifts only the last window back:
  the two agree when `size - window` is a multiple of the step.
- Volumes smaller than the window on an axis are zero-padded there (zero = the mean
  after per-scan z-scoring), centred (`diff // 2` before, the rest after, as nnU-Net's
  and MONAI's padding), and the result is cropped back.
- Each window's output is weighted by a Gaussian importance map (sigma = window / 8,
  centred on voxel `window // 2`, scipy's truncated sampled Gaussian, normalised to max 1,
  zeros replaced by the smallest non-zero value); the accumulated weighted outputs are
  divided by the accumulated weights. (MONAI's map is centred at `(window - 1) / 2`,
  untruncated and floored at 1e-3; `tests/test_inference.py` checks that MONAI given
  *this* map reproduces our result.)
- Mirroring test-time augmentation (`mirror=True`): the network also sees the window
  flipped along every non-empty subset of `mirror_axes` (7 combinations for 3 axes),
  each output is flipped back, and the 8 outputs are averaged *before* the Gaussian
  weighting. Whatever `predict_fn` returns is averaged: nnU-Net v2 averages logits, which
  is what `make_predict_fn` returns by default (`probabilities=True` averages softmax
  probabilities instead).

Compilation: `predict_fn` is only ever called on arrays of shape
`(batch_windows, *window, C)`; the last batch of a scan is filled up with repeats of its
first window whose outputs are dropped. The flips and the weighting are fixed-shape eager
ops. So one compiled network serves every scan size.

On the device: the padded scan goes to the device once; window extraction
(`dynamic_slice`) and the weighted accumulation (`dynamic_update_slice`, into a donated
buffer) are jitted, so nothing but the final cropped result comes back to the host, and
on an accelerator the host never touches window data. Memory: the scan, the accumulator
(`accumulate_dtype`, float32 by default; bfloat16 halves it for scans too large otherwise,
at ~3 significant digits) and at most two window batches in flight (the loop waits for the
batch before last before dispatching the next). The compiled helpers depend on the scan's
padded shape, so each new scan shape compiles two small programs (the network does not).

Devices: with `mesh` (a `jax.sharding.Mesh` with a `data` axis, and optionally `fsdp`,
as `petct_jax.train.mesh.make_mesh` builds), each window batch is placed with
`NamedSharding(mesh, P(("data", "fsdp")))`, i.e. split over the devices along the batch
axis, and the jitted network runs SPMD (`make_predict_fn(model, mesh=mesh)` replicates the
parameters on the mesh). `batch_windows` must then be a multiple of the number of devices
on those axes. Without a mesh, everything runs on the default device. Tested here on one
device (a 1-device mesh) and on 2 CPU devices in a subprocess.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from petct_jax.errors import PetctError

BATCH_AXES = ("data", "fsdp")


# ---------------------------------------------------------------- geometry


def tile_starts(size: int, window: int, overlap: float = 0.5) -> list[int]:
    """Window start offsets along one axis (nnU-Net placement); needs size >= window."""
    if size < window:
        raise PetctError(f"sliding window: axis of size {size} is smaller than the window {window} (pad first)")
    if not 0.0 <= overlap < 1.0:
        raise PetctError(f"sliding window: overlap must be in [0, 1), got {overlap}")
    step = window * (1.0 - overlap)
    n = int(math.ceil((size - window) / step)) + 1
    if n == 1:
        return [0]
    actual = (size - window) / (n - 1)
    return [int(np.round(actual * i)) for i in range(n)]


def tile_positions(shape: Sequence[int], window: Sequence[int], overlap: float = 0.5
                   ) -> list[tuple[int, ...]]:
    """All window start corners over a (padded) volume, in C order."""
    per_axis = [tile_starts(int(s), int(w), overlap) for s, w in zip(shape, window)]
    return list(itertools.product(*per_axis))


def gaussian_importance_map(window: Sequence[int], sigma_scale: float = 1.0 / 8.0) -> np.ndarray:
    """nnU-Net's Gaussian weights over a window: a unit impulse at `window // 2` blurred with
    sigma = window * sigma_scale (scipy's truncated Gaussian), divided by its maximum, zeros
    replaced by the smallest non-zero value. float32, shape `window`.

    Computed as the outer product of the 1D blurs, which is what the separable nD blur of
    an impulse is.
    """
    from scipy.ndimage import gaussian_filter1d

    g = np.ones((), np.float64)
    for w in window:
        delta = np.zeros(int(w))
        delta[int(w) // 2] = 1.0
        g = np.multiply.outer(g, gaussian_filter1d(delta, int(w) * sigma_scale, mode="constant", cval=0.0))
    g = g / g.max()
    if (g == 0).any():
        g[g == 0] = g[g > 0].min()
    return g.astype(np.float32)


def _pad_amounts(shape: Sequence[int], window: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for s, w in zip(shape, window):
        diff = max(int(w) - int(s), 0)
        out.append((diff // 2, diff - diff // 2))
    return out


def mirror_combinations(axes: Sequence[int] = (0, 1, 2)) -> list[tuple[int, ...]]:
    """The non-empty subsets of the spatial `axes` (7 for three axes), smallest first."""
    axes = tuple(axes)
    return [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]


# ---------------------------------------------------------------- inference


def _batch_sharding(mesh, batch_windows: int):
    from jax.sharding import NamedSharding, PartitionSpec as P

    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise PetctError(f"sliding window: the mesh has no 'data' axis (axes {mesh.axis_names})")
    n = math.prod(mesh.shape[a] for a in axes)
    if batch_windows % n:
        raise PetctError(f"sliding window: batch_windows={batch_windows} is not a multiple of the "
                         f"{n} devices on mesh axes {axes}")
    return NamedSharding(mesh, P(axes))


@functools.partial(jax.jit, static_argnums=2)
def _extract(image, starts, window):
    """The windows of `image` (Z, Y, X, C) at `starts` (n, 3): (n, *window, C)."""
    def one(start):
        return jax.lax.dynamic_slice(image, (*start, 0), (*window, image.shape[-1]))

    return jax.vmap(one)(starts)


@functools.partial(jax.jit, donate_argnums=0)
def _accumulate(acc, out, starts, n):
    """Add the first `n` window outputs `out` (b, *window, K) into `acc` at `starts`, in order."""
    def add(i, acc):
        corner = (starts[i, 0], starts[i, 1], starts[i, 2], 0)
        current = jax.lax.dynamic_slice(acc, corner, out.shape[1:])
        return jax.lax.dynamic_update_slice(acc, current + out[i].astype(acc.dtype), corner)

    return jax.lax.fori_loop(0, n, add, acc)


@jax.jit
def _normalize(acc, norm):
    return acc.astype(norm.dtype) / norm[..., None]


def sliding_window_predict(predict_fn: Callable[[Any], Any], image: np.ndarray, window: Sequence[int], *,
                           num_classes: int, overlap: float = 0.5, batch_windows: int = 2,
                           mirror: bool = False, mirror_axes: Sequence[int] = (0, 1, 2),
                           use_gaussian: bool = True, sigma_scale: float = 1.0 / 8.0,
                           mesh: Any = None, accumulate_dtype: Any = np.float32,
                           progress: bool = False) -> np.ndarray:
    """Predict a whole scan `image` (Z, Y, X, C) window by window; returns (Z, Y, X, num_classes)
    float32: the Gaussian-weighted average of `predict_fn`'s outputs (logits, if it returns
    logits). `predict_fn(windows)` maps (batch_windows, *window, C) to
    (batch_windows, *window, num_classes); it is called with that one shape only.
    `mirror_axes` are spatial axes (0 = z, 1 = y, 2 = x). See the module doc.
    """
    image = np.asarray(image)
    window = tuple(int(w) for w in window)
    if image.ndim != 4:
        raise PetctError(f"sliding window: image must be (Z, Y, X, C), got shape {image.shape}")
    if len(window) != 3 or min(window) < 1:
        raise PetctError(f"sliding window: window must be 3 positive sizes (z, y, x), got {window}")
    if batch_windows < 1:
        raise PetctError(f"sliding window: batch_windows must be >= 1, got {batch_windows}")
    if not set(mirror_axes) <= {0, 1, 2}:
        raise PetctError(f"sliding window: mirror_axes must be spatial axes 0, 1, 2; got {tuple(mirror_axes)}")
    if jnp.dtype(accumulate_dtype) not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise PetctError(f"sliding window: accumulate_dtype must be float32, bfloat16 or float16, "
                         f"got {accumulate_dtype}")
    image = image.astype(np.float32, copy=False)  # one input dtype: one compile

    shape = image.shape[:3]
    pads = _pad_amounts(shape, window)
    if any(p != (0, 0) for p in pads):
        image = np.pad(image, pads + [(0, 0)], mode="constant", constant_values=0)
    padded_shape = image.shape[:3]
    positions = tile_positions(padded_shape, window, overlap)
    weight = (gaussian_importance_map(window, sigma_scale) if use_gaussian
              else np.ones(window, np.float32))

    sharding = _batch_sharding(mesh, batch_windows) if mesh is not None else None
    weight_dev = jnp.asarray(weight)[None, ..., None]
    combos = mirror_combinations(mirror_axes) if mirror else []

    def launch(x):
        out = predict_fn(x)
        if out.shape != (batch_windows, *window, num_classes):
            raise PetctError(f"sliding window: predict_fn returned shape {tuple(out.shape)}, expected "
                             f"{(batch_windows, *window, num_classes)} (check num_classes)")
        out = out.astype(jnp.float32)
        for axes in combos:  # flip in, predict, flip back; axis + 1 skips the batch axis
            ax = tuple(a + 1 for a in axes)
            out = out + jnp.flip(predict_fn(jnp.flip(x, ax)).astype(jnp.float32), ax)
        if combos:
            out = out / (len(combos) + 1)
        return out * weight_dev

    norm = np.zeros(padded_shape, np.float32)
    for start in positions:  # the weights do not depend on the predictions
        norm[tuple(slice(s, s + w) for s, w in zip(start, window))] += weight

    from tqdm import tqdm

    image_dev = jax.device_put(image)
    acc = jnp.zeros((*padded_shape, num_classes), accumulate_dtype)
    all_starts = np.asarray(positions, np.int32)
    n_batches = -(-len(positions) // batch_windows)
    bar = tqdm(total=n_batches, unit="batch", desc="sliding window", disable=not progress, leave=False)
    in_flight = []
    for b in range(n_batches):
        starts = all_starts[b * batch_windows:(b + 1) * batch_windows]
        n = len(starts)
        if n < batch_windows:  # fill up with repeats of the first window; their outputs are dropped
            starts = np.concatenate([starts, np.repeat(starts[:1], batch_windows - n, axis=0)])
        x = _extract(image_dev, starts, window)
        if sharding is not None:
            x = jax.device_put(x, sharding)
        out = launch(x)
        acc = _accumulate(acc, out, starts, n)
        in_flight.append(out)
        if len(in_flight) > 2:  # bound the device memory of window batches queued ahead
            in_flight.pop(0).block_until_ready()
        bar.update()
    bar.close()

    result = _normalize(acc, jnp.asarray(norm))
    crop = tuple(slice(lo, lo + s) for (lo, _), s in zip(pads, shape))
    return np.ascontiguousarray(np.asarray(result)[crop])


def make_predict_fn(model: Any, *, probabilities: bool = False, mesh: Any = None
                    ) -> Callable[[Any], Any]:
    """A jitted `windows -> float32 logits` (or softmax probabilities) for an NNX model.

    The model is split once (`nnx.split`); the jitted pure function merges it back inside
    the trace and calls it in inference mode (the models' default `deterministic=True`).
    A model returning a list (deep supervision) contributes its first, full-resolution
    output. One compile per window batch shape. With `mesh`, the model state is
    replicated over the mesh so that window batches sharded over it can be fed.
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    if mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec as P
        state = jax.device_put(state, NamedSharding(mesh, P()))

    @jax.jit
    def apply(state, windows):
        out = nnx.merge(graphdef, state)(windows)
        if isinstance(out, (list, tuple)):
            out = out[0]
        out = out.astype(jnp.float32)
        return jax.nn.softmax(out, axis=-1) if probabilities else out

    def predict(windows):
        return apply(state, windows)

    predict.apply = apply  # the jitted function, for inspection (e.g. its cache size)
    return predict
