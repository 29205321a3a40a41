"""`medssl finetune seg`: 3D segmentation fine-tuning with few labels, from scratch or a pretrained encoder.

Network: the MONAI network of `build_segmentation_network(config.model, K)` (K classes); with
`pretrained`, its encoder is loaded by `load_pretrained_encoder` (every encoder tensor must load, else
a UserError naming the missing keys; the decoder stays randomly initialised).

Preprocessing: with a pretrained checkpoint its stored preprocessing (modality, spacing, intensity
window or percentiles, crop size, orientation) is used; each field that differs from the fine-tuning
config is a warning naming both values (printed to stderr and listed in summary.json "warnings").

Data: `seg.labelled_volumes` training volumes are chosen per patient (`select_labelled`): patients in a
seeded order, their first studies first, so n volumes come from min(n, patients) patients, and the
selection for n is inside the one for n + 1 (nested). Every labelled, validation and test volume is
checked before the run directory is created: its label map must share the image's shape and affine,
hold only the configured classes (`seg.labels`, default the manifest's `labels`) and not be empty.
Training micro-batch i holds `train.batch_size` random crops of `crop_size` from the labelled volumes
(whole preprocessed volumes, padded to at least the crop), drawn by a generator seeded by (seed, i).

Training: Dice + cross-entropy (`monai.losses.DiceCELoss`, softmax, one-hot target) through the shared
`Trainer`. `seg.freeze_encoder_steps`: the encoder's parameters get no gradient (so AdamW leaves them
untouched, weight decay included) for the first N optimiser steps. `seg.layer_decay` (d <= 1): layer-wise
learning-rate decay; the decoder and head train at `train.lr`, encoder stage i of S (stages in the order
of `VolumeEncoder.parts`, fine to coarse; a ModuleList part gives one stage per element) at
lr x d^(S - i), so the stem, the most generic layer, moves least.

Evaluation (validation every `seg.eval_every` steps, `checkpoints/best.pt` on validation Dice; test
with the best checkpoint, or the last one without validation cases): sliding-window inference
(`monai.inferers.sliding_window_inference`, ROI = crop size) on the whole preprocessed volume; the
softmax probabilities go back to the input's grid through the inverse of the preprocessing
(`monai.transforms.Invertd`: padding, resampling, orientation), and their argmax is the prediction.
Metrics are computed there, against the label file, with MONAI: per-class Dice (`DiceMetric`) and 95 %
Hausdorff distance in mm (`HausdorffDistanceMetric(percentile=95)` with the input's spacing), background
excluded. A class absent from both prediction and truth has no Dice (NaN); HD95 is NaN when either is
empty; means skip NaNs.

Run directory (DESIGN 3.2): config.yaml, metrics.jsonl, tb/, checkpoints/last.pt and best.pt (kind
"finetune-seg"), summary.json (flat keys: test_dice_mean, test_hd95_mean, test_dice_<class>, ...),
predictions/<image name>.nii.gz (uint8 label maps with the input's affine), test_cases.csv (per-case
metrics) and test_overlay.png (prediction over the image on a few slices).
"""

from __future__ import annotations

import csv
import io as textio
import json
import math
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, confloat, model_validator
from torch import nn
from torch.utils.data import Dataset

from medssl.atomic import write_text
from medssl.config import StrictModel, TrainConfig, dump_config
from medssl.data import io
from medssl.data.checks import labelled_volume_problems, patient_split_problems, raise_first
from medssl.data.manifest import Manifest, load_manifest
from medssl.data.preprocessing import VolumeDataConfig, VolumePreprocessing
from medssl.data.volumes import manifest_volume_entries, patients_in_turn, volume_dataset, whole_volume_pipeline
from medssl.errors import UserError
from medssl.explain.overlay import LabelledCase, write_label_overlay
from medssl.inference import SlidingWindowPredictor
from medssl.models.volume_encoders import (
    EncoderLoadReport,
    VolumeEncoder,
    VolumeEncoderConfig,
    build_segmentation_network,
    load_pretrained_encoder,
    network_encoder,
)
from medssl.seeding import numpy_generator
from medssl.training.checkpoint import Kind, load_checkpoint, load_weights
from medssl.training.distributed import DistContext
from medssl.training.loop import Checkpointing, Freeze, ParamGroup, StepOutput, Trainer
from medssl.training.rundir import RunDir, prepare_run_dir

_LABELLED_STREAM = 1  # random stream (with train.seed) of the labelled-volume choice
Split = Literal["training", "validation", "test"]


class SegSettings(StrictModel):
    """The `seg` section."""

    labels: dict[int, str] | None = None  # class value -> name, values 0..K-1; None: the manifest's labels
    labelled_volumes: PositiveInt | None = None  # labelled training volumes (per patient); None: all
    train_split: Split = "training"
    val_split: Split = "validation"
    test_split: Split = "test"
    freeze_encoder_steps: NonNegativeInt = 0
    layer_decay: confloat(gt=0.0, le=1.0) = 1.0
    lambda_dice: NonNegativeFloat = 1.0
    lambda_ce: NonNegativeFloat = 1.0
    eval_every: NonNegativeInt = 0  # validation every N steps (a multiple of train.log_every); 0: at the end only
    sw_batch_size: PositiveInt = 4  # windows per forward pass of sliding-window inference
    sw_overlap: confloat(ge=0.0, lt=1.0) = 0.25
    sw_mode: Literal["gaussian", "constant"] = "gaussian"
    overlay_cases: NonNegativeInt = 3  # test cases drawn in test_overlay.png (0: no PNG)


class FinetuneSegConfig(StrictModel):
    """`medssl finetune seg` (configs/finetune_seg.yaml). With --pretrained, `model` must equal the
    checkpoint's encoder and the checkpoint's preprocessing replaces `data`'s (with warnings)."""

    data: VolumeDataConfig
    train: TrainConfig
    model: VolumeEncoderConfig = Field(default_factory=VolumeEncoderConfig)
    seg: SegSettings = Field(default_factory=SegSettings)

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneSegConfig:
        if self.seg.eval_every % self.train.log_every:
            raise ValueError(f"seg.eval_every {self.seg.eval_every} must be a multiple of train.log_every "
                             f"{self.train.log_every} (validation runs on logged steps)")
        if self.seg.lambda_dice == 0 and self.seg.lambda_ce == 0:
            raise ValueError("seg.lambda_dice and seg.lambda_ce are both 0: no loss left")
        if self.seg.train_split in (self.seg.val_split, self.seg.test_split):
            raise ValueError(f"seg.train_split '{self.seg.train_split}' is also the validation or test split")
        return self


# ------------------------------------------------------------------------------------------------ set-up


def class_names(settings: SegSettings, manifest: Manifest, source: str) -> dict[int, str]:
    """Class value -> name (`seg.labels`, else the manifest's `labels`); values must be 0..K-1, K >= 2."""
    labels = settings.labels if settings.labels is not None else {int(k): v for k, v in (manifest.labels or {}).items()}
    where = "seg.labels" if settings.labels is not None else f"{source}: labels"
    if sorted(labels) != list(range(len(labels))) or len(labels) < 2:
        raise UserError(f"{where}: segmentation needs class values 0..K-1 with K >= 2, got {sorted(labels)}")
    return dict(sorted(labels.items()))


def resolve_preprocessing(data: VolumeDataConfig, manifest: Manifest, stored: dict | None,
                          source: str) -> tuple[VolumePreprocessing, list[str]]:
    """The preprocessing to use and the warnings: the checkpoint's (`stored`) when given, else the config's.

    A warning names each field where the config differs from the checkpoint (fields that matter only:
    the window for CT, the percentiles for MR)."""
    ours = data.preprocessing(manifest.modality.get("0"))
    if stored is None:
        return ours, []
    theirs = VolumePreprocessing.from_dict(stored, where=source)
    notes = [f"data.{name}: the fine-tuning config has {mine!r} but the pretrained checkpoint {source} "
             f"was trained with {value!r}; using the checkpoint's {value!r}"
             for name, (mine, value) in ours.differences(theirs).items()]
    return theirs, notes


def select_labelled(entries: list[dict], count: int | None, seed: int, *, field: str = "seg.labelled_volumes"
                    ) -> list[dict]:
    """`count` entries chosen per patient: patients in a seeded order, round by round (each patient's
    first study, then each one's second, ...). Deterministic per seed; nested over count. None: all."""
    if count is None:
        return list(entries)
    if count > len(entries):
        raise UserError(f"{field}: {count} labelled volumes asked for, the training split has {len(entries)}")
    patients = sorted({entry["patient_id"] for entry in entries})
    order = [patients[k] for k in numpy_generator(seed, _LABELLED_STREAM).permutation(len(patients))]
    return patients_in_turn(entries, order)[:count]


def check_labelled(entry: dict, classes: dict[int, str], declared_in: str) -> tuple[io.Volume, io.Volume]:
    """Read an entry's image and label map; UserError naming the label file when the grids differ, the
    label map holds values outside `classes` or is empty (`medssl.data.checks`)."""
    image = io.read_volume(entry["image"])
    label = io.read_volume(entry["label"], label=True)
    raise_first(labelled_volume_problems(image, label, classes, entry["where"], declared_in))
    return image, label


@dataclass
class Case:
    """One labelled volume for evaluation: the input's grid and the preprocessed image."""

    name: str  # image file name without .nii.gz etc.
    patient_id: str
    study_id: str
    image_path: Path
    image: np.ndarray  # (X, Y, Z) float32 on the input's grid
    label: np.ndarray  # (X, Y, Z) int on the input's grid
    affine: np.ndarray  # (4, 4) the input's
    spacing: tuple[float, float, float]
    preprocessed: MetaTensor  # (1, D, H, W) whole preprocessed image, with its transform trace


def load_cases(entries: list[dict], predictor: SlidingWindowPredictor, classes: dict[int, str], declared_in: str
               ) -> list[Case]:
    """Check and load labelled entries (dicts of `manifest_volume_entries(..., with_label=True)`),
    preprocessed by the `predictor` that will invert their predictions."""
    cases = []
    for entry in entries:
        image, label = check_labelled(entry, classes, declared_in)
        name = Path(entry["image"]).name.split(".")[0]
        cases.append(Case(name, entry["patient_id"], entry["study_id"], Path(entry["image"]), image.array,
                          label.array, image.affine, image.spacing, predictor.preprocess(entry["image"])))
    return cases


def build_network(config: FinetuneSegConfig, classes: int, pretrained: Path | None
                  ) -> tuple[nn.Module, EncoderLoadReport | None]:
    """The segmentation network (seeded by train.seed) and, with `pretrained`, its encoder's load report."""
    torch.manual_seed(config.train.seed)
    network = build_segmentation_network(config.model, classes)
    if pretrained is None:
        return network, None
    return network, load_pretrained_encoder(network, pretrained, arch=config.model, min_fraction=1.0)


# ------------------------------------------------------------------------------------------------ training


class SegBatches(Dataset):
    """Micro-batch i: `size` random crops of `crop` from the labelled volumes, drawn by (seed, i).

    images, labels: (1, D, H, W) tensors, each at least `crop` per axis. Item: {"image": (B, 1, *crop)
    float32, "label": (B, 1, *crop) int64}."""

    def __init__(self, images: list[torch.Tensor], labels: list[torch.Tensor], *, crop: Sequence[int], size: int,
                 seed: int):
        self.images, self.labels, self.crop, self.size, self.seed = images, labels, tuple(crop), size, seed

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        rng = numpy_generator(self.seed, i)
        images, labels = [], []
        for _ in range(self.size):
            k = int(rng.integers(len(self.images)))
            shape = self.images[k].shape[1:]
            start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, self.crop)]
            window = (slice(None),) + tuple(slice(a, a + c) for a, c in zip(start, self.crop))
            images.append(self.images[k][window])
            labels.append(self.labels[k][window])
        return {"image": torch.stack(images).float(), "label": torch.stack(labels).long()}


def load_training_volumes(entries: list[dict], prep: VolumePreprocessing, cache_dir: Path | None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Whole preprocessed images and label maps, (1, D, H, W) each (cached with `cache_dir`)."""
    data = volume_dataset(entries, whole_volume_pipeline(prep, with_label=True), cache_dir=cache_dir)
    items = [data[i] for i in range(len(entries))]
    return [item["image"].as_tensor() for item in items], [item["label"].as_tensor().round().to(torch.uint8)
                                                          for item in items]


class DiceCEObjective:
    """`monai.losses.DiceCELoss` (softmax, one-hot target) as a Trainer objective; logs both terms."""

    def __init__(self, lambda_dice: float, lambda_ce: float):
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        logits = model(batch["image"]).float()
        loss = self.loss(logits, batch["label"])
        with torch.no_grad():
            terms = {"dice": self.loss.dice(logits, batch["label"]), "ce": self.loss.ce(logits, batch["label"])}
        return StepOutput(loss=loss, terms=terms, items=int(batch["image"].shape[0]))


def encoder_stages(encoder: VolumeEncoder) -> list[nn.Module]:
    """The encoder's stages, fine to coarse: its `parts`, a ModuleList part giving one stage per element."""
    stages: list[nn.Module] = []
    for part in encoder.parts:
        module = getattr(encoder, part)
        stages.extend(module if isinstance(module, nn.ModuleList) else [module])
    return stages


def layerwise_param_groups(network: nn.Module, encoder: VolumeEncoder, layer_decay: float) -> list[ParamGroup]:
    """Trainer groups: decoder and head at scale 1 ("head"), encoder stage i of S at layer_decay^(S - i)
    ("stage<i>"); biases and norm weights (ndim <= 1) without weight decay (".no_decay"). The first
    group is at scale 1 (its lr is the logged `lr`)."""
    stages = encoder_stages(encoder)
    stage_of = {id(p): i for i, stage in enumerate(stages) for p in stage.parameters()}
    buckets: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for p in network.parameters():
        buckets.setdefault((stage_of.get(id(p), len(stages)), p.ndim > 1), []).append(p)
    groups = []
    for (stage, decay), params in sorted(buckets.items(), key=lambda kv: (-kv[0][0], not kv[0][1])):
        name = ("head" if stage == len(stages) else f"stage{stage}") + ("" if decay else ".no_decay")
        groups.append(ParamGroup(name, params, lr_scale=layer_decay ** (len(stages) - stage), weight_decay=decay))
    return groups


# ------------------------------------------------------------------------------------------------ inference


def case_metrics(pred: np.ndarray, truth: np.ndarray, classes: dict[int, str],
                 spacing: Sequence[float]) -> dict[str, float]:
    """Per-class Dice and HD95 (mm), background excluded, and their NaN-skipping means.

    pred, truth: (X, Y, Z) integer label maps on the same grid with voxel size `spacing`."""
    k = len(classes)
    p = one_hot(torch.as_tensor(pred.astype(np.int64))[None, None], k)
    t = one_hot(torch.as_tensor(truth.astype(np.int64))[None, None], k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(p, t)[0]
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(
            p, t, spacing=[float(s) for s in spacing])[0]
    names = list(classes.values())[1:]
    out = {f"dice_{n}": float(v) for n, v in zip(names, dice)}
    out.update({f"hd95_{n}": float(v) if math.isfinite(float(v)) else math.nan for n, v in zip(names, hd95)})
    out["dice_mean"] = _nanmean([out[f"dice_{n}"] for n in names])
    out["hd95_mean"] = _nanmean([out[f"hd95_{n}"] for n in names])
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def mean_metrics(rows: list[dict[str, float]], prefix: str) -> dict[str, float]:
    """Mean over cases (NaN-skipping) of every metric, keys prefixed: {"test_dice_mean": ...}."""
    return {f"{prefix}_{key}": _nanmean([row[key] for row in rows]) for key in rows[0]} if rows else {}


def evaluate_cases(network: nn.Module, cases: list[Case], predictor: SlidingWindowPredictor,
                   classes: dict[int, str]) -> tuple[list[dict[str, float]], list[np.ndarray]]:
    """Per-case metrics and predictions (X, Y, Z) of `network` (put in eval mode) on `cases`."""
    network.eval()
    preds = [predictor.labels(network, case.preprocessed) for case in cases]
    return [case_metrics(pred, case.label, classes, case.spacing) for pred, case in zip(preds, cases)], preds


# ------------------------------------------------------------------------------------------------ outputs


def write_cases_csv(path: Path, cases: list[Case], rows: list[dict[str, float]]) -> None:
    """One row per case: case, patient_id, study_id, image, then every metric."""
    buffer = textio.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["case", "patient_id", "study_id", "image", *rows[0]])
    for case, row in zip(cases, rows):
        writer.writerow([case.name, case.patient_id, case.study_id, str(case.image_path),
                         *(f"{v:.6g}" for v in row.values())])
    write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ the task


@dataclass
class Prepared:
    """Everything a run needs, built and checked before the run directory is touched."""

    classes: dict[int, str]
    network: nn.Module
    encoder: VolumeEncoder
    report: EncoderLoadReport | None
    prep: VolumePreprocessing
    warnings: list[str]
    train_entries: list[dict]
    images: list[torch.Tensor]  # (1, D, H, W) whole preprocessed training volumes
    labels: list[torch.Tensor]
    predictor: SlidingWindowPredictor
    val_cases: list[Case]
    test_cases: list[Case]
    device: torch.device


def prepare(config: FinetuneSegConfig, pretrained: Path | None) -> Prepared:
    """Read the manifest, build (and load) the network, choose and check every volume; writes nothing."""
    s = config.seg
    manifest = load_manifest(config.data.manifest)
    source = str(config.data.manifest)
    classes = class_names(s, manifest, source)
    declared_in = "seg.labels" if s.labels is not None else f"{source} 'labels'"
    splits = {split: manifest.patients(split) for split in (s.train_split, s.val_split, s.test_split)}
    raise_first(patient_split_problems(splits, source))
    network, report = build_network(config, len(classes), pretrained)
    prep, notes = resolve_preprocessing(config.data, manifest, report.preprocessing if report else None,
                                        str(pretrained))
    encoder = network_encoder(network, config.model)
    encoder.check_input_size(prep.crop_size)
    train_entries = select_labelled(manifest_volume_entries(manifest, s.train_split, with_label=True),
                                    s.labelled_volumes, config.train.seed)
    for entry in train_entries:
        check_labelled(entry, classes, declared_in)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor = SlidingWindowPredictor(prep, sw_batch_size=s.sw_batch_size, overlap=s.sw_overlap, mode=s.sw_mode,
                                       device=device)
    val_cases, test_cases = (load_cases(manifest_volume_entries(manifest, split, with_label=True), predictor,
                                        classes, declared_in) for split in (s.val_split, s.test_split))
    if not test_cases:
        raise UserError(f"{source}: the '{s.test_split}' split has no labelled volume to test on")
    images, labels = load_training_volumes(train_entries, prep, config.data.cache_dir)
    return Prepared(classes, network, encoder, report, prep, notes, train_entries, images, labels, predictor,
                    val_cases, test_cases, device)


def train(config: FinetuneSegConfig, ready: Prepared, run: RunDir) -> None:
    """Fine-tune `ready.network` through the shared Trainer (layer-wise groups, freezing, validation)."""
    s, cfg = config.seg, config.train

    def validate(model: nn.Module, step: int) -> dict[str, float]:
        return mean_metrics(evaluate_cases(model, ready.val_cases, ready.predictor, ready.classes)[0], "val")

    arch = {"model": config.model.model_dump(mode="json"), "classes": {str(k): v for k, v in ready.classes.items()}}
    trainer = Trainer(ready.network, DiceCEObjective(s.lambda_dice, s.lambda_ce),
                      SegBatches(ready.images, ready.labels, crop=ready.prep.crop_size, size=cfg.batch_size,
                                 seed=cfg.seed),
                      config=cfg, run_dir=run, ctx=DistContext(device=ready.device),
                      checkpointing=Checkpointing(kind=Kind.FINETUNE_SEG, arch=arch, preprocessing=ready.prep.to_dict(),
                                                  config=config.model_dump(mode="json")),
                      evaluate=validate if ready.val_cases else None, eval_every=s.eval_every or cfg.steps,
                      best_metric="val_dice_mean" if ready.val_cases else None,
                      param_groups=layerwise_param_groups(ready.network, ready.encoder, s.layer_decay),
                      freeze=Freeze(ready.encoder, s.freeze_encoder_steps) if s.freeze_encoder_steps else None)
    trainer.fit()


def score_test_split(config: FinetuneSegConfig, ready: Prepared, run: RunDir) -> dict[str, Any]:
    """Test the best (else last) checkpoint; write predictions, test_cases.csv and the overlay PNG;
    returns the test metrics (flat keys)."""
    tested = run.best_checkpoint if run.best_checkpoint.exists() else run.last_checkpoint
    payload = load_checkpoint(tested, kind=Kind.FINETUNE_SEG)
    load_weights(ready.network, payload["model"], min_fraction=1.0, source=str(tested))
    tick = time.perf_counter()
    rows, preds = evaluate_cases(ready.network, ready.test_cases, ready.predictor, ready.classes)
    seconds = time.perf_counter() - tick
    for case, pred in zip(ready.test_cases, preds):
        io.write_volume(run.path / "predictions" / f"{case.name}.nii.gz", pred, case.affine)
    write_cases_csv(run.path / "test_cases.csv", ready.test_cases, rows)
    shown = config.seg.overlay_cases
    if shown:
        write_label_overlay(run.path / "test_overlay.png", [
            LabelledCase(case.name, case.image, case.affine, pred, case.label)
            for case, pred in zip(ready.test_cases[:shown], preds[:shown])])
    return {**mean_metrics(rows, "test"), "test_cases": len(rows), "test_volumes_per_s": len(rows) / max(seconds, 1e-9),
            "test_checkpoint": f"{tested.name} (step {payload['step']})"}


def finetune_seg(config: FinetuneSegConfig, run_dir: str | Path, *, pretrained: Path | None = None,
                 quiet: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate on the test split and write the run directory (module docstring); returns the
    summary. Every input is checked before anything is written: a UserError leaves `run_dir` as it was.
    Preprocessing warnings go to stderr (unless `quiet`) and into the summary."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=False)
    ready = prepare(config, pretrained)
    if not quiet:
        for message in ready.warnings:
            print(f"warning: {message}", file=sys.stderr)
    run = RunDir(run_dir)
    run.write_config(dump_config(config))
    train(config, ready, run)
    entries, report = ready.train_entries, ready.report
    summary = {**_read_json(run.path / "summary.json"), **score_test_split(config, ready, run),
               "labelled_volumes": len(entries), "labelled_patients": len({e["patient_id"] for e in entries}),
               "labelled_cases": ",".join(Path(e["image"]).name.split(".")[0] for e in entries),
               "pretrained": str(pretrained) if pretrained else None,
               "encoder_loaded_fraction": report.fraction if report else None,
               "encoder_load_report": str(report) if report else None, "warnings": ready.warnings}
    run.write_summary(summary)
    return summary


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}
