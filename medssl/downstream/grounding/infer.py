"""Grounding phrases in any volume with a trained model: `Grounder` (used by `medssl ground infer`, training's
calibration, the evaluation, the benchmarks and the app).

A volume (`prepare`): the organ head's preprocessing (orientation, spacing, padding) with the whole-volume
pipeline, read once in Hounsfield units (CT; MR: the head's own normalisation), the head's soft-tissue window
computed from it; the organ head over it in sliding windows (class probabilities and decoder features), the
organ masks and the windowed intensities (`features.VolumeEvidence`).

A phrase (`ground`): its query (`medssl.text.query.parse_query`, unknown words read by the MiniLM concept
matcher, loaded only when needed), then
- an organ named alone ("the left kidney"): the organ head's probability of that organ (summed over the
  sides named) is the map; groundable when the head finds the organ (its mean probability over the predicted
  mask is the score, threshold 0.5);
- a finding: in each organ searched (the one named, or every organ a finding was seen in during training),
  the finding scorer's voxel logits for the kind (`scorer.FindingScorer`; a finding of no particular kind: the
  maximum over the kinds seen in that organ) plus the places' log prior; the organ whose bag logit (mean of
  the k largest, k from the stated size) is highest is the answer. The score is sigmoid(bag logit), the
  probability that the organ holds such a finding; it is groundable at or above the threshold calibrated on
  validation reports (`evaluate.calibrate`). The map is sigmoid((voxel logit - the k-th largest voxel logit)
  / s) inside that organ, 0 elsewhere (s = max(1, (peak - k-th) / 4), so the peak is 0.98 and never ties):
  the voxels of a finding of the stated size lie above 0.5.
- a negated or normal statement: never grounded.
Maps are computed on the head's grid and taken back to the input's grid, orientation and affine.

Refused by name (UserError): an empty, over-long or meaningless phrase; a phrase naming an organ the model
does not know (in a report: that statement is not groundable, with the reason); an image of another modality
than the organ head's; a checkpoint of another kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medssl.atomic import atomic_dir, write_json
from medssl.data import io
from medssl.data.body import body_mask
from medssl.data.preprocessing import VolumePreprocessing
from medssl.downstream.grounding import anatomy
from medssl.downstream.grounding.features import OrganVoxels, VolumeEvidence, window01
from medssl.downstream.grounding.organs import OrganHead
from medssl.downstream.grounding.scorer import FindingScorer, as_prior, ball_voxels
from medssl.errors import UserError
from medssl.explain.maps import MapSidecar, peak, write_map, write_result_json
from medssl.inference import SlidingWindowPredictor
from medssl.text.query import Query, default_matcher, parse_query
from medssl.text.statements import split_statements
from medssl.training.checkpoint import Kind, load_checkpoint, load_weights

HU_WINDOW = (1023.5, 4095.0)  # (level, width): [-1024, 3071] HU -> [0, 1] linearly, nothing clipped in a CT
ORGAN_THRESHOLD = 0.5  # mean organ-head probability over the predicted organ for an organ phrase to ground
FINDING_MEANING = ("sigmoid((finding logit - the k-th largest logit in the organ) / s), k = the voxels of a ball of "
                   "the stated size, s = max(1, (peak - that logit) / 4): a finding of that size lies above 0.5, the "
                   "peak at 0.98; 0 outside the organ searched")
ORGAN_MEANING = "the organ head's probability of the organ"


@dataclass
class PhraseResult:
    """One phrase over one volume. map01 (X, Y, Z) float32 on the input grid, None when not groundable."""

    phrase: str
    kind: str  # the statement's kind: finding, negated, normal
    score: float  # organ phrase: mean organ probability; finding: probability that the organ holds it
    groundable: bool
    reason: str  # why not groundable ("" when groundable)
    map01: np.ndarray | None
    peak_voxel: tuple[int, int, int] | None = None
    peak_mm: tuple[float, float, float] | None = None
    warnings: list[str] = field(default_factory=list)
    query: dict[str, Any] | None = None
    organ: str | None = None  # the organ searched (the answer among several)
    organ_voxels: int = 0  # its predicted mask's volume in voxels of the head's grid
    organ_ml: float = 0.0  # ... in millilitres
    threshold: float = 0.0
    meaning: str = ""  # what the map's values are


@dataclass
class GroundedImage:
    """A volume ready for grounding: the preprocessed image (with its transform trace), the evidence on the
    organ head's grid, the input's affine and shape, and what the user must know."""

    path: Path
    image: torch.Tensor
    evidence: VolumeEvidence
    affine: np.ndarray
    shape: tuple[int, int, int]
    warnings: list[str]
    predictor: SlidingWindowPredictor
    _organs: dict[str, OrganVoxels | None] = field(default_factory=dict)

    def organ(self, name: str) -> OrganVoxels | None:
        """The organ's voxels and features (computed once)."""
        if name not in self._organs:
            self._organs[name] = self.evidence.organ(name)
        return self._organs[name]

    def to_input_grid(self, values: np.ndarray) -> np.ndarray:
        """(C, D, H, W) on the head's grid -> (C, X, Y, Z) on the input's grid."""
        return self.predictor.to_input_grid(torch.from_numpy(np.ascontiguousarray(values, np.float32)), self.image)


@dataclass
class GroundingSettings:
    """What the model learnt besides weights: the intensity windows (None for MR), the kinds seen per organ,
    each kind's median stated size, the not-groundable threshold on the finding score."""

    windows: list[tuple[float, float]] | None
    kinds_by_organ: dict[str, list[str]]
    median_size: dict[str, float]
    threshold: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return {"windows": [list(w) for w in self.windows] if self.windows else None,
                "kinds_by_organ": self.kinds_by_organ, "median_size": self.median_size, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GroundingSettings:
        windows = values["windows"]
        return cls([tuple(w) for w in windows] if windows else None, dict(values["kinds_by_organ"]),
                   {k: float(v) for k, v in values["median_size"].items()}, float(values["threshold"]))


class Grounder:
    """A trained grounding model: organ head, finding scorer, settings."""

    def __init__(self, head: OrganHead, scorer: FindingScorer, settings: GroundingSettings, checkpoint: str):
        self.head, self.scorer, self.settings, self.checkpoint = head, scorer.eval(), settings, checkpoint
        self.hu_prep = head.prep.model_copy(update={"window": HU_WINDOW}) if head.prep.modality == "CT" else head.prep

    @property
    def threshold(self) -> float:
        return self.settings.threshold

    @property
    def prep(self) -> VolumePreprocessing:
        return self.head.prep

    @classmethod
    def load(cls, path: str | Path) -> Grounder:
        """Read a "grounding-model" checkpoint (RUN/grounding.pt); another kind, a corrupt file or a
        mismatching architecture is a UserError naming it."""
        payload = load_checkpoint(path, kind=Kind.GROUNDING_MODEL)
        try:
            arch = payload["arch"]
            head = OrganHead.from_state({"arch": arch["organ_head"], "preprocessing": payload["preprocessing"],
                                         "model": {k[len("organs."):]: v for k, v in payload["model"].items()
                                                   if k.startswith("organs.")}}, str(path))
            scorer = FindingScorer(**arch["scorer"])
            settings = GroundingSettings.from_dict(arch["settings"])
        except (KeyError, TypeError, ValueError) as err:
            raise UserError(f"{path}: not a grounding model (its architecture does not read: {type(err).__name__})") \
                from None
        load_weights(scorer, {k[len("scorer."):]: v for k, v in payload["model"].items() if k.startswith("scorer.")},
                     min_fraction=1.0, source=str(path))
        return cls(head, scorer, settings, str(path))

    def untrained(self) -> Grounder:
        """The control: the same organ head and settings with the finding scorer at its untrained start
        (the organ-normalised anomaly score): what training from reports adds is the difference."""
        scorer = FindingScorer(**self.scorer.arch())
        return Grounder(self.head, scorer, self.settings, f"{self.checkpoint} (untrained scorer)")

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(model weights, arch) of a grounding checkpoint (`load` reads them back)."""
        head = self.head.state()
        weights = {**{f"organs.{k}": v for k, v in head["model"].items()},
                   **{f"scorer.{k}": v for k, v in self.scorer.state_dict().items()}}
        return weights, {"organ_head": head["arch"], "scorer": self.scorer.arch(), "settings": self.settings.to_dict()}

    # ------------------------------------------------------------------ one volume

    def prepare(self, image_path: str | Path, *, modality: str | None = None) -> GroundedImage:
        """Read, preprocess and run the organ head on a volume. Warnings name what differs from training
        (orientation, spacing); another modality than the head's is a UserError."""
        path = Path(image_path)
        volume = io.read_volume(path)
        notes = self._check_input(volume, modality)
        predictor = SlidingWindowPredictor(self.hu_prep, sw_batch_size=self.head.sw_batch_size,
                                           device=self.head.device)
        image = predictor.preprocess(path)
        values = image.as_tensor()[0].numpy()
        if self.settings.windows is not None:  # CT: values are [0, 1] over the whole HU range
            hu = values * HU_WINDOW[1] + (HU_WINDOW[0] - HU_WINDOW[1] / 2)
            level, width = self.head.prep.window
            head_input = window01(hu, level, width)
            intensity = hu
        else:
            head_input, intensity = values, values
        output = self.head.run(torch.from_numpy(head_input)[None])
        spacing = np.abs(np.asarray(image.pixdim[:3], float)) if hasattr(image, "pixdim") else np.ones(3)
        evidence = VolumeEvidence.build(intensity, self.settings.windows, output.probabilities.numpy(),
                                        output.features.numpy(), self.head.classes, spacing,
                                        self.head.prep.orientation, body_mask(head_input))
        return GroundedImage(path, image, evidence, volume.affine, tuple(volume.array.shape), notes, predictor)

    def _check_input(self, volume: io.Volume, modality: str | None) -> list[str]:
        prep, notes = self.head.prep, []
        if modality is not None and modality.upper() != prep.modality:
            raise UserError(f"{volume.path}: modality {modality.upper()}, this grounding model was trained on "
                            f"{prep.modality}; ground {prep.modality} volumes with it")
        if prep.modality == "CT" and float(np.nanmin(volume.array)) > -900:
            raise UserError(f"{volume.path}: no air (no value below -900; minimum {float(np.nanmin(volume.array)):g}):"
                            f" not a CT in Hounsfield units, the modality this grounding model was trained on")
        if volume.orientation != prep.orientation:
            notes.append(f"{volume.path}: orientation {volume.orientation}, training used {prep.orientation}; "
                         "reoriented (maps are written back in the input's orientation)")
        if prep.spacing is not None and not np.allclose(volume.spacing, prep.spacing, rtol=0.02):
            notes.append(f"{volume.path}: voxel size {tuple(round(s, 3) for s in volume.spacing)} mm, training used "
                         f"{tuple(prep.spacing)} mm; resampled (maps are written back on the input's grid)")
        return notes

    # ------------------------------------------------------------------ phrases

    def query(self, phrase: str) -> Query:
        """The phrase's query; MiniLM reads words the vocabulary does not know (loaded on first need)."""
        organs = self.head.organs
        query = parse_query(phrase, organs)
        return parse_query(phrase, organs, default_matcher()) if query.unknown else query

    def ground(self, grounded: GroundedImage, phrases: list[str], *, strict: bool = True,
               always_map: bool = False) -> list[PhraseResult]:
        """Every phrase over one prepared volume. strict: a phrase that names nothing the model knows, or an
        organ it does not know, is a UserError; otherwise (a whole report) that statement is not groundable
        with the reason. always_map (evaluation): a finding judged not found keeps its map, so that where a
        map points is measured apart from the found / not-found call."""
        results = []
        for phrase in phrases:
            try:
                query = self.query(phrase)
                self.check_query(query)
            except UserError as err:
                if strict:
                    raise
                results.append(PhraseResult(phrase, "finding", 0.0, False, str(err), None))
                continue
            results.append(self.answer(grounded, query, always_map=always_map))
        return results

    def check_query(self, query: Query) -> None:
        """A UserError when the query names an organ the organ head does not know."""
        if query.unknown_organs:
            known = ", ".join(o for o in self.head.organs if o not in ("background", "body"))
            raise UserError(f"phrase {query.text[:60]!r}: names an organ this model does not know "
                            f"({', '.join(query.unknown_organs)}); it knows: {known}")

    def answer(self, grounded: GroundedImage, query: Query, *, always_map: bool = False) -> PhraseResult:
        """The result of one parsed query (module docstring; `always_map`: see `ground`)."""
        notes = [f"word {m.word!r} read as {m.slot} '{m.concept}' (confidence {m.confidence:.2f})"
                 for m in query.mapped if m.used]
        notes += [f"words not understood: {', '.join(query.unknown)}"] if query.unknown else []
        base = {"phrase": query.text, "kind": query.statement, "query": query.to_dict(), "warnings": notes}
        if not query.asserted:
            return PhraseResult(score=0.0, groundable=False, reason=f"{query.statement} statement", map01=None, **base)
        if query.organ_prompt:
            return self._organ_result(grounded, query, base)
        return self._finding_result(grounded, query, base, always_map)

    def _organ_result(self, grounded: GroundedImage, query: Query, base: dict) -> PhraseResult:
        evidence = grounded.evidence
        names = [o for o in query.organs if o in evidence.masks]
        mask = np.zeros(evidence.shape, bool)
        for name in names:
            mask |= evidence.masks[name]
        value_of = {name: value for value, name in self.head.classes.items()}
        probability = sum(evidence.probabilities[value_of[name]] for name in names) if names else None
        organ = " + ".join(query.organs)
        if probability is None or not mask.any():
            return PhraseResult(score=0.0, groundable=False, threshold=ORGAN_THRESHOLD, organ=organ,
                                reason=f"the organ head finds no {organ} in this volume", map01=None, **base)
        score = float(probability[mask].mean())
        volume_ml = float(mask.sum() * np.prod(evidence.spacing) / 1000.0)
        if score < ORGAN_THRESHOLD:
            return PhraseResult(score=score, groundable=False, threshold=ORGAN_THRESHOLD, organ=organ,
                                organ_voxels=int(mask.sum()), organ_ml=volume_ml, map01=None, **base,
                                reason=f"the organ head's mean probability of the {organ} is {score:.2f}, "
                                       f"below {ORGAN_THRESHOLD}")
        return self._with_map(grounded, np.clip(probability, 0, 1), score, ORGAN_THRESHOLD, organ, int(mask.sum()),
                              volume_ml, ORGAN_MEANING, base)

    def _searched(self, query: Query) -> list[str]:
        return list(query.organs) if query.organs else list(self.settings.kinds_by_organ)

    def _kinds(self, query: Query, organ: str) -> tuple[list[int], list[str]]:
        """(scorer kind indices, notes) for the query's kind in `organ`."""
        kinds = self.scorer.kinds
        if query.kind in kinds:
            return [kinds.index(query.kind)], []
        seen = [k for k in self.settings.kinds_by_organ.get(organ, kinds) if k in kinds] or kinds
        note = [] if query.kind == "lesion" else [f"no '{query.kind}' was seen in training; any finding is searched"]
        return [kinds.index(k) for k in seen], note

    def finding_logits(self, organ: OrganVoxels, query: Query) -> tuple[torch.Tensor, int, list[str]]:
        """(voxel logits (n,), k, notes) of the query's finding in one organ."""
        kinds, notes = self._kinds(query, organ.organ)
        size = query.size_mm or float(np.median([self.settings.median_size.get(self.scorer.kinds[k], 15.0)
                                                 for k in kinds]))
        phi = organ.phi(size)
        prior = as_prior(organ.prior(query.locations)) if query.locations else None
        with torch.no_grad():
            logits = self.scorer.generic_logits(kinds, organ.organ, phi, prior)
        return logits, ball_voxels(size, organ.spacing), notes

    def _finding_result(self, grounded: GroundedImage, query: Query, base: dict, always_map: bool) -> PhraseResult:
        best = None
        missing = []
        for name in self._searched(query):
            organ = grounded.organ(name)
            if organ is None:
                missing.append(name)
                continue
            logits, k, notes = self.finding_logits(organ, query)
            bag = float(logits.topk(min(k, logits.numel())).values.mean())
            if best is None or bag > best[0]:
                best = (bag, organ, logits, k, notes)
        threshold = self.settings.threshold
        if best is None:
            return PhraseResult(score=0.0, groundable=False, threshold=threshold, organ=" + ".join(missing),
                                reason=f"the organ head finds no {' or '.join(missing)} in this volume",
                                map01=None, **base)
        bag, organ, logits, k, notes = best
        base["warnings"] = base["warnings"] + notes
        score = float(1.0 / (1.0 + np.exp(-bag)))
        volume_ml = float(organ.mask_voxels * np.prod(grounded.evidence.spacing) / 1000.0)
        found = score >= threshold
        if not found and not always_map:
            return PhraseResult(score=score, groundable=False, threshold=threshold, organ=organ.organ,
                                organ_voxels=organ.mask_voxels, organ_ml=volume_ml, map01=None, **base,
                                reason=f"not found: score {score:.3f} below the threshold {threshold:.3f}")
        cut = logits.topk(min(k, logits.numel())).values[-1]
        scale = max(1.0, float(logits.max() - cut) / 4.0)  # the peak at 0.98: no saturated ties
        values = np.zeros(int(np.prod(organ.shape)), np.float32)
        values[organ.index] = torch.sigmoid((logits - cut) / scale).numpy()
        result = self._with_map(grounded, values.reshape(organ.shape), score, threshold, organ.organ,
                                organ.mask_voxels, volume_ml, FINDING_MEANING, base)
        if not found:
            result.groundable = False
            result.reason = f"not found: score {score:.3f} below the threshold {threshold:.3f}"
        return result

    def _with_map(self, grounded: GroundedImage, values: np.ndarray, score: float, threshold: float, organ: str,
                  voxels: int, volume_ml: float, meaning: str, base: dict) -> PhraseResult:
        map01 = np.clip(grounded.to_input_grid(values[None])[0], 0.0, 1.0).astype(np.float32)
        voxel, mm = peak(map01, grounded.affine)
        return PhraseResult(score=score, groundable=True, reason="", map01=map01, peak_voxel=voxel, peak_mm=mm,
                            threshold=threshold, organ=organ, organ_voxels=voxels, organ_ml=volume_ml,
                            meaning=meaning, **base)

    def region_masks(self, grounded: GroundedImage) -> dict[str, np.ndarray]:
        """The anatomy tree on the input grid: every organ the head finds and its halves
        ({"liver": (X, Y, Z) bool, "liver / upper": ..., ...}; `anatomy.organ_parts`)."""
        evidence = grounded.evidence
        names, masks = [], []
        for name, mask in evidence.masks.items():
            if not mask.any():
                continue
            frame = anatomy.OrganFrame.of(mask, evidence.spacing, evidence.midline, evidence.orientation)
            names.append(name)
            masks.append(mask)
            for part, part_mask in anatomy.organ_parts(mask, frame.offsets(evidence.shape, evidence.spacing)).items():
                names.append(f"{name} / {part}")
                masks.append(part_mask)
        if not masks:
            return {}
        back = grounded.to_input_grid(np.stack(masks).astype(np.float32))
        return {name: values > 0.5 for name, values in zip(names, back)}

    def sidecar(self, result: PhraseResult, image: Path) -> MapSidecar:
        """The map's provenance (medssl.explain.maps)."""
        return MapSidecar(kind="grounding", image=str(image), checkpoint=self.checkpoint, phrase=result.phrase,
                          raw_scale={"name": "probability", "meaning": result.meaning or FINDING_MEANING},
                          rescaling={"name": "linear", "from": [0.0, 1.0]}, groundable=result.groundable,
                          score=result.score, score_threshold=result.threshold,
                          peak_voxel=list(result.peak_voxel) if result.peak_voxel else None,
                          peak_mm=list(result.peak_mm) if result.peak_mm else None,
                          preprocessing=self.prep.to_dict(), created=datetime.now(timezone.utc),
                          extra={"statement_kind": result.kind, "reason": result.reason, "query": result.query,
                                 "organ": result.organ, "organ_voxels": result.organ_voxels,
                                 "organ_ml": round(result.organ_ml, 2), "warnings": result.warnings})


def read_report(path: str | Path) -> list[str]:
    """The statements of a report file's findings (every statement when it has no "Findings:" section);
    UserError for a missing, empty, binary or non-UTF-8 file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such report file") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read the report ({type(err).__name__})") from None
    if b"\x00" in data:
        raise UserError(f"{path}: not a text file (binary content); give the report as plain UTF-8 text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); save the report as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: the report is empty")
    return report_phrases(text)


def report_phrases(text: str) -> list[str]:
    """The statements of a report's findings (every statement when it has no "Findings:" section)."""
    statements = split_statements(text)
    findings = [s.text for s in statements if s.section == "findings"]
    return findings or [s.text for s in statements]


def _slug(index: int, phrase: str) -> str:
    words = "".join(c if c.isalnum() else "_" for c in phrase.lower()).strip("_")
    return f"{index:02d}_{'_'.join(w for w in words.split('_') if w)[:40]}"


def write_results(grounder: Grounder, grounded: GroundedImage, results: list[PhraseResult], out_dir: str | Path
                  ) -> list[dict]:
    """Write every result into `out_dir` (new or empty; written as a whole or not at all): a map (NIfTI +
    sidecar, `medssl.explain.maps`) per groundable phrase, a sidecar-only JSON per not-groundable one, and
    `results.json` listing them (the image and checkpoint as absolute paths). Returns the listing."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: output exists and is not an empty folder; choose a new -o")
    listing = []
    with atomic_dir(out) as tmp:
        for index, result in enumerate(results, start=1):
            stem = _slug(index, result.phrase)
            sidecar = grounder.sidecar(result, grounded.path.resolve())
            if result.groundable:
                write_map(tmp / stem, result.map01, grounded.affine, sidecar)
                files = {"map": f"{stem}.nii.gz", "sidecar": f"{stem}.json"}
            else:
                write_result_json(tmp / f"{stem}.json", sidecar)
                files = {"sidecar": f"{stem}.json"}
            listing.append({"phrase": result.phrase, "kind": result.kind, "groundable": result.groundable,
                            "score": result.score, "threshold": result.threshold, "reason": result.reason,
                            "organ": result.organ, "query": result.query,
                            "peak_mm": list(result.peak_mm) if result.peak_mm else None, **files})
        write_json(tmp / "results.json", {"image": str(grounded.path.resolve()),
                                          "checkpoint": str(Path(grounder.checkpoint).resolve()),
                                          "threshold": grounder.threshold, "warnings": grounded.warnings,
                                          "results": listing})
    return listing
