"""Training data of the finding scorer, from (volume, report) pairs only: bags of organ voxels.

`report_bags(report, organs)`: the report's findings section parsed statement by statement
(`medssl.text.query.parse_query`): a finding that names one organ and a kind is a *positive* bag (that organ
holds a finding of that kind, of the stated size, at the stated places); an organ that a normal or negated
statement names is *normal*. Findings naming no organ, several organs or no kind are left out, and counted.

`build_bags`: per study, its positive bags, and per normal organ one *negative* bag per kind seen in that
organ in training (at the kind's median stated size, no place). Lesion masks, boxes and points are never
read: a bag is an organ's voxels, which the organ head finds.

`MILBatches`: item i, drawn from (seed, i): `bags_per_step` bags, half positive and half negative when both
exist, each as (phi (n, F), prior (n,), k, kind index, label); the organ voxels are read from a mapping
(`voxel_store.OrganVoxelStore` in training: from disk, a few at a time).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from medssl.downstream.grounding.features import OrganVoxels
from medssl.downstream.grounding.scorer import as_prior, ball_voxels
from medssl.errors import UserError
from medssl.seeding import numpy_generator
from medssl.text.query import ConceptMatcher, parse_query
from medssl.text.statements import split_statements


@dataclass(frozen=True)
class StatedFinding:
    """A positive statement of a report: organ label, kind, stated size (mm or None), places."""

    organ: str
    kind: str
    size_mm: float | None
    places: tuple[str, ...]


@dataclass
class ReportBags:
    """What a report says, for training: its findings, the organs it calls normal, statements left out."""

    findings: list[StatedFinding]
    normal: list[str]
    skipped: int


def findings_statements(report: str) -> list[str]:
    """The statements of the report's findings section (every statement when it has none)."""
    statements = split_statements(report)
    chosen = [s.text for s in statements if s.section == "findings"]
    return chosen or [s.text for s in statements]


def report_bags(report: str, organs: tuple[str, ...], matcher: ConceptMatcher | None = None) -> ReportBags:
    """Positive findings and normal organs of a report (module docstring)."""
    findings, normal, skipped = [], [], 0
    for text in findings_statements(report):
        try:
            query = parse_query(text, organs, matcher)
        except UserError:  # a statement naming nothing the model knows teaches nothing
            skipped += 1
            continue
        if query.statement in ("negated", "normal"):
            normal += [o for o in query.organs if o not in normal]
        elif len(query.organs) == 1 and query.kind not in (None, "lesion"):
            findings.append(StatedFinding(query.organs[0], query.kind, query.size_mm, query.locations))
        else:
            skipped += 1
    stated = {f.organ for f in findings}
    return ReportBags(findings, [o for o in normal if o not in stated], skipped)


@dataclass(frozen=True)
class Bag:
    """One training bag: study index, organ, kind, size, places, label (1 positive, 0 negative)."""

    study: int
    organ: str
    kind: str
    size_mm: float | None
    places: tuple[str, ...]
    label: int


def kinds_seen(reports: list[ReportBags]) -> tuple[dict[str, list[str]], dict[str, float]]:
    """({organ: kinds stated in it}, {kind: median stated size mm}) over the training reports."""
    by_organ: dict[str, set[str]] = defaultdict(set)
    sizes: dict[str, list[float]] = defaultdict(list)
    for report in reports:
        for finding in report.findings:
            by_organ[finding.organ].add(finding.kind)
            if finding.size_mm is not None:
                sizes[finding.kind].append(finding.size_mm)
    kinds = {kind for found in by_organ.values() for kind in found}
    return ({organ: sorted(found) for organ, found in sorted(by_organ.items())},
            {kind: float(np.median(sizes[kind])) if sizes[kind] else 15.0 for kind in sorted(kinds)})


def build_bags(reports: list[ReportBags], by_organ: dict[str, list[str]], median_size: dict[str, float]) -> list[Bag]:
    """Positive bags of every stated finding, negative bags of every normal organ x kind seen there."""
    bags = []
    for study, report in enumerate(reports):
        bags += [Bag(study, f.organ, f.kind, f.size_mm, f.places, 1) for f in report.findings]
        bags += [Bag(study, organ, kind, median_size[kind], (), 0) for organ in report.normal
                 for kind in by_organ.get(organ, [])]
    return bags


class MILBatches(Dataset):
    """Item i: {"phi": [ (n_b, F) ], "prior": [ (n_b,) ], "k": [int], "kind": (B,) long, "organ": [str],
    "label": (B,) float}
    for `bags_per_step` bags drawn from (seed, i). `voxels[(study, organ)]`: that organ's OrganVoxels (read when a
    step needs it); a bag whose organ `voxels` lacks (the organ head did not find it) is left out."""

    def __init__(self, bags: list[Bag], voxels: Mapping[tuple[int, str], OrganVoxels], kinds: list[str], *,
                 bags_per_step: int, seed: int):
        self.bags = [b for b in bags if (b.study, b.organ) in voxels]
        self.voxels, self.kinds, self.bags_per_step, self.seed = voxels, kinds, bags_per_step, seed
        self.sides = [[k for k, b in enumerate(self.bags) if b.label == value] for value in (1, 0)]

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict:
        rng = numpy_generator(self.seed, i)
        sides = [side for side in self.sides if side]
        per_side = max(1, self.bags_per_step // len(sides))
        picks = [int(k) for side in sides for k in rng.choice(side, size=min(per_side, len(side)), replace=False)]
        phis, priors, ks, kinds, organs, labels = [], [], [], [], [], []
        for k in picks:
            bag = self.bags[k]
            organ = self.voxels[(bag.study, bag.organ)]
            phis.append(organ.phi(bag.size_mm))
            priors.append(as_prior(organ.prior(bag.places)))
            ks.append(ball_voxels(bag.size_mm or 15.0, organ.spacing))
            kinds.append(self.kinds.index(bag.kind))
            organs.append(bag.organ)
            labels.append(float(bag.label))
        return {"phi": phis, "prior": priors, "k": ks, "kind": torch.tensor(kinds), "organ": organs,
                "label": torch.tensor(labels)}
