"""Scoring a grounding model on held-out patients (lesion masks, label maps and lesion metadata are read
here only), and calibrating its not-groundable threshold (from reports alone).

Per study of the split, one image pass, then the cosine maps of:
- lesion phrases: the report's own sentence ("seen" phrasing) and the grammar's held-out phrasings
  (`medssl.data.synthetic.reports.GRAMMAR`, never used by training reports), scored against the
  lesion's mask: pointing game, mass inside (of the map's positive part, cosine > 0), mIoU over
  thresholds 0.1..0.5 (on the cosine), signed CNR, Dice of the map > 0.5 (cosine > 0), hit = Dice >= 0.1
  (`medssl.viewer.stats`), split by phrasing and by lesion size (< 15, 15-25, > 25 mm);
- organ prompts: the grammar's organ prompts ("seen" wording) and held-out ones, against the organ's
  label map (zero-shot: training never grounds organs by themselves);
- the not-groundable call: findings of the study (must be groundable), its negated / normal statements
  and findings absent from it (other patients' lesions of another organ and kind) (must not be);
- phrase swap: the map of a random other study's finding instead of the true one: its mean absolute
  change inside the body, and its pointing game on the true target (it should not find it).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.data import io
from medssl.data.manifest import Manifest
from medssl.data.synthetic.reports import GRAMMAR, finding_sentence
from medssl.data.volumes import whole_volume_pipeline
from medssl.downstream.grounding.data import Statements, content_words, jaccard
from medssl.downstream.grounding.graph import best_region_dice
from medssl.downstream.grounding.infer import Grounder
from medssl.seeding import numpy_generator
from medssl.viewer.stats import grounding_metrics, mass_inside

SIZE_BINS = ((0, 15, "small"), (15, 25, "medium"), (25, 10**6, "large"))
METRICS = ("pointing_game", "mass_inside", "miou", "cnr", "dice", "hit")


@dataclass
class EvalStudy:
    """A labelled study of the split: paths and the manifest's report and lesion metadata."""

    image: Path
    label: Path | None
    lesion_mask: Path | None
    patient_id: str
    report: str
    lesions: list[dict]


def eval_studies(manifest: Manifest, split: str) -> list[EvalStudy]:
    """Studies of `split` with an image and a report (lesion masks and labels where the manifest has them)."""
    out = []
    for entry in manifest.split(split):
        if entry.image and entry.report:
            out.append(EvalStudy(manifest.path(entry.image), manifest.path(entry.label) if entry.label else None,
                                 manifest.path(entry.lesion_mask) if entry.lesion_mask else None, entry.patient_id,
                                 entry.report, list(getattr(entry, "lesions", None) or [])))
    return out


def _size_bin(size: float) -> str:
    return next(name for low, high, name in SIZE_BINS if low <= size < high)


def _metrics(map01: np.ndarray, target: np.ndarray) -> dict[str, float]:
    values = grounding_metrics(map01, target).to_dict()
    values["mass_inside"] = mass_inside(np.clip(2 * map01 - 1, 0, 1), target)
    return {k: float(v) for k, v in values.items()}


def evaluate(grounder: Grounder, manifest: Manifest, split: str, *, absent_per_study: int = 3,
             swap_per_study: int = 2, seed: int = 0) -> tuple[dict[str, float], list[dict]]:
    """(flat summary, one row per scored phrase). Rows: group, phrasing, size bin, metrics, score, groundable."""
    studies = eval_studies(manifest, split)
    rng = numpy_generator(seed, 4242)
    all_lesions = [(k, lesion) for k, study in enumerate(studies) for lesion in study.lesions]
    rows: list[dict] = []
    swap_changes, organ_dice = [], defaultdict(list)
    for k, study in enumerate(studies):
        grounded = grounder.prepare(study.image)
        present = {(lesion["organ"], lesion["kind"]) for lesion in study.lesions}
        items = []  # (phrase, row template, target or None)
        lesion_mask = io.read_volume(study.lesion_mask, label=True).array if study.lesion_mask else None
        labels = io.read_volume(study.label, label=True).array if study.label else None
        for lesion in study.lesions:
            target = lesion_mask == lesion["label"] if lesion_mask is not None else None
            base = {"group": "lesion", "size_bin": _size_bin(lesion["size_mm"]), "should_ground": True}
            items.append((lesion["sentence"], {**base, "phrasing": "seen"}, target))
            for template in GRAMMAR.held_out_finding_templates:
                items.append((finding_sentence(lesion, template), {**base, "phrasing": "held-out"}, target))
        if labels is not None:
            for value, name in (manifest.labels or {}).items():
                organ = labels == int(value)
                if name not in GRAMMAR.organ_text or not organ.any():
                    continue
                text = GRAMMAR.organ_text[name]
                for phrasing, templates in (("seen", GRAMMAR.organ_prompts),
                                            ("held-out", GRAMMAR.held_out_organ_prompts)):
                    for template in templates:
                        items.append((template.format(organ=text), {"group": "organ", "phrasing": phrasing,
                                                                    "should_ground": True, "organ": name}, organ))
        for statement in Statements.of(study.report).negated:
            items.append((statement, {"group": "negated", "should_ground": False}, None))
        others = [lesion for j, lesion in all_lesions if studies[j].patient_id != study.patient_id
                  and (lesion["organ"], lesion["kind"]) not in present]
        for index in rng.permutation(len(others))[:absent_per_study]:
            items.append((others[index]["sentence"], {"group": "absent", "should_ground": False}, None))
        swaps = []
        for lesion in study.lesions[:swap_per_study]:
            pool = [other for j, other in all_lesions
                    if j != k and (other["organ"], other["kind"]) != (lesion["organ"], lesion["kind"])]
            if pool:
                swaps.append((lesion, pool[int(rng.integers(len(pool)))]))
        for lesion, other in swaps:
            target = lesion_mask == lesion["label"] if lesion_mask is not None else None
            row = {"group": "swap", "should_ground": None, "true_phrase": lesion["sentence"]}
            items.append((other["sentence"], row, target))
        phrases = [phrase for phrase, _, _ in items]
        cosine, scores = grounder.cosine_maps(grounded, phrases)
        body = grounded.body.numpy()
        by_phrase = {phrase: index for index, phrase in enumerate(phrases)}
        for index, (phrase, row, target) in enumerate(items):
            map01 = np.clip((cosine[index] + 1) / 2, 0, 1)
            groundable = grounder.decide(phrase, float(scores[index]))[1]
            record = {**row, "study": study.image.name, "phrase": phrase, "score": float(scores[index]),
                      "groundable": groundable}
            if target is not None and target.any():
                record.update(_metrics(map01, target))
            if row["group"] == "swap":
                true_map = np.clip((cosine[by_phrase[row["true_phrase"]]] + 1) / 2, 0, 1)
                change = float(np.abs(map01 - true_map)[_input_body(body, map01.shape)].mean())
                record["map_change"] = change
                swap_changes.append(change)
            rows.append(record)
        if labels is not None and grounder.graph is not None:
            for organ, value in _graph_organ_dice(grounder, grounded, study, manifest).items():
                organ_dice[organ].append(value)
    summary = summarise(rows)
    summary["swap_mean_map_change"] = float(np.mean(swap_changes)) if swap_changes else float("nan")
    for organ, values in organ_dice.items():
        summary[f"graph_dice_{organ}"] = float(np.mean(values))
    if organ_dice:
        summary["graph_dice_mean"] = float(np.mean([np.mean(v) for v in organ_dice.values()]))
    summary["studies"] = len(studies)
    return summary, rows


def _input_body(body: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """The body mask on the input grid when the shapes agree, else every voxel (maps are on the input grid)."""
    return body if body.shape == tuple(shape) else np.ones(shape, bool)


def _graph_organ_dice(grounder: Grounder, grounded, study: EvalStudy, manifest: Manifest) -> dict[str, float]:
    """Dice of the best-matching organ-level graph region per organ, on the feature grid."""
    pipeline = whole_volume_pipeline(grounder.prep, with_label=True)
    label = pipeline({"image": str(study.image), "label": str(study.label)})["label"][0].numpy().round().astype(int)
    nodes = grounder.graph_nodes(grounded)
    stride = grounder.model.feature_stride
    grid = label[stride // 2::stride, stride // 2::stride, stride // 2::stride][tuple(slice(0, n) for n in nodes.shape)]
    return best_region_dice(nodes, grid, {int(k): v for k, v in (manifest.labels or {}).items()})


def summarise(rows: list[dict]) -> dict[str, float]:
    """Flat summary: metric means per group / phrasing / size bin; not-groundable accuracy per category."""
    summary: dict[str, float] = {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["group"] in ("lesion", "organ") and "dice" in row:
            groups[f"{row['group']}_{row['phrasing'].replace('-', '')}"].append(row)
            groups[f"{row['group']}_all"].append(row)
            if row["group"] == "lesion":
                groups[f"lesion_{row['phrasing'].replace('-', '')}_{row['size_bin']}"].append(row)
        if row["group"] == "swap" and "pointing_game" in row:
            groups["swap"].append(row)
    for name, members in groups.items():
        summary[f"{name}_n"] = len(members)
        for metric in METRICS:
            values = [m[metric] for m in members if np.isfinite(m[metric])]
            summary[f"{name}_{metric}"] = float(np.mean(values)) if values else float("nan")
    decided = [r for r in rows if r["should_ground"] is not None and r["group"] in ("lesion", "negated", "absent")]
    for name in ("lesion", "negated", "absent"):
        members = [r for r in decided if r["group"] == name]
        if members:
            summary[f"groundable_call_{name}_accuracy"] = float(np.mean([r["groundable"] == r["should_ground"]
                                                                         for r in members]))
    if decided:
        summary["groundable_call_accuracy"] = float(np.mean([r["groundable"] == r["should_ground"] for r in decided]))
    return summary


def calibrate(grounder: Grounder, studies: list[tuple[Path, str, str]], *, per_study: int = 3,
              seed: int = 0) -> dict[str, float]:
    """The not-groundable threshold from reports alone: peak cosines of each study's own findings
    (should ground) against findings of other patients' reports that its report does not state in much the
    same words (should not); the threshold maximises the balanced accuracy. studies: (image, patient, report)."""
    rng = numpy_generator(seed, 777)
    parsed = [(image, patient, Statements.of(report).findings) for image, patient, report in studies]
    own, absent = [], []
    for image, patient, findings in parsed:
        words = [content_words(f) for f in findings]
        candidates = [f for other_image, other_patient, other in parsed if other_patient != patient for f in other
                      if all(jaccard(content_words(f), w) < 0.5 for w in words)]
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[:per_study]]
        if not findings and not chosen:
            continue
        grounded = grounder.prepare(image)
        _, scores = grounder.cosine_maps(grounded, findings + chosen)
        own += scores[:len(findings)].tolist()
        absent += scores[len(findings):].tolist()
    if not own or not absent:
        return {"threshold": 0.0, "balanced_accuracy": float("nan"), "positives": len(own), "negatives": len(absent)}
    candidates = np.unique(np.concatenate([own, absent]))
    cuts = np.concatenate([[candidates[0] - 1e-6], (candidates[1:] + candidates[:-1]) / 2, [candidates[-1] + 1e-6]])
    own_a, absent_a = np.asarray(own), np.asarray(absent)
    accuracy = [0.5 * ((own_a >= t).mean() + (absent_a < t).mean()) for t in cuts]
    best = int(np.argmax(accuracy))
    return {"threshold": float(cuts[best]), "balanced_accuracy": float(accuracy[best]), "positives": len(own),
            "negatives": len(absent)}
