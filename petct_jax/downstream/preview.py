"""PNG overlays of segmentations: PET MIP and CT/PET slices with ground-truth and predicted contours."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

GT_COLOR, PRED_COLOR = "lime", "red"


def _contour(ax, mask: np.ndarray, color: str) -> None:
    if mask.any() and not mask.all():
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.0)


def save_segmentation_preview(path: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
                              channel_names: Sequence[str] = ("PET", "CT"), title: str = "") -> None:
    """One figure: the PET maximum-intensity projection (coronal, over y) with the projected
    masks, and a coronal slice of every channel through the row with the most ground truth
    (else prediction), ground truth in green and prediction in red. Head at the top.

    image (Z, Y, X, C) normalized; label and pred (Z, Y, X) binary.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, pred = np.asarray(label) > 0, np.asarray(pred) > 0
    names = [n.upper() for n in channel_names][: image.shape[-1]]
    weight = label.sum(axis=(0, 2)) if label.any() else pred.sum(axis=(0, 2))
    y = int(np.argmax(weight)) if weight.any() else image.shape[1] // 2
    flip = lambda a: a[::-1]  # noqa: E731  (z runs inferior -> superior in the store)
    panels = []
    if "PET" in names:
        c = names.index("PET")
        panels.append(("PET MIP", flip(image[..., c].max(axis=1)), flip(label.any(axis=1)),
                       flip(pred.any(axis=1)), "gray_r"))
    for c, name in enumerate(names):
        panels.append((f"{name} slice y={y}", flip(image[:, y, :, c]), flip(label[:, y]),
                       flip(pred[:, y]), "gray_r" if name == "PET" else "gray"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 4.2), squeeze=False)
    for ax, (head, img, gt, pr, cmap) in zip(axes[0], panels):
        lo, hi = np.percentile(img, [1, 99.5])
        ax.imshow(img, cmap=cmap, vmin=lo, vmax=max(hi, lo + 1e-6), aspect="auto",
                  interpolation="nearest")
        _contour(ax, gt, GT_COLOR)
        _contour(ax, pr, PRED_COLOR)
        ax.set_title(head, fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle((title + "  " if title else "") + "ground truth: green, prediction: red", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
