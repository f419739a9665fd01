"""Training augmentations for fine-tuning (all off by default, as the reference's MAE).

Spatial: a rotation about z (in the axial y-x plane, in millimetres) and an isotropic
scaling are drawn here and applied by `patches` as ONE affine resample of a read region
slightly larger than the patch, so a rotation pulls in real voxels wherever the volume
has data. Mirroring (per axis) is applied to the finished patch.

Intensity (after normalization, per channel, nnU-Net v2's recipe): Gaussian noise,
multiplicative brightness, contrast (range preserving), gamma (stats retaining). They
touch only voxels that come from the volume: padding stays exactly 0.

Every random number comes from the per-record `np.random.Generator` that Grain's
`random_map` hands over, drawn in a fixed order, so a pipeline is deterministic.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from petct_jax.errors import PetctError


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities (per patch; intensity ones per channel) and ranges."""
    flip_prob: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mirror z, y, x
    rotate_prob: float = 0.0
    rotate_max_deg: float = 15.0  # about z, uniform in [-max, max]
    scale_prob: float = 0.0
    scale_range: tuple[float, float] = (0.85, 1.25)  # > 1 magnifies (zoom in)
    noise_prob: float = 0.0
    noise_std_range: tuple[float, float] = (0.0, 0.1)
    brightness_prob: float = 0.0
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_prob: float = 0.0
    contrast_range: tuple[float, float] = (0.75, 1.25)
    gamma_prob: float = 0.0
    gamma_range: tuple[float, float] = (0.7, 1.5)

    @classmethod
    def finetune(cls) -> "AugmentConfig":
        """nnU-Net v2's probabilities, with the rotation and scaling this project uses."""
        return cls(flip_prob=(0.5, 0.5, 0.5), rotate_prob=0.2, scale_prob=0.2, noise_prob=0.1,
                   brightness_prob=0.15, contrast_prob=0.15, gamma_prob=0.3)

    @classmethod
    def from_config(cls, cfg: Any) -> "AugmentConfig":
        if cfg is None:
            return cls()
        if isinstance(cfg, AugmentConfig):
            return cfg
        items = _as_dict(cfg)
        unknown = set(items) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise PetctError(f"data.augment: unknown setting(s) {sorted(unknown)}")
        items = {k: tuple(v) if isinstance(v, list) else v for k, v in items.items()}
        return cls(**items)

    def __post_init__(self):
        probs = [*self.flip_prob, self.rotate_prob, self.scale_prob, self.noise_prob,
                 self.brightness_prob, self.contrast_prob, self.gamma_prob]
        if len(self.flip_prob) != 3 or any(not 0.0 <= p <= 1.0 for p in probs):
            raise PetctError(f"data.augment: probabilities must lie in [0, 1] (flip_prob has 3): {self}")
        if self.scale_range[0] <= 0:
            raise PetctError(f"data.augment.scale_range={self.scale_range}: must be positive")


def _as_dict(cfg: Any) -> dict:
    if hasattr(cfg, "to_dict"):  # ml_collections.ConfigDict
        return dict(cfg.to_dict())
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise PetctError(f"expected a mapping or ConfigDict, got {type(cfg).__name__}")


def draw_spatial(cfg: AugmentConfig, rng: np.random.Generator) -> tuple[float, float]:
    """(scale, rotation about z in radians); (1.0, 0.0) when not drawn."""
    scale = 1.0
    if cfg.scale_prob and rng.random() < cfg.scale_prob:
        scale = float(rng.uniform(*cfg.scale_range))
    angle = 0.0
    if cfg.rotate_prob and rng.random() < cfg.rotate_prob:
        angle = math.radians(float(rng.uniform(-cfg.rotate_max_deg, cfg.rotate_max_deg)))
    return scale, angle


def draw_flips(cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, ...]:
    """Axes (0 = z, 1 = y, 2 = x) to mirror."""
    return tuple(a for a, p in enumerate(cfg.flip_prob) if p and rng.random() < p)


def intensity(x: np.ndarray, where: Any, cfg: AugmentConfig, rng: np.random.Generator) -> None:
    """Augment one normalized channel in place, only at `x[where]` (a box or a mask)."""
    if not (cfg.noise_prob or cfg.brightness_prob or cfg.contrast_prob or cfg.gamma_prob):
        return
    v = x[where]
    if v.size == 0:
        return
    if cfg.noise_prob and rng.random() < cfg.noise_prob:
        sigma = np.float32(rng.uniform(*cfg.noise_std_range))
        v = v + sigma * rng.standard_normal(v.shape, dtype=np.float32)
    if cfg.brightness_prob and rng.random() < cfg.brightness_prob:
        v = v * np.float32(rng.uniform(*cfg.brightness_range))
    if cfg.contrast_prob and rng.random() < cfg.contrast_prob:
        factor = np.float32(rng.uniform(*cfg.contrast_range))
        lo, hi, mean = v.min(), v.max(), v.mean(dtype=np.float64)
        v = np.clip((v - np.float32(mean)) * factor + np.float32(mean), lo, hi)
    if cfg.gamma_prob and rng.random() < cfg.gamma_prob:
        gamma = float(rng.uniform(*cfg.gamma_range))
        mean, std = v.mean(dtype=np.float64), v.std(dtype=np.float64)
        lo, hi = v.min(), v.max()
        if hi > lo:
            v = np.power((v - lo) / (hi - lo), np.float32(gamma)) * (hi - lo) + lo
            new_std = v.std(dtype=np.float64)
            v = (v - np.float32(v.mean(dtype=np.float64))) * np.float32(std / max(new_std, 1e-8)) \
                + np.float32(mean)
    x[where] = v.astype(np.float32, copy=False)
