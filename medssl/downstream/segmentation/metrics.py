"""Scoring predictions against label maps with MONAI: per-class Dice and HD95 per case, their means, the CSV."""

from __future__ import annotations

import csv
import io as textio
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot
from torch import nn

from medssl.atomic import write_text
from medssl.downstream.segmentation.cases import Case, LoadedCase
from medssl.inference import SlidingWindowPredictor


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
                   classes: dict[int, str],
                   on_case: Callable[[Case, LoadedCase, np.ndarray], None] | None = None) -> list[dict[str, float]]:
    """Per-case metrics of `network` (put in eval mode) on `cases`, read one at a time; `on_case(case, its
    volumes, prediction (X, Y, Z))` is called for each before the next is read (e.g. to write the prediction)."""
    network.eval()
    rows = []
    for case in cases:
        loaded = case.load(predictor)
        pred = predictor.labels(network, loaded.preprocessed)
        rows.append(case_metrics(pred, loaded.label, classes, case.spacing))
        if on_case is not None:
            on_case(case, loaded, pred)
    return rows


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
