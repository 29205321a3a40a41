"""The app's one door to grounding: everything the app asks of `medssl.downstream.grounding` goes through here.

It uses only `Grounder.load(path)`, `grounder.prepare(image_path)` (-> a prepared image),
`grounder.ground(prepared, phrases)` (-> results with phrase, kind, score, groundable, reason, map01 (X, Y, Z)
in [0, 1] on the input grid or None, peak_voxel, peak_mm, warnings), `grounder.sidecar(result, image_path)`
(-> `MapSidecar`, whose `extra` carries the parsed query, the organ searched and its volume) and the map files of
`medssl.explain.maps`, plus `grounder.region_masks(prepared)` (the organ
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
from medssl.explain.maps import MapSidecar, ProbabilityScale, describe_scale, raw_values, read_map, read_sidecar

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
    warnings: list[str] = field(default_factory=list)  # how the phrase was read and searched
    preprocessing: list[str] = field(default_factory=list)  # how the image was prepared (orientation, spacing)

    @property
    def checkpoint(self) -> str:
        return self.sidecar.checkpoint

    def raw(self, values: np.ndarray | float) -> np.ndarray:
        """Map values (in [0, 1]) back on the model's own scale (a probability: the same numbers)."""
        return raw_values(self.sidecar.rescaling, values)

    @property
    def query(self) -> dict[str, Any] | None:
        """The parsed query (organs, kind, locations, size_mm, mapped words with their confidence, unknown words),
        as the sidecar stores it; None for results written before queries existed."""
        query = (self.sidecar.extra or {}).get("query")
        return query if isinstance(query, dict) else None

    @property
    def organ(self) -> str | None:
        """The organ searched (the answer among several), or None."""
        return (self.sidecar.extra or {}).get("organ") or None

    @property
    def organ_ml(self) -> float:
        """The predicted volume of the organ searched, in millilitres (0 when unknown)."""
        return float((self.sidecar.extra or {}).get("organ_ml") or 0.0)

    @property
    def organ_voxels(self) -> int:
        """... in voxels of the organ head's grid."""
        return int((self.sidecar.extra or {}).get("organ_voxels") or 0)

    @property
    def is_probability(self) -> bool:
        """The map's raw values are probabilities with a stated meaning (the same colours mean the same thing in
        every map)."""
        return isinstance(self.sidecar.raw_scale, ProbabilityScale)

    @property
    def meaning(self) -> str:
        """What the map's values are (the sidecar's stated meaning, or its raw scale and rescaling)."""
        return describe_scale(self.sidecar.raw_scale, self.sidecar.rescaling)

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
                     result.reason, result.map01, sidecar, list(result.warnings), list(prepared.warnings))


def region_masks(grounder: Any, prepared: Any) -> dict[str, np.ndarray]:
    """{region name: bool (X, Y, Z)}: the organs the organ head finds and their halves ("liver / upper")."""
    return grounder.region_masks(prepared)


def stored_grounding(row: dict, like: Any) -> Grounding:
    """A result of a `ground infer` output: its map on the grid of `like` (a Volume), or its sidecar alone; the
    output's notes on the image are `row["preprocessing"]`."""
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
                     sidecar, [str(w) for w in extra.get("warnings", []) or []],
                     [str(w) for w in row.get("preprocessing", []) or []])
