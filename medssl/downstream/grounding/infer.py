"""Grounding phrases in any volume with a trained model: `Grounder` (used by `medssl ground infer`, the
evaluation and the app).

For a volume: the checkpoint's preprocessing (orientation, spacing, intensity) with the whole-volume
pipeline, the model's 4-channel input (intensity + RAS body coordinates), voxel embeddings by sliding
windows (`medssl.inference.SlidingWindowPredictor`, ROI = the crop size), then per phrase the cosine map,
resized to the preprocessed grid and inverted to the input's grid, orientation and affine. A map is
stored rescaled linearly from [-1, 1] to [0, 1] (`medssl.explain.maps`).

Not groundable: a negated or normal statement (`medssl.text.statements`), or a phrase whose peak cosine
inside the body stays below the calibrated threshold (nothing in this scan looks like what it names). A
not-groundable result has a score and a reason, never a map.
"""

from __future__ import annotations

import warnings as pywarnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medssl.atomic import atomic_dir, write_json
from medssl.data import io
from medssl.data.preprocessing import VolumePreprocessing
from medssl.downstream.grounding.config import HeadConfig
from medssl.downstream.grounding.data import grid_body, model_input
from medssl.downstream.grounding.graph import AnatomyGraph
from medssl.downstream.grounding.model import GroundingModel
from medssl.errors import UserError
from medssl.explain.maps import MapSidecar, peak, write_map, write_result_json
from medssl.inference import SlidingWindowPredictor
from medssl.models.volume_encoders import VolumeEncoderConfig
from medssl.text.encoders import TextEncoderConfig, build_text_encoder
from medssl.text.statements import classify_statement, split_statements
from medssl.training.checkpoint import Kind, load_checkpoint, load_weights

RAW_SCALE = {"name": "cosine", "range": [-1.0, 1.0]}
RESCALING = {"name": "linear", "from": [-1.0, 1.0], "to": [0.0, 1.0]}
DEFAULT_THRESHOLD = 0.0  # cosine; used when a checkpoint was not calibrated


@dataclass
class PhraseResult:
    """One phrase over one volume. map01 (X, Y, Z) float32 on the input grid, None when not groundable."""

    phrase: str
    kind: str  # the statement's kind: finding, negated, normal
    score: float  # peak cosine inside the body
    groundable: bool
    reason: str  # why not groundable ("" when groundable)
    map01: np.ndarray | None
    peak_voxel: tuple[int, int, int] | None = None
    peak_mm: tuple[float, float, float] | None = None
    warnings: list[str] = field(default_factory=list)


@dataclass
class GroundedImage:
    """A volume ready for grounding: its preprocessed image (with the transform trace), the model input,
    the voxel embeddings (E, d, h, w), the input's affine and shape, and what the user must know."""

    path: Path
    image: torch.Tensor
    x: torch.Tensor
    body: torch.Tensor  # (D, H, W) bool on the preprocessed grid
    embeddings: torch.Tensor
    affine: np.ndarray
    shape: tuple[int, int, int]
    warnings: list[str]
    predictor: SlidingWindowPredictor  # the pipeline instance that can invert this image's trace


def _rebuild(arch: dict, source: str) -> tuple[GroundingModel, AnatomyGraph | None]:
    try:
        encoder = VolumeEncoderConfig.model_validate(arch["encoder"])
        head = HeadConfig.model_validate(arch["grounding"])
        text_config = TextEncoderConfig.model_validate(arch["text"])
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"{source}: not a grounding model (its architecture does not read: "
                        f"{type(err).__name__})") from None
    text = build_text_encoder(text_config, arch.get("tokenizer"))
    graph = AnatomyGraph.from_dict(arch["graph"]) if arch.get("graph") else None
    return GroundingModel(encoder, head, text), graph


class Grounder:
    """A trained grounding model with its preprocessing, anatomy graph and not-groundable threshold."""

    def __init__(self, model: GroundingModel, prep: VolumePreprocessing, graph: AnatomyGraph | None, threshold: float,
                 checkpoint: str, *, device: torch.device | None = None, sw_batch_size: int = 2):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.prep, self.graph, self.threshold, self.checkpoint = prep, graph, float(threshold), checkpoint
        self.sw_batch_size = sw_batch_size

    @classmethod
    def load(cls, path: str | Path, **options) -> Grounder:
        """Read a "grounding-model" checkpoint (or a "grounding" training checkpoint: uncalibrated, with a
        warning); another kind, a corrupt file or a mismatching architecture is a UserError naming it."""
        payload = load_checkpoint(path)
        if payload["kind"] not in (Kind.GROUNDING_MODEL, Kind.GROUNDING):
            raise UserError(f"{path}: a '{payload['kind']}' checkpoint is not a grounding model (expected "
                            f"'{Kind.GROUNDING_MODEL}', written by medssl ground train as grounding.pt)")
        model, graph = _rebuild(payload["arch"], str(path))
        load_weights(model, payload["model"], min_fraction=1.0, source=str(path))
        prep = VolumePreprocessing.from_dict(payload["preprocessing"], where=str(path))
        calibration = payload.get("state", {}).get("calibration") or {}
        if "threshold" not in calibration:
            pywarnings.warn(f"{path}: not a calibrated grounding model; not-groundable threshold {DEFAULT_THRESHOLD} "
                            "(use RUN/grounding.pt)", stacklevel=2)
        return cls(model, prep, graph, calibration.get("threshold", DEFAULT_THRESHOLD), str(path), **options)

    # ------------------------------------------------------------------ one volume

    def prepare(self, image_path: str | Path, *, modality: str | None = None) -> GroundedImage:
        """Read, preprocess (per the checkpoint, `modality` overriding its intensity normalisation) and embed
        a volume. Warnings name what differs from training: modality, orientation, spacing."""
        path = Path(image_path)
        volume = io.read_volume(path)
        notes, prep = self._check_input(volume, modality)
        predictor = SlidingWindowPredictor(prep, sw_batch_size=self.sw_batch_size, device=self.device)
        image = predictor.preprocess(path)
        x, body = model_input(image.as_tensor(), prep.orientation, self.model.head_config.edge_margin)
        with torch.no_grad():
            embeddings = predictor.windows(self.model.embed_voxels, x)
        return GroundedImage(path, image, x, body, embeddings, volume.affine, tuple(volume.array.shape), notes,
                             predictor)

    def _check_input(self, volume: io.Volume, modality: str | None) -> tuple[list[str], VolumePreprocessing]:
        notes, prep = [], self.prep
        if modality is not None and modality.upper() != prep.modality:
            notes.append(f"{volume.path}: modality {modality.upper()}, the model was trained on {prep.modality}; "
                         f"intensities normalised as {modality.upper()}")
            prep = prep.model_copy(update={"modality": modality.upper()})
        elif prep.modality == "CT" and float(np.nanmin(volume.array)) > -900:
            notes.append(f"{volume.path}: no air (no value below -900; minimum {float(np.nanmin(volume.array)):g}): "
                         "this does not look like CT in Hounsfield units, the modality the model was trained on; pass "
                         "--modality MR for an MR volume")
        if volume.orientation != prep.orientation:
            notes.append(f"{volume.path}: orientation {volume.orientation}, training used {prep.orientation}; "
                         "reoriented (maps are written back in the input's orientation)")
        if prep.spacing is not None and not np.allclose(volume.spacing, prep.spacing, rtol=0.02):
            notes.append(f"{volume.path}: voxel size {tuple(round(s, 3) for s in volume.spacing)} mm, training used "
                         f"{tuple(prep.spacing)} mm; resampled (maps are written back on the input's grid)")
        return notes, prep

    def cosine_maps(self, grounded: GroundedImage, phrases: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(P, X, Y, Z) cosine maps on the input grid, -1 outside the body (the model grounds inside the body
        only), and (P,) peak cosine inside the body (feature grid)."""
        with torch.no_grad():
            embedded = self.model.embed_text(phrases).cpu()
        sims = torch.einsum("pe,edhw->pdhw", embedded, grounded.embeddings)
        body = F.adaptive_avg_pool3d(grounded.body.float()[None, None], sims.shape[1:])[0, 0] > 0.5
        scores = sims.flatten(1)[:, body.flatten()].amax(dim=1) if body.any() else sims.flatten(1).amax(dim=1)
        full = F.interpolate(sims[None], size=grounded.x.shape[1:], mode="trilinear", align_corners=False)[0]
        full = full.masked_fill(~grounded.body[None], -1.0)
        maps = grounded.predictor.to_input_grid(full, grounded.image)
        return maps, scores.numpy()

    def ground(self, grounded: GroundedImage, phrases: list[str]) -> list[PhraseResult]:
        """Every phrase over one prepared volume (empty phrases are a UserError)."""
        for phrase in phrases:
            if not phrase.strip():
                raise UserError("phrase: empty; give the words to ground (--text \"...\")")
        maps, scores = self.cosine_maps(grounded, phrases)
        results = []
        for phrase, cosine, score in zip(phrases, maps, scores):
            kind, groundable, reason = self.decide(phrase, float(score))
            notes = []
            unknown = self._unknown_words(phrase)
            if unknown is not None and len(unknown) == len(phrase.split()):
                notes.append(f"phrase {phrase!r}: no known word (none of its words was in the training reports)")
            if not groundable:
                results.append(PhraseResult(phrase, kind, float(score), False, reason, None, warnings=notes))
                continue
            map01 = np.clip((cosine + 1) / 2, 0, 1).astype(np.float32)
            voxel, mm = peak(map01, grounded.affine)
            results.append(PhraseResult(phrase, kind, float(score), True, "", map01, voxel, mm, notes))
        return results

    def decide(self, phrase: str, score: float) -> tuple[str, bool, str]:
        """(statement kind, groundable, reason when not): negated / normal statements never ground; a
        finding grounds when its peak cosine reaches the threshold."""
        kind = classify_statement(phrase)
        if kind != "finding":
            return kind, False, f"{kind} statement"
        if score < self.threshold:
            return kind, False, f"peak similarity {score:.3f} below the threshold {self.threshold:.3f}"
        return kind, True, ""

    def graph_nodes(self, grounded: GroundedImage) -> np.ndarray:
        """The anatomy graph's organ-level region of every feature-grid voxel: (d, h, w) long, -1 outside
        the body (UserError when the model has no graph)."""
        if self.graph is None:
            raise UserError(f"{self.checkpoint}: this grounding model was trained without an anatomy graph")
        stride = self.model.feature_stride
        x = grounded.x[None].to(self.device)
        features = self.model.graph_features(x)[0].cpu().numpy()
        coords = F.avg_pool3d(grounded.x[None, 1:4], stride)[0].numpy()
        return self.graph.assign(features, coords, grid_body(grounded.body, stride).numpy())[0]

    def region_masks(self, grounded: GroundedImage) -> dict[str, np.ndarray]:
        """The graph's organ-level regions on the input grid: {"<k>: <prompt>": (X, Y, Z) bool}."""
        nodes = torch.from_numpy(self.graph_nodes(grounded))
        onehot = torch.stack([(nodes == k).float() for k in range(self.graph.regions)])
        full = F.interpolate(onehot[None], size=grounded.x.shape[1:], mode="nearest")[0]
        back = grounded.predictor.to_input_grid(full, grounded.image)
        best = back.argmax(axis=0)
        inside = back.max(axis=0) > 0.5
        return {f"{k}: {prompt}": (best == k) & inside for k, prompt in enumerate(self.graph.prompts(1))}

    def _unknown_words(self, phrase: str) -> list[str] | None:
        tokenizer = getattr(self.model.text, "tokenizer", None)
        return None if tokenizer is None else tokenizer.unknown_words(phrase)

    def sidecar(self, result: PhraseResult, image: Path) -> MapSidecar:
        """The map's provenance (medssl.explain.maps)."""
        return MapSidecar(kind="grounding", image=str(image), checkpoint=self.checkpoint, phrase=result.phrase,
                          raw_scale=RAW_SCALE, rescaling=RESCALING, groundable=result.groundable,
                          score=result.score, score_threshold=self.threshold,
                          peak_voxel=list(result.peak_voxel) if result.peak_voxel else None,
                          peak_mm=list(result.peak_mm) if result.peak_mm else None,
                          preprocessing=self.prep.to_dict(), created=datetime.now(timezone.utc),
                          extra={"statement_kind": result.kind, "reason": result.reason})


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
    `results.json` listing them. Returns the listing."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: output exists and is not an empty folder; choose a new -o")
    listing = []
    with atomic_dir(out) as tmp:
        for index, result in enumerate(results, start=1):
            stem = _slug(index, result.phrase)
            sidecar = grounder.sidecar(result, grounded.path)
            if result.groundable:
                write_map(tmp / stem, result.map01, grounded.affine, sidecar)
                files = {"map": f"{stem}.nii.gz", "sidecar": f"{stem}.json"}
            else:
                write_result_json(tmp / f"{stem}.json", sidecar)
                files = {"sidecar": f"{stem}.json"}
            listing.append({"phrase": result.phrase, "kind": result.kind, "groundable": result.groundable,
                            "score": result.score, "reason": result.reason,
                            "peak_mm": list(result.peak_mm) if result.peak_mm else None, **files})
        write_json(tmp / "results.json", {"image": str(grounded.path), "checkpoint": grounder.checkpoint,
                                          "threshold": grounder.threshold, "warnings": grounded.warnings,
                                          "results": listing})
    return listing
