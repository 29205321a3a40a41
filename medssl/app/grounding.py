"""The app's one door to grounding: everything the app asks of `medssl.downstream.grounding` goes through here.

It uses only `Grounder.load(path)`, `grounder.prepare(image_path)` (-> a prepared image),
`grounder.ground(prepared, phrases)` (-> results with phrase, kind, score, groundable, reason, map01 (X, Y, Z)
in [0, 1] on the input grid or None, peak_voxel, peak_mm, warnings), `grounder.sidecar(result, image_path)`
(-> `MapSidecar`) and the map files of `medssl.explain.maps`, plus `grounder.region_masks(prepared)` (the organ
head's organs and their parts, for region statistics) and `grounder.untrained()` (the control: the same organ
head with the finding scorer at its untrained start), behind `region_masks` and `load_grounder(control=True)`.

No streamlit here: `app.py` caches these calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medssl.errors import UserError
from medssl.explain.maps import MapSidecar, raw_values, read_map, read_sidecar

CONTROL = "untrained scorer"


@dataclass(eq=False)
class Grounding:
    """One phrase over one case: a map (`map01` on the image's grid, with its sidecar) or a not-groundable
    result (no map; its score, the threshold and the reason). Every field comes from the grounding result
    and its `MapSidecar`."""

    phrase: str
    kind: str
    groundable: bool
    score: float
    threshold: float
    reason: str
    map01: np.ndarray | None
    sidecar: MapSidecar
    warnings: list[str] = field(default_factory=list)

    @property
    def checkpoint(self) -> str:
        return self.sidecar.checkpoint

    def raw(self, values: np.ndarray | float) -> np.ndarray:
        """Map values (in [0, 1]) back on the model's own scale (e.g. cosine similarity)."""
        return raw_values(self.sidecar.rescaling, values)

    @property
    def notes(self) -> list[str]:
        """Every note on how the input was prepared (resampling, intensities, ...), groundable or not."""
        extra = self.sidecar.extra or {}
        stored = [str(n) for n in extra.get("warnings", []) or [] if str(n) not in self.warnings]
        return list(self.warnings) + stored


def load_grounder(path: str | Path, control: bool = False) -> Any:
    """A `Grounder` from a grounding checkpoint; with `control`, the same organ head with the finding scorer at
    its untrained start (a map that does not change means training from reports added nothing there)."""
    from medssl.downstream.grounding.infer import Grounder

    grounder = Grounder.load(path)
    return grounder.untrained() if control else grounder


def prepare(grounder: Any, image: str | Path, modality: str | None = None) -> Any:
    """The image prepared once for many phrases (`grounder.prepare`)."""
    return grounder.prepare(image, modality=modality)


def ground_phrase(grounder: Any, prepared: Any, phrase: str) -> Grounding:
    """One phrase with a loaded grounder over a prepared image."""
    result = grounder.ground(prepared, [phrase])[0]
    sidecar = grounder.sidecar(result, prepared.path)
    return Grounding(result.phrase, result.kind, result.groundable, float(result.score), sidecar.score_threshold,
                     result.reason, result.map01, sidecar, list(result.warnings))


def region_masks(grounder: Any, prepared: Any) -> dict[str, np.ndarray]:
    """{region name: bool (X, Y, Z)}: the organs the organ head finds and their halves ("liver / upper")."""
    return grounder.region_masks(prepared)


def stored_grounding(row: dict, like: Any) -> Grounding:
    """A result of a `ground infer` output: its map on the grid of `like` (a Volume), or its sidecar alone."""
    if row.get("map"):
        loaded = read_map(row["map"], like=like)
        sidecar, map01 = loaded.sidecar, loaded.array
    elif row.get("sidecar"):
        sidecar, map01 = read_sidecar(row["sidecar"]), None
    else:
        raise UserError(f"results.json: phrase {row.get('phrase')!r} lists neither a map nor a sidecar")
    extra = sidecar.extra or {}
    return Grounding(sidecar.phrase, str(extra.get("statement_kind", row.get("kind", ""))), sidecar.groundable,
                     sidecar.score, sidecar.score_threshold, str(extra.get("reason", row.get("reason", ""))), map01,
                     sidecar, [str(w) for w in row.get("warnings", []) or []])
