"""Studies for grounding (volume + report, nothing else) and the training micro-batches.

A `Study` holds the whole preprocessed volume as the model's 4-channel input (intensity, normalised RAS
body coordinates) and its report split into statements (`medssl.text.statements`): finding statements
are the phrases to ground, negated and normal statements name nothing present. Labels, lesion masks and
lesion metadata are never read here.

Micro-batch i of `GroundingBatches` is drawn from (seed, i): B distinct studies, each cropped to the crop
size (at a random offset when the volume is larger), their first `max_phrases` findings and negated
statements, and the exclusion masks of the contrastive objectives (same patient; finding statements in
much the same words, Jaccard >= 0.5 of their content words; reports alike, Jaccard >= 0.8).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.data.body import body_mask, ras_body_coordinates
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.volumes import volume_dataset, whole_volume_pipeline
from medssl.errors import UserError
from medssl.seeding import numpy_generator
from medssl.text.statements import split_statements, stated_size_mm

_STOPWORDS = frozenset("a an the of in on at its is are with and or to by for from as be this that there measuring "
                       "seen part shows mm cm".split())
_WORD = re.compile(r"[a-z][a-z-]*")


def content_words(text: str) -> frozenset[str]:
    """Lower-case words of a statement without stop words and numbers."""
    return frozenset(w for w in _WORD.findall(text.lower()) if w not in _STOPWORDS)


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


@dataclass
class Statements:
    """A report's statements: findings (to ground), negated / normal ones, and the findings text."""

    findings: list[str]
    negated: list[str]
    text: str  # the findings section, as the report's global text

    @classmethod
    def of(cls, report: str) -> Statements:
        statements = [s for s in split_statements(report) if s.section == "findings"]
        return cls([s.text for s in statements if s.kind == "finding"],
                   [s.text for s in statements if s.kind != "finding"], " ".join(s.text for s in statements))


@dataclass
class Study:
    """One volume and its report. x (4, D, H, W) float32: intensity in [0, 1] and RAS body coordinates."""

    name: str
    patient_id: str
    study_id: str
    image_path: Path
    x: torch.Tensor
    body: torch.Tensor  # (D, H, W) bool, where phrases are grounded (`model_input`)
    spacing: tuple[float, float, float]
    report: str
    statements: Statements
    nodes: list[np.ndarray] = field(default_factory=list)  # anatomy-graph node ids per level, feature grid
    features: torch.Tensor | None = None  # (C, d, h, w) float16 frozen-encoder features (frozen encoder only)


def model_input(image: torch.Tensor, orientation: str, edge_margin: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A preprocessed image (1, D, H, W) in [0, 1] -> the model's input (4, D, H, W) and the region where
    phrases are grounded (D, H, W) bool: the body mask (`medssl.data.body`: the largest component, holes
    such as the lungs filled) without the `edge_margin` voxels next to the array's faces, where a body cut
    by the field of view meets the convolutions' zero padding (features there fingerprint a volume)."""
    volume = torch.as_tensor(image)[0].numpy()
    mask = body_mask(volume)
    coords = torch.from_numpy(ras_body_coordinates(volume, orientation, mask=mask))
    region = torch.from_numpy(mask)
    if edge_margin:
        inner = torch.zeros_like(region)
        inner[(slice(edge_margin, -edge_margin),) * 3] = True
        region &= inner
    return torch.cat([torch.as_tensor(image).float(), coords]), region


def grid_body(body: torch.Tensor, stride: int) -> torch.Tensor:
    """The body mask on the feature grid: (D, H, W) -> (D / stride, ...) bool (more than half inside)."""
    return torch.nn.functional.avg_pool3d(body[None, None].float(), stride)[0, 0] > 0.5


def load_studies(entries: list[dict], reports: dict[str, str], prep: VolumePreprocessing, *, edge_margin: int,
                 cache_dir: Path | None = None, cache_max_gib: float | None = None) -> list[Study]:
    """Preprocess the images of `entries` (dicts of `manifest_volume_entries`) and parse their reports
    (`reports`: image path -> report text). An entry without a report is a UserError naming it."""
    missing = [e["where"] for e in entries if not reports.get(e["image"], "").strip()]
    if missing:
        raise UserError(f"{len(missing)} volume(s) have no report to ground ({', '.join(missing[:5])}): grounding "
                        "trains on (volume, report) pairs")
    data = volume_dataset(entries, whole_volume_pipeline(prep), cache_dir=cache_dir, cache_max_gib=cache_max_gib)
    studies = []
    for entry, item in zip(entries, data):
        image = item["image"]
        x, body = model_input(image.as_tensor(), prep.orientation, edge_margin)
        studies.append(Study(Path(entry["image"]).name.split(".")[0], entry["patient_id"], entry["study_id"],
                             Path(entry["image"]), x, body, tuple(float(s) for s in image.pixdim),
                             reports[entry["image"]],
                             Statements.of(reports[entry["image"]])))
    return studies


class GroundingBatches(Dataset):
    """Item i: {"x": (B, 4, S, S, S) (or, when the studies carry frozen-encoder features, "features":
    (B, C, s, s, s) and "coords": (B, 3, s, s, s)), "positions": (B, 3, s, s, s) mm, "body": (B, s, s, s),
    "nodes": list of (B, s, s, s) per graph level, "phrases", "reports", "negated": lists of str, "owner" (P,),
    "stated_mm" (P,), "phrase_exclude" (P, B), "report_exclude" (B, B), "negated_owner" (Q,)}.
    S = crop size, s = S / stride."""

    def __init__(self, studies: list[Study], *, crop: tuple[int, int, int], stride: int, batch_size: int,
                 max_phrases: int, seed: int):
        if batch_size > len(studies):
            raise UserError(f"train.batch_size: {batch_size} volumes per step, the training split has {len(studies)}")
        self.studies, self.crop, self.stride = studies, tuple(crop), stride
        self.batch_size, self.max_phrases, self.seed = batch_size, max_phrases, seed
        self.words = [[content_words(p) for p in s.statements.findings[:max_phrases]] for s in studies]
        self.report_words = [content_words(s.statements.text) for s in studies]

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict:
        rng = numpy_generator(self.seed, i)
        picks = [int(k) for k in rng.choice(len(self.studies), size=self.batch_size, replace=False)]
        xs, features, coords, positions, bodies, nodes = [], [], [], [], [], []
        for k in picks:
            study = self.studies[k]
            offset = [int(rng.integers(0, (n - c) // self.stride + 1)) * self.stride
                      for n, c in zip(study.x.shape[1:], self.crop)]
            window = tuple(slice(o, o + c) for o, c in zip(offset, self.crop))
            grid = tuple(slice(o // self.stride, (o + c) // self.stride) for o, c in zip(offset, self.crop))
            if study.features is None:
                xs.append(study.x[(slice(None), *window)])
            else:
                features.append(study.features[(slice(None), *grid)])
                coords.append(torch.nn.functional.avg_pool3d(study.x[None, 1:4][(slice(None), slice(None), *window)],
                                                             self.stride)[0])
            nodes.append([torch.from_numpy(level[grid]) for level in study.nodes])
            bodies.append(grid_body(study.body[window], self.stride))
            axes = [(o + self.stride * torch.arange(c // self.stride) + (self.stride - 1) / 2) * sp
                    for o, c, sp in zip(offset, self.crop, study.spacing)]
            positions.append(torch.stack(torch.meshgrid(*axes, indexing="ij")).float())
        inputs = {"x": torch.stack(xs)} if xs else {"features": torch.stack(features), "coords": torch.stack(coords)}
        return {**inputs, "positions": torch.stack(positions), "body": torch.stack(bodies),
                "nodes": [torch.stack(level) for level in zip(*nodes)] if nodes and nodes[0] else [],
                **self._texts(picks)}

    def _texts(self, picks: list[int]) -> dict:
        phrases, owner, stated, words, negated, negated_owner = [], [], [], [], [], []
        for b, k in enumerate(picks):
            statements = self.studies[k].statements
            for text, w in zip(statements.findings[:self.max_phrases], self.words[k]):
                size = stated_size_mm(text)
                phrases.append(text)
                owner.append(b)
                stated.append(math.nan if size is None else size)
                words.append(w)
            negated += statements.negated[:self.max_phrases]
            negated_owner += [b] * len(statements.negated[:self.max_phrases])
        patients = [self.studies[k].patient_id for k in picks]
        same_patient = torch.tensor([[a == b for b in patients] for a in patients])
        alike = torch.tensor([[any(jaccard(w, v) >= 0.5 for v in self.words[k]) for k in picks] for w in words],
                             dtype=torch.bool).reshape(len(phrases), len(picks))
        owner_t = torch.tensor(owner, dtype=torch.long)
        reports_alike = torch.tensor([[jaccard(self.report_words[a], self.report_words[b]) >= 0.8 for b in picks]
                                      for a in picks])
        exclude = alike | same_patient[owner_t] if phrases else torch.zeros(0, len(picks), dtype=torch.bool)
        return {"phrases": phrases, "owner": owner_t, "stated_mm": torch.tensor(stated, dtype=torch.float32),
                "phrase_exclude": exclude,
                "reports": [self.studies[k].statements.text for k in picks],
                "report_exclude": same_patient | reports_alike,
                "negated": negated, "negated_owner": torch.tensor(negated_owner, dtype=torch.long)}
