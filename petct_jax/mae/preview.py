"""PNG previews of MAE reconstructions: what the network sees, returns, and should return."""

from __future__ import annotations

import io

import numpy as np
from etils import epath


def save_reconstruction_preview(path: str, image: np.ndarray, mask: np.ndarray,
                                recon: np.ndarray, channel_names=("PET", "CT"),
                                title: str = "") -> None:
    """One figure per sample 0: per channel, a coronal slice of masked input /
    reconstruction / target, and for PET also maximum-intensity projections.

    Arrays are (Z, Y, X, C), normalized intensities.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masked = image * (1 - mask)
    y = image.shape[1] // 2
    rows = []
    for c, name in enumerate(channel_names[: image.shape[-1]]):
        # Coronal slice, head at the top (z runs inferior -> superior in the store).
        cut = lambda a: a[::-1, y, :, c]
        rows.append((f"{name} slice", [cut(masked), cut(recon), cut(image)]))
        if name == "PET":
            mip = lambda a: a[::-1, :, :, c].max(axis=1)
            rows.append((f"{name} MIP", [mip(masked), mip(recon), mip(image)]))
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.2 * len(rows)), squeeze=False)
    for r, (label, panels) in enumerate(rows):
        lo, hi = np.percentile(panels[2], [1, 99.5])
        for col, (panel, head) in enumerate(zip(panels, ("masked input", "reconstruction", "target"))):
            ax = axes[r, col]
            ax.imshow(panel, cmap="gray_r" if "PET" in label else "gray", vmin=lo, vmax=hi,
                      aspect="auto", interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(head)
            if col == 0:
                ax.set_ylabel(label)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    # Through epath, so previews land in gs:// workdirs too.
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(buffer.getvalue())
