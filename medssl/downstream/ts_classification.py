"""Patient-independent time-series classification from a (pretrained) encoder: linear probe and fine-tuning.

Protocol:
- Splits come from the manifest: classifiers learn on `eval.train_split` (default "training") and are
  scored on `eval.test_splits` (default ["test"]); a patient in both is a UserError.
- Labels: the entry's "condition" (one class per patient). Label fractions are drawn PER PATIENT,
  stratified by class: for fraction f, each class keeps max(1, round(f x its patients)) patients,
  taken from one seeded permutation per class, so the 1 % patients are inside the 10 % ones, which
  are inside 100 %. All windows of a kept patient are labelled.
- probe: the encoder is frozen; pooled window features -> standardised -> scikit-learn
  LogisticRegression (L2, C = eval.probe_c). finetune: encoder + linear head trained end to end with
  cross-entropy through the shared Trainer (train.* settings, one sub-run per fraction).
- Metrics on the test windows: accuracy, macro-F1, AUROC, AUPRC (scikit-learn; macro one-vs-rest for
  more than two classes) at window level and at patient level (a patient's probabilities are the
  mean of its windows'). Bootstrap percentile intervals resample test PATIENTS with replacement
  (window-level metrics use all windows of the drawn patients); resamples where a metric is
  undefined (one class only) are left out of that metric's interval.
Summary keys: `{mode}_frac{pct}_{level}_{metric}` with `_ci_low` / `_ci_high`, e.g. `probe_frac10_patient_auroc`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, field_validator, model_validator
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler, label_binarize
from torch import nn
from torch.utils.data import Dataset

from medssl.config import StrictModel, TrainConfig, dump_config
from medssl.data.checks import require_patient_independent
from medssl.data.manifest import Manifest, load_manifest
from medssl.data.preprocessing import SignalDataConfig
from medssl.data.timeseries import WindowDataset, signal_windows
from medssl.errors import UserError
from medssl.models.ts_encoder import TSEncoder, TSEncoderConfig, load_timeseries_checkpoint, pool
from medssl.seeding import numpy_generator, torch_generator
from medssl.training.checkpoint import Kind, LoadReport, arch_differences
from medssl.training.distributed import DistContext, init_distributed, rank_seed
from medssl.training.loop import Checkpointing, StepOutput, Trainer
from medssl.training.rundir import RunDir, prepare_run_dir

Split = Literal["training", "validation", "test"]
METRICS = ("accuracy", "macro_f1", "auroc", "auprc")
LEVELS = ("patient", "window")


class EvalSettings(StrictModel):
    """The `eval` section."""

    fractions: list[float] = Field(default_factory=lambda: [1.0, 0.1, 0.01])  # of the training patients, per class
    modes: list[Literal["probe", "finetune"]] = Field(default_factory=lambda: ["probe", "finetune"])
    train_split: Split = "training"
    test_splits: list[Split] = Field(default_factory=lambda: ["test"])
    probe_c: PositiveFloat = 1.0  # inverse L2 strength of the logistic-regression probe
    bootstrap: NonNegativeInt = 1000  # patient resamples for the intervals (0: none)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    batch_windows: int = Field(256, gt=0)  # windows per encoder call when extracting features / predicting

    @field_validator("fractions")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not value or any(not 0.0 < f <= 1.0 for f in value):
            raise ValueError("each fraction must be in (0, 1]")
        return value


class EvalTimeseriesConfig(StrictModel):
    """`medssl eval timeseries` (configs/eval_timeseries.yaml). With --pretrained, data.fs, data.channels,
    data.window_seconds and model must match the checkpoint's."""

    data: SignalDataConfig
    train: TrainConfig  # fine-tuning optimisation (steps per fraction, batch of windows, lr, seed)
    model: TSEncoderConfig = TSEncoderConfig()
    eval: EvalSettings = EvalSettings()

    @model_validator(mode="after")
    def _consistent(self) -> EvalTimeseriesConfig:
        if self.eval.train_split in self.eval.test_splits:
            raise ValueError(f"eval.train_split '{self.eval.train_split}' is also in eval.test_splits")
        self.data.check_channel_count(self.model.in_channels)
        return self


# ------------------------------------------------------------------------------------------------ splits and labels


def check_patient_independent(manifest: Manifest, train_split: str, test_splits: Sequence[str]) -> None:
    """UserError naming a patient that is in the train split and a test split (or in two test splits)."""
    require_patient_independent(manifest, [train_split, *test_splits], str(manifest.root))


def patient_labels(windows: WindowDataset, source: str) -> np.ndarray:
    """(n_patients,) class of each patient of `windows`; every window of a patient must carry the same label."""
    labels = np.full(len(windows.patient_ids), -1)
    for patient, label in zip(windows.patient_index.tolist(), windows.labels.tolist()):
        if label < 0:
            raise UserError(f"{source}: patient {windows.patient_ids[patient]} has no 'condition' label")
        if labels[patient] not in (-1, label):
            raise UserError(f"{source}: patient {windows.patient_ids[patient]} has windows of classes "
                            f"{labels[patient]} and {label}; labels must be per patient")
        labels[patient] = label
    return labels


def draw_patients(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Indices of the labelled patients: per class max(1, round(fraction x n_class)) from a seeded permutation.

    labels: (n_patients,) class per patient. Nested across fractions for one seed.
    """
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        order = numpy_generator(seed, int(cls))
        members = members[order.permutation(len(members))]
        chosen.append(members[:max(1, round(fraction * len(members)))])
    return np.sort(np.concatenate(chosen))


def fraction_key(fraction: float) -> str:
    """1.0 -> "frac100", 0.1 -> "frac10", 0.01 -> "frac1", 0.005 -> "frac0.5"."""
    return f"frac{fraction * 100:g}"


# ------------------------------------------------------------------------------------------------ metrics


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1, AUROC, AUPRC of probabilities prob (N, K) against classes y (N,); NaN when undefined."""
    classes = np.arange(prob.shape[1])
    pred = prob.argmax(axis=1)
    out = {"accuracy": float(accuracy_score(y, pred)),
           "macro_f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0))}
    if len(np.unique(y)) < 2:
        return {**out, "auroc": math.nan, "auprc": math.nan}
    if prob.shape[1] == 2:
        return {**out, "auroc": float(roc_auc_score(y, prob[:, 1])),
                "auprc": float(average_precision_score(y, prob[:, 1]))}
    onehot = label_binarize(y, classes=classes)
    present = onehot.any(axis=0)
    return {**out, "auroc": float(roc_auc_score(onehot[:, present], prob[:, present], average="macro")),
            "auprc": float(average_precision_score(onehot[:, present], prob[:, present], average="macro"))}


def patient_probabilities(prob: np.ndarray, patient: np.ndarray, n_patients: int) -> np.ndarray:
    """Mean window probability per patient: prob (N, K), patient (N,) -> (n_patients, K)."""
    sums = np.zeros((n_patients, prob.shape[1]))
    np.add.at(sums, patient, prob)
    return sums / np.bincount(patient, minlength=n_patients)[:, None].clip(min=1)


def evaluate_predictions(prob: np.ndarray, patient: np.ndarray, labels: np.ndarray, *, bootstrap: int,
                         confidence: float, seed: int) -> dict[str, float]:
    """Window- and patient-level metrics with patient-bootstrap intervals.

    prob (N, K) window probabilities; patient (N,) patient index; labels (n_patients,) class per patient.
    """
    n = len(labels)
    result = {f"{level}_{k}": v for level, metrics in zip(LEVELS, _both_levels(prob, patient, labels))
              for k, v in metrics.items()}
    if bootstrap == 0:
        return result
    rng = numpy_generator(seed, 7919)
    windows_of = [np.flatnonzero(patient == p) for p in range(n)]
    draws = {key: [] for key in result}
    for _ in range(bootstrap):
        sample = rng.integers(0, n, size=n)
        idx = np.concatenate([windows_of[p] for p in sample])
        # relabel drawn patients 0..n-1 so that a patient drawn twice counts twice
        relabelled = np.repeat(np.arange(n), [len(windows_of[p]) for p in sample])
        for level, metrics in zip(LEVELS, _both_levels(prob[idx], relabelled, labels[sample])):
            for k, v in metrics.items():
                draws[f"{level}_{k}"].append(v)
    tail = (1 - confidence) / 2 * 100
    for key, values in draws.items():
        values = np.asarray(values)
        values = values[np.isfinite(values)]
        low, high = np.percentile(values, [tail, 100 - tail]) if len(values) else (math.nan, math.nan)
        result[f"{key}_ci_low"], result[f"{key}_ci_high"] = float(low), float(high)
    return result


def _both_levels(prob: np.ndarray, patient: np.ndarray,
                 labels: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """(patient-level, window-level) metrics; patient (N,) indexes labels (n_patients,)."""
    by_patient = patient_probabilities(prob, patient, len(labels))
    return classification_metrics(labels, by_patient), classification_metrics(labels[patient], prob)


# ------------------------------------------------------------------------------------------------ models


class Classifier(nn.Module):
    """Encoder + linear head on the max-pooled window representation: (B, C, T) -> (B, K) logits."""

    def __init__(self, encoder: TSEncoder, classes: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.out_dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pool(self.encoder(x)))


def load_encoder(config: EvalTimeseriesConfig, pretrained: Path | None) -> tuple[TSEncoder, LoadReport | None]:
    """A fresh encoder (scratch) or a pretrained one (a pretraining checkpoint or its exported encoder.pt),
    with its LoadReport (min_fraction 1.0)."""
    if pretrained is None:
        return TSEncoder(config.model), None
    stored = load_timeseries_checkpoint(pretrained, (Kind.PRETRAIN_TIMESERIES, Kind.TIMESERIES_ENCODER))
    if stored.encoder.config != config.model:
        raise UserError(f"{pretrained}: the checkpoint's encoder differs from the config's: " + arch_differences(
            stored.encoder.config.model_dump(), config.model.model_dump(), prefix="model"))
    ours, theirs = config.data.to_dict(), stored.preprocessing
    for key in ("fs", "channels", "window"):
        if ours[key] != theirs.get(key):
            field = {"fs": "data.fs", "channels": "data.channels", "window": "data.window_seconds"}[key]
            raise UserError(f"{field}: {ours[key]!r} differs from the pretraining preprocessing {theirs.get(key)!r} "
                            f"of {pretrained}")
    return stored.encoder, stored.report


@torch.no_grad()
def encode(module: nn.Module, windows: WindowDataset, *, device: torch.device, batch: int) -> torch.Tensor:
    """module applied to every window in order, in chunks: -> (N, ...) on the CPU."""
    module.eval()
    out = []
    for start in range(0, len(windows), batch):
        x = torch.stack([windows[i]["x"] for i in range(start, min(start + batch, len(windows)))]).to(device)
        out.append(module(x).float().cpu())
    return torch.cat(out)


class LabelledBatches(Dataset):
    """Fine-tuning micro-batch i: `size` windows drawn uniformly (with replacement) from `indices` by (seed, i)."""

    def __init__(self, windows: WindowDataset, indices: np.ndarray, *, size: int, seed: int):
        self.windows, self.indices, self.size, self.seed = windows, torch.from_numpy(indices), size, seed

    def __len__(self) -> int:
        return 10**12

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        pick = self.indices[torch.randint(len(self.indices), (self.size,), generator=torch_generator(self.seed, i))]
        return {"x": torch.stack([self.windows[int(k)]["x"] for k in pick]), "y": self.windows.labels[pick]}


def cross_entropy(model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
    logits = model(batch["x"])
    loss = F.cross_entropy(logits.float(), batch["y"])
    accuracy = (logits.argmax(dim=1) == batch["y"]).float().mean()
    return StepOutput(loss=loss, terms={"ce": loss, "train_accuracy": accuracy}, items=len(batch["y"]))


def probe_probabilities(encoder: TSEncoder, train: WindowDataset, train_idx: np.ndarray, test: WindowDataset, *,
                        c: float, device: torch.device, batch: int, features: dict) -> np.ndarray:
    """Logistic-regression probe on frozen pooled features: -> (N_test, K) probabilities."""
    if "train" not in features:
        module = nn.Sequential(encoder, _Pool()).to(device)
        features["train"] = encode(module, train, device=device, batch=batch).numpy()
        features["test"] = encode(module, test, device=device, batch=batch).numpy()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))
    probe.fit(features["train"][train_idx], train.labels.numpy()[train_idx])
    return probe.predict_proba(features["test"])


class _Pool(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return pool(z)


def finetune_probabilities(encoder: TSEncoder, train: WindowDataset, train_idx: np.ndarray, test: WindowDataset, *,
                           classes: int, config: EvalTimeseriesConfig, run_dir: Path, ctx: DistContext) -> np.ndarray:
    """Encoder + head trained end to end on the labelled windows (one Trainer run in run_dir) -> (N_test, K).
    Under torchrun (`ctx`) every rank draws its own windows (`rank_seed`); rank 0 writes."""
    torch.manual_seed(config.train.seed)
    model = Classifier(copy.deepcopy(encoder), classes)
    trainer = Trainer(model, cross_entropy, LabelledBatches(train, train_idx, size=config.train.batch_size,
                                                            seed=rank_seed(config.train.seed, ctx)),
                      config=config.train, run_dir=RunDir(run_dir, enabled=ctx.is_main),
                      checkpointing=Checkpointing(kind=Kind.FINETUNE_TIMESERIES,
                                                  arch={**config.model.model_dump(), "classes": classes},
                                                  preprocessing=config.data.to_dict(),
                                                  config=config.model_dump(mode="json")), ctx=ctx)
    trainer.fit()
    logits = encode(trainer.model, test, device=ctx.device, batch=config.eval.batch_windows)
    return torch.softmax(logits, dim=1).numpy()


# ------------------------------------------------------------------------------------------------ the task


def eval_timeseries(config: EvalTimeseriesConfig, run_dir: Path, *, pretrained: Path | None,
                    quiet: bool = False) -> dict[str, Any]:
    """Probe and fine-tune at each label fraction; writes config.yaml, summary.json (and one sub-run per
    fine-tuning) in run_dir, prints a table (unless quiet) and returns the summary."""
    run_dir = Path(run_dir)
    ctx = init_distributed()
    if ctx.is_main:  # the other ranks would find rank 0's new folder
        prepare_run_dir(run_dir, resume=False)
    settings = config.eval
    manifest = load_manifest(config.data.manifest)
    check_patient_independent(manifest, settings.train_split, settings.test_splits)
    encoder, report = load_encoder(config, pretrained)
    train, train_notes = signal_windows(config.data, settings.train_split, manifest=manifest)
    test, test_notes = signal_windows(config.data, settings.test_splits, manifest=manifest)
    train_labels = patient_labels(train, f"{config.data.manifest} ({settings.train_split})")
    test_labels = patient_labels(test, f"{config.data.manifest} ({'+'.join(settings.test_splits)})")
    classes = int(train_labels.max()) + 1
    if len(np.unique(train_labels)) < 2:
        raise UserError(f"{config.data.manifest}: every '{settings.train_split}' patient has condition "
                        f"{int(train_labels[0])}; classification needs patients of at least two conditions")
    if test_labels.max() >= classes:
        raise UserError(f"{config.data.manifest}: test class {int(test_labels.max())} never occurs in "
                        f"'{settings.train_split}'")
    rundir = RunDir(run_dir, enabled=ctx.is_main)
    rundir.write_config(dump_config(config))
    summary: dict[str, Any] = {"pretrained": str(pretrained) if pretrained else None,
                               "load_report": str(report) if report else None,
                               "train_patients": len(train_labels), "test_patients": len(test_labels),
                               "train_windows": len(train), "test_windows": len(test),
                               "notes": train_notes + test_notes}
    rows = []
    features: dict[str, np.ndarray] = {}
    test_patient = test.patient_index.numpy()
    for fraction in settings.fractions:
        chosen = draw_patients(train_labels, fraction, config.train.seed)
        train_idx = np.flatnonzero(np.isin(train.patient_index.numpy(), chosen))
        key = fraction_key(fraction)
        summary[f"{key}_patients"] = len(chosen)
        summary[f"{key}_windows"] = len(train_idx)
        for mode in settings.modes:
            if mode == "probe":
                prob = probe_probabilities(encoder, train, train_idx, test, c=settings.probe_c, device=ctx.device,
                                           batch=settings.batch_windows, features=features)
            else:
                prob = finetune_probabilities(encoder, train, train_idx, test, classes=classes, config=config,
                                              run_dir=run_dir / f"finetune_{key}", ctx=ctx)
            metrics = evaluate_predictions(prob, test_patient, test_labels, bootstrap=settings.bootstrap,
                                           confidence=settings.confidence, seed=config.train.seed)
            summary.update({f"{mode}_{key}_{name}": value for name, value in metrics.items()})
            rows.append((mode, fraction, len(chosen), metrics))
    rundir.write_summary(summary)
    if not quiet and ctx.is_main:
        print_table(rows, summary, bootstrap=settings.bootstrap > 0)
    return summary


def print_table(rows: list[tuple[str, float, int, dict[str, float]]], summary: dict[str, Any], *,
                bootstrap: bool) -> None:
    """One row per (mode, fraction): patient-level metrics (with intervals) and window-level AUROC."""
    console = Console()
    if not console.is_terminal:  # logs and pipes: wide enough that the intervals are not cut
        console = Console(width=140)
    for note in summary["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    if summary["load_report"]:
        console.print(f"pretrained encoder {summary['pretrained']}: {summary['load_report']}", markup=False,
                      highlight=False)
    ci = " [CI]" if bootstrap else ""
    table = Table(title=f"patient-independent classification: {summary['test_patients']} test patients, "
                        f"{summary['test_windows']} windows; patient level{ci}")
    for column in ("mode", "labels", "patients", "accuracy", "macro-F1", "AUROC", "AUPRC", "window AUROC"):
        table.add_column(column, justify="left" if column == "mode" else "right")

    def cell(metrics: dict[str, float], key: str) -> str:
        text = f"{metrics[key]:.3f}"
        if bootstrap:
            text += f" [{metrics[key + '_ci_low']:.2f}-{metrics[key + '_ci_high']:.2f}]"
        return text

    for mode, fraction, patients, metrics in rows:
        table.add_row(mode, f"{fraction:.0%}", str(patients), *(cell(metrics, f"patient_{m}") for m in METRICS),
                      cell(metrics, "window_auroc"))
    console.print(table)
