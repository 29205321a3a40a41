"""Figures that the heads write (e.g. segmentation's `test_overlay.png`), drawn with the viewer's
orientation-true slicing and compositing, so a figure and the app show the same thing."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from medssl.atomic import atomic_path
from medssl.display.overlay import overlay_labels
from medssl.display.slicing import plane_slice
from medssl.display.windowing import apply_window, percentile_window


@dataclass
class LabelledCase:
    """A volume with a predicted and a true label map, all (X, Y, Z) on the grid of `affine` (4, 4)."""

    name: str
    image: np.ndarray
    affine: np.ndarray
    pred: np.ndarray
    truth: np.ndarray


def write_label_overlay(path: str | os.PathLike, cases: list[LabelledCase], *, fractions=(0.25, 0.5, 0.75)) -> None:
    """PNG: one row per case, axial slices at `fractions` of the labelled extent (radiological view), the
    image windowed to its 1-99 % percentiles with the prediction filled in colour and the truth outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(cases), len(fractions), figsize=(3 * len(fractions), 3 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        window = percentile_window(case.image, 1.0, 99.0)
        labelled = np.flatnonzero(case.truth.any(axis=(0, 1)))  # z indices of the labelled slices (array axis 2)
        for ax, q in zip(row, fractions):
            k = int(labelled[int(q * (len(labelled) - 1))]) if len(labelled) else case.image.shape[2] // 2
            index = (0, 0, k)
            grey = apply_window(plane_slice((case.image, case.affine), "axial", index).image, *window)
            pred = plane_slice((case.pred.astype(np.int64), case.affine), "axial", index).image
            truth = plane_slice((case.truth.astype(np.int64), case.affine), "axial", index).image
            shown = overlay_labels(grey, pred, opacity=0.45)
            outline = overlay_labels(np.zeros_like(grey), truth, opacity=1.0, mode="outline")
            edges = outline.any(axis=2)
            shown[edges] = 255
            ax.imshow(shown, interpolation="nearest")
            ax.set_title(f"{case.name} axial slice {k} (radiological)", fontsize=8)
            ax.axis("off")
    fig.suptitle("prediction (colour) over the image; ground truth outlines (white)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)
