"""Where-baselines of `medssl bench grounding`: the organ masks a grounding model searches, replaced by
- `TrueOrgans`: the study's own label map (the oracle: the best any organ head could do);
- `LabelAtlas`: a training-label atlas without registration: for each organ, how often each place of the
  normalised body box (`medssl.data.body`) belongs to it over the labelled training volumes; a test volume's
  organ is where its body-box coordinates make that organ the most frequent class.
Both give {organ: (D, H, W) bool} on the organ head's grid, for `evaluate.evaluate(..., where=...)`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medssl.data.body import body_coordinates
from medssl.data.manifest import Manifest
from medssl.data.volumes import whole_volume_pipeline
from medssl.downstream.grounding.infer import GroundedImage, Grounder

ATLAS_BINS = 24


def _label_on_head_grid(grounder: Grounder, image: Path, label: Path) -> np.ndarray:
    pipeline = whole_volume_pipeline(grounder.hu_prep, with_label=True)
    return pipeline({"image": str(image), "label": str(label)})["label"][0].numpy().round().astype(np.int64)


class TrueOrgans:
    """where(grounded, image, label) -> the label map's organs on the head's grid."""

    def __init__(self, grounder: Grounder):
        self.grounder = grounder

    def __call__(self, grounded: GroundedImage, image: Path, label: Path | None) -> dict[str, np.ndarray] | None:
        if label is None:
            return None
        labels = _label_on_head_grid(self.grounder, image, label)
        return {name: labels == value for value, name in self.grounder.head.classes.items()
                if name in grounded.evidence.masks}


def _bins(mask: np.ndarray) -> np.ndarray:
    """Each voxel's cell (X, Y, Z) in an ATLAS_BINS^3 grid over the body box of `mask`."""
    coords = body_coordinates(mask.astype(np.float32), mask=mask)
    return np.clip((coords * ATLAS_BINS).astype(np.int64), 0, ATLAS_BINS - 1)


class LabelAtlas:
    """Organ frequencies over the labelled training volumes in normalised body-box cells."""

    def __init__(self, grounder: Grounder, counts: np.ndarray):
        self.grounder, self.counts = grounder, counts  # (K, B, B, B)

    @classmethod
    def fit(cls, grounder: Grounder, volumes: list[tuple[Path, Path]]) -> LabelAtlas:
        """volumes: (image, label map) pairs, read on the head's grid."""
        classes = grounder.head.classes
        counts = np.zeros((max(classes) + 1, *(ATLAS_BINS,) * 3))
        for image, label in volumes:
            labels = _label_on_head_grid(grounder, image, label)
            body = labels > 0
            cells = _bins(body)
            for value in classes:
                inside = body & (labels == value)
                np.add.at(counts[value], tuple(c[inside] for c in cells), 1)
        return cls(grounder, counts)

    def __call__(self, grounded: GroundedImage, image: Path, label: Path | None) -> dict[str, np.ndarray]:
        body = grounded.evidence.body
        cells = _bins(body)
        most = self.counts.argmax(axis=0)[cells[0], cells[1], cells[2]]
        return {name: body & (most == value) for value, name in self.grounder.head.classes.items()
                if name in grounded.evidence.masks}


def volume_pairs(entries: list[dict], manifest: Manifest) -> list[tuple[Path, Path]]:
    """(image, label) paths of `manifest_volume_entries` dicts (absolute paths)."""
    return [(Path(e["image"]), Path(e["label"])) for e in entries]
