"""Scoring a grounding model on held-out patients (lesion masks, label maps and lesion metadata are read here
only), and calibrating its not-found threshold (from reports alone).

Per study of the split, one pass of the organ head, then the maps of:
- lesion phrases in three wordings: the report's own sentence ("report"), the grammar's held-out templates
  ("held-out": other sentence structures, the same words) and the unseen wordings
  (`medssl.data.synthetic.wordings`: other words too), scored against the lesion's mask: pointing game,
  mass inside, mIoU, signed CNR, Dice of map > 0.5 and hit = Dice >= 0.1 (`metrics`); by kind, by organ and by
  size (< 15, 15-25, > 25 mm);
- organ prompts ("report": "liver", "the liver"; "held-out": "the whole liver", "liver region"; "unseen")
  against the organ's label map;
- the absent/present call: each lesion phrase (present) and findings of other patients asked of organs that
  hold no lesion in this study (absent: their report sentence, and the unseen absent templates), plus the
  negated and normal statements of the report (never groundable); balanced accuracy over present and absent;
- the phrase swap: another study's finding (another organ or kind) grounded instead of the true one: its mean
  absolute map change where either map marks a finding (> 0.5), and its pointing game on the true target (it
  should not find it);
- follow-up: each lesion of a patient's first study, phrased as its report said, grounded in the patient's
  next study and scored against the same lesion there (same organ and kind, nearest centre).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medssl.data import io
from medssl.data.manifest import Manifest
from medssl.data.synthetic.reports import GRAMMAR, finding_sentence
from medssl.data.synthetic.wordings import unseen_absent_sentences, unseen_finding_sentences, unseen_organ_prompts
from medssl.downstream.grounding.data import report_bags
from medssl.downstream.grounding.infer import GroundedImage, Grounder, PhraseResult
from medssl.downstream.grounding.metrics import grounding_metrics
from medssl.seeding import numpy_generator

Where = Callable[[GroundedImage, Path, Path | None], dict[str, np.ndarray] | None]
SIZE_BINS = ((0, 15, "small"), (15, 25, "medium"), (25, 10**6, "large"))
METRICS = ("pointing_game", "mass_inside", "miou", "cnr", "dice", "hit")
WORDINGS = ("report", "heldout", "unseen")
ABSENT_WORDING = {"report": "report", "heldout": "report", "unseen": "unseen"}


@dataclass
class EvalStudy:
    """A labelled study of the split: paths and the manifest's report and lesion metadata."""

    image: Path
    label: Path | None
    lesion_mask: Path | None
    patient_id: str
    study_id: str
    report: str
    lesions: list[dict]


def eval_studies(manifest: Manifest, split: str) -> list[EvalStudy]:
    """Studies of `split` with an image and a report (lesion masks and labels where the manifest has them)."""
    out = []
    for entry in manifest.split(split):
        if entry.image and entry.report:
            out.append(EvalStudy(manifest.path(entry.image), manifest.path(entry.label) if entry.label else None,
                                 manifest.path(entry.lesion_mask) if entry.lesion_mask else None, entry.patient_id,
                                 entry.study_id or "", entry.report, list(getattr(entry, "lesions", None) or [])))
    return out


def size_bin(size: float) -> str:
    return next(name for low, high, name in SIZE_BINS if low <= size < high)


def lesion_phrases(lesion: dict) -> list[tuple[str, str]]:
    """(wording, phrase) of a lesion: its report sentence, the held-out grammar and the unseen wordings."""
    out = [("report", lesion["sentence"])]
    out += [("heldout", finding_sentence(lesion, t)) for t in GRAMMAR.held_out_finding_templates]
    out += [("unseen", s) for s in unseen_finding_sentences(lesion)]
    return out


def organ_phrases(organ: str) -> list[tuple[str, str]]:
    """(wording, prompt) of a whole organ (label name)."""
    text = GRAMMAR.organ_text.get(organ)
    if text is None:
        return []
    return ([("report", t.format(organ=text)) for t in GRAMMAR.organ_prompts]
            + [("heldout", t.format(organ=text)) for t in GRAMMAR.held_out_organ_prompts]
            + [("unseen", p) for p in unseen_organ_prompts(organ)])


def _scored(result: PhraseResult, target: np.ndarray | None) -> dict:
    row = {"score": result.score, "groundable": result.groundable, "organ_searched": result.organ}
    if target is not None and target.any():
        if result.map01 is None:
            row.update({metric: 0.0 for metric in METRICS})
            row["cnr"] = float("nan")
        else:
            row.update({k: float(v) for k, v in grounding_metrics(result.map01, target).to_dict().items()})
    return row


def _same_lesion(lesion: dict, later: list[dict]) -> dict | None:
    """The lesion of a later study that is `lesion` (same organ and kind, nearest centre), or None."""
    candidates = [other for other in later if (other["organ"], other["kind"]) == (lesion["organ"], lesion["kind"])]
    if not candidates:
        return None
    centre = np.asarray(lesion["centre_mm"])
    return min(candidates, key=lambda other: float(np.linalg.norm(np.asarray(other["centre_mm"]) - centre)))


def evaluate(grounder: Grounder, manifest: Manifest, split: str, *, absent_per_study: int = 3,
             swap_per_study: int = 2, seed: int = 0, where: Where | None = None) -> tuple[dict[str, float], list[dict]]:
    """(flat summary, one row per scored phrase). Row: group, wording, kind, organ, size bin, metrics, score.
    where: organ masks to search instead of the organ head's (`baselines`)."""
    studies = eval_studies(manifest, split)
    rng = numpy_generator(seed, 4242)
    all_lesions = [(k, lesion) for k, study in enumerate(studies) for lesion in study.lesions]
    by_patient: dict[str, list[int]] = defaultdict(list)
    for k, study in enumerate(studies):
        by_patient[study.patient_id].append(k)
    rows: list[dict] = []
    swap_changes = []
    for k, study in enumerate(studies):
        grounded = _prepared(grounder, study, where)
        lesion_mask = io.read_volume(study.lesion_mask, label=True).array if study.lesion_mask else None
        labels = io.read_volume(study.label, label=True).array if study.label else None
        items: list[tuple[str, dict, np.ndarray | None]] = []
        for lesion in study.lesions:
            target = lesion_mask == lesion["label"] if lesion_mask is not None else None
            base = {"group": "lesion", "size_bin": size_bin(lesion["size_mm"]), "kind": lesion["kind"],
                    "organ": lesion["organ"], "should_ground": True}
            items += [(phrase, {**base, "wording": wording}, target) for wording, phrase in lesion_phrases(lesion)]
        if labels is not None:
            for value, name in (manifest.labels or {}).items():
                organ = labels == int(value)
                if organ.any():
                    items += [(phrase, {"group": "organ", "wording": wording, "organ": name, "should_ground": True},
                               organ) for wording, phrase in organ_phrases(name)]
        for text in _negated_statements(study.report):
            items.append((text, {"group": "negated", "should_ground": False}, None))
        lesion_organs = {lesion["organ"] for lesion in study.lesions}
        others = [lesion for j, lesion in all_lesions if studies[j].patient_id != study.patient_id
                  and lesion["organ"] not in lesion_organs]
        for index in rng.permutation(len(others))[:absent_per_study]:
            other = others[index]
            base = {"group": "absent", "should_ground": False, "kind": other["kind"], "organ": other["organ"]}
            items.append((other["sentence"], {**base, "wording": "report"}, None))
            unseen = unseen_absent_sentences(other["organ"], other["size_mm"])
            if unseen:
                items.append((unseen[int(rng.integers(len(unseen)))], {**base, "wording": "unseen"}, None))
        for lesion in study.lesions[:swap_per_study]:
            pool = [other for j, other in all_lesions
                    if j != k and (other["organ"], other["kind"]) != (lesion["organ"], lesion["kind"])]
            if pool:
                other = pool[int(rng.integers(len(pool)))]
                target = lesion_mask == lesion["label"] if lesion_mask is not None else None
                items.append((other["sentence"], {"group": "swap", "should_ground": None,
                                                  "true_phrase": lesion["sentence"]}, target))
        results = grounder.ground(grounded, [phrase for phrase, _, _ in items], strict=False, always_map=True)
        by_phrase = {phrase: result for (phrase, _, _), result in zip(items, results)}
        for (phrase, row, target), result in zip(items, results):
            record = {**row, "study": study.image.name, "phrase": phrase, **_scored(result, target)}
            if row["group"] == "swap":
                true = by_phrase[row["true_phrase"]]
                if true.map01 is not None:
                    swapped = result.map01 if result.map01 is not None else np.zeros_like(true.map01)
                    shown = (true.map01 > 0.5) | (swapped > 0.5)  # where either map marks a finding
                    record["map_change"] = float(np.abs(swapped - true.map01)[shown].mean()) if shown.any() else 0.0
                    swap_changes.append(record["map_change"])
            rows.append(record)
        rows += _follow_up(grounder, studies, by_patient, k, where)
    summary = summarise(rows)
    summary["swap_mean_map_change"] = float(np.mean(swap_changes)) if swap_changes else float("nan")
    summary["studies"] = len(studies)
    return summary, rows


def _negated_statements(report: str) -> list[str]:
    from medssl.downstream.grounding.data import findings_statements
    from medssl.text.statements import classify_statement

    return [s for s in findings_statements(report) if classify_statement(s) != "finding"]


def _prepared(grounder: Grounder, study: EvalStudy, where: Where | None) -> GroundedImage:
    grounded = grounder.prepare(study.image)
    masks = where(grounded, study.image, study.label) if where is not None else None
    if masks is not None:
        grounded.evidence.masks = masks
        grounded._organs.clear()
    return grounded


def _follow_up(grounder: Grounder, studies: list[EvalStudy], by_patient: dict[str, list[int]], k: int,
               where: Where | None) -> list[dict]:
    """Rows of the lesions of the study before `k` (same patient) grounded in study `k`."""
    study = studies[k]
    order = sorted(by_patient[study.patient_id], key=lambda j: studies[j].study_id)
    position = order.index(k)
    if position == 0 or study.lesion_mask is None:
        return []
    prior = studies[order[position - 1]]
    pairs = [(lesion, _same_lesion(lesion, study.lesions)) for lesion in prior.lesions]
    pairs = [(lesion, match) for lesion, match in pairs if match is not None]
    if not pairs:
        return []
    grounded = _prepared(grounder, study, where)
    mask = io.read_volume(study.lesion_mask, label=True).array
    results = grounder.ground(grounded, [lesion["sentence"] for lesion, _ in pairs], strict=False, always_map=True)
    return [{"group": "follow_up", "wording": "report", "should_ground": True, "kind": lesion["kind"],
             "organ": lesion["organ"], "size_bin": size_bin(match["size_mm"]), "study": study.image.name,
             "phrase": lesion["sentence"], **_scored(result, mask == match["label"])}
            for (lesion, match), result in zip(pairs, results)]


def _mean(members: list[dict], metric: str) -> float:
    values = [m[metric] for m in members if metric in m and np.isfinite(m[metric])]
    return float(np.mean(values)) if values else float("nan")


def summarise(rows: list[dict]) -> dict[str, float]:
    """Flat summary: metric means per group x wording, by kind / organ / size for lesions; the calls."""
    summary: dict[str, float] = {}
    groups: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        if row["group"] in ("lesion", "organ", "follow_up") and "dice" in row:
            groups[f"{row['group']}_{row['wording']}"].append(row)
            groups[f"{row['group']}_all"].append(row)
            if row["group"] == "lesion":
                for field in ("kind", "organ", "size_bin"):
                    groups[f"lesion_{row['wording']}_{field}_{row[field].replace(' ', '_')}"].append(row)
                if row["organ"].startswith("lung"):
                    groups[f"lesion_{row['wording']}_lung"].append(row)
        if row["group"] == "swap" and "pointing_game" in row:
            groups["swap"].append(row)
    for name, members in sorted(groups.items()):
        summary[f"{name}_n"] = len(members)
        for metric in METRICS:
            summary[f"{name}_{metric}"] = _mean(members, metric)
    for wording in WORDINGS:  # absent findings are asked in the report's words and in unseen words
        present = [r for r in rows if r["group"] == "lesion" and r["wording"] == wording]
        absent = [r for r in rows if r["group"] == "absent" and r["wording"] == ABSENT_WORDING[wording]]
        if present and absent:
            found = np.mean([r["groundable"] for r in present])
            summary[f"call_{wording}_balanced_accuracy"] = float(0.5 * (found + np.mean([not r["groundable"]
                                                                                        for r in absent])))
    for name in ("lesion", "absent", "negated"):
        members = [r for r in rows if r["group"] == name]
        if members:
            summary[f"call_{name}_accuracy"] = float(np.mean([r["groundable"] == r["should_ground"] for r in members]))
    return summary


def calibrate(grounder: Grounder, studies: list[EvalStudy], *, per_study: int = 3, seed: int = 0
              ) -> dict[str, float]:
    """The not-found threshold from reports alone: the scores of each study's own stated findings (present)
    against findings of other patients' reports asked of organs its report calls normal (absent); the
    threshold maximises the balanced accuracy. No lesion mask or label is read."""
    rng = numpy_generator(seed, 777)
    organs = grounder.head.organs
    parsed = [(study, report_bags(study.report, organs), _finding_statements(study.report, organs))
              for study in studies]
    present, absent = [], []
    for study, bags, stated in parsed:
        candidates = [text for other, other_bags, other_stated in parsed if other.patient_id != study.patient_id
                      for text, organ in other_stated if organ in bags.normal]
        chosen = [candidates[i] for i in rng.permutation(len(candidates))[:per_study]]
        own = [text for text, _ in stated]
        if not own and not chosen:
            continue
        grounded = grounder.prepare(study.image)
        results = grounder.ground(grounded, own + chosen, strict=False)
        present += [r.score for r in results[:len(own)]]
        absent += [r.score for r in results[len(own):]]
    if not present or not absent:
        return {"threshold": 0.5, "balanced_accuracy": float("nan"), "present": len(present), "absent": len(absent)}
    values = np.unique(np.concatenate([present, absent]))
    cuts = np.concatenate([[values[0] - 1e-6], (values[1:] + values[:-1]) / 2, [values[-1] + 1e-6]])
    present_a, absent_a = np.asarray(present), np.asarray(absent)
    accuracy = [0.5 * ((present_a >= t).mean() + (absent_a < t).mean()) for t in cuts]
    best = int(np.argmax(accuracy))
    return {"threshold": float(cuts[best]), "balanced_accuracy": float(accuracy[best]), "present": len(present),
            "absent": len(absent)}


def _finding_statements(report: str, organs: tuple[str, ...]) -> list[tuple[str, str]]:
    """(statement, organ) of the report's positive findings that name one organ and a kind."""
    from medssl.downstream.grounding.data import findings_statements
    from medssl.errors import UserError
    from medssl.text.query import parse_query

    out = []
    for text in findings_statements(report):
        try:
            query = parse_query(text, organs)
        except UserError:
            continue
        if query.asserted and len(query.organs) == 1 and query.kind not in (None, "lesion"):
            out.append((text, query.organs[0]))
    return out
