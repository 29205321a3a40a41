"""`finetune_seg`: prepare (everything checked before anything is written), train, test, write the run directory."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medssl.config import dump_config
from medssl.data import io
from medssl.data.checks import require_patient_independent
from medssl.data.manifest import load_manifest
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.store import VolumeStore, ensure_store
from medssl.data.volumes import manifest_volume_entries
from medssl.downstream.segmentation.cases import (Case, LoadedCase, class_names, load_cases, resolve_preprocessing,
                                                 select_labelled, stored_training_scans)
from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.downstream.segmentation.metrics import evaluate_cases, mean_metrics, write_cases_csv
from medssl.downstream.segmentation.training import (DecayToPretrained, DiceCEObjective, SegBatches, build_network,
                                                     layerwise_param_groups, pretrained_parameters)
from medssl.errors import UserError
from medssl.inference import SlidingWindowPredictor
from medssl.models.volume_encoders import VolumeEncoder, network_encoder
from medssl.training.checkpoint import Kind, load_checkpoint, load_weights
from medssl.training.distributed import DistContext, init_distributed, main_first, rank_seed
from medssl.training.loop import Checkpointing, Freeze, Trainer
from medssl.training.pretrained import EncoderLoadReport
from medssl.training.rundir import RunDir, prepare_run_dir
from medssl.display.figures import LabelledCase, write_label_overlay


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
    store: VolumeStore  # the preprocessed store the training crops are read from
    train_scans: list[str]  # its scans of train_entries
    predictor: SlidingWindowPredictor
    val_cases: list[Case]
    test_cases: list[Case]


def prepare(config: FinetuneSegConfig, pretrained: Path | None, ctx: DistContext = DistContext()) -> Prepared:
    """Read the manifest, build (and load) the network, choose and check every volume; writes nothing.
    The device is this process's (`ctx`: under torchrun, its GPU)."""
    s = config.seg
    manifest = load_manifest(config.data.manifest)
    source = str(config.data.manifest)
    classes = class_names(s, manifest, source)
    for name, values in (("seg.class_weights", s.class_weights), ("seg.crops.ratios", s.crops.ratios)):
        if values is not None and len(values) != len(classes):
            raise UserError(f"{name}: {len(values)} values given, one per class is needed ({len(classes)}: "
                            f"{', '.join(classes.values())})")
    if s.decay_to_pretrained > 0 and pretrained is None:
        raise UserError(f"seg.decay_to_pretrained: {s.decay_to_pretrained} pulls weights toward pretrained ones, but "
                        "no --pretrained checkpoint was given (set it to 0 for a run from scratch)")
    declared_in = "seg.labels" if s.labels is not None else f"{source} 'labels'"
    require_patient_independent(manifest, (s.train_split, s.val_split, s.test_split), source)
    network, report = build_network(config, len(classes), pretrained)
    prep, notes = resolve_preprocessing(config.data, manifest, report.preprocessing if report else None,
                                        str(pretrained))
    encoder = network_encoder(network, config.model)
    encoder.check_input_size(prep.crop_size)
    train_entries = select_labelled(manifest_volume_entries(manifest, s.train_split, with_label=True),
                                    s.labelled_volumes, config.train.seed)
    predictor = SlidingWindowPredictor(prep, sw_batch_size=s.sw_batch_size, overlap=s.sw_overlap, mode=s.sw_mode,
                                       device=ctx.device)
    val_cases, test_cases = (load_cases(manifest_volume_entries(manifest, split, with_label=True), classes,
                                        declared_in) for split in (s.val_split, s.test_split))
    if not test_cases:
        raise UserError(f"{source}: the '{s.test_split}' split has no labelled volume to test on")
    store = main_first(lambda: ensure_store(config.data, prep, manifest, quiet=not ctx.is_main), ctx)
    train_scans = stored_training_scans(store, s.train_split, train_entries, prep, classes, declared_in)
    return Prepared(classes, network, encoder, report, prep, notes, train_entries, store, train_scans, predictor,
                    val_cases, test_cases)


def train(config: FinetuneSegConfig, ready: Prepared, run: RunDir, *, resume: bool = False,
          ctx: DistContext = DistContext()) -> None:
    """Fine-tune `ready.network` through the shared Trainer (layer-wise groups, freezing, validation); with
    `resume`, from the run's last.pt. The config is written once the run can go ahead. Under torchrun (`ctx`)
    every rank draws its own crops (`rank_seed`), as `ground train` does, and rank 0 validates."""
    s, cfg = config.seg, config.train

    def validate(model: nn.Module, step: int) -> dict[str, float]:
        return mean_metrics(evaluate_cases(model, ready.val_cases, ready.predictor, ready.classes), "val")

    arch = {"model": config.model.model_dump(mode="json"), "classes": {str(k): v for k, v in ready.classes.items()}}
    objective = DiceCEObjective(s.lambda_dice, s.lambda_ce, class_weights=s.class_weights,
                                deep_supervision=getattr(ready.network, "deep_supervision", None))
    pulled = pretrained_parameters(ready.network, ready.report) if s.decay_to_pretrained > 0 else frozenset()
    groups = layerwise_param_groups(ready.network, ready.encoder, s.layer_decay, pulled)
    decay = (DecayToPretrained(groups, s.decay_to_pretrained, lr=cfg.lr, warmup=cfg.warmup_steps, total=cfg.steps)
             if pulled else None)
    trainer = Trainer(ready.network, objective,
                      SegBatches.from_store(ready.store, ready.train_scans, ready.prep, size=cfg.batch_size,
                                            seed=rank_seed(cfg.seed, ctx), classes=len(ready.classes), crops=s.crops,
                                            augment=s.augment),
                      config=cfg, run_dir=run, ctx=ctx,
                      checkpointing=Checkpointing(kind=Kind.FINETUNE_SEG, arch=arch, preprocessing=ready.prep.to_dict(),
                                                  config=config.model_dump(mode="json")),
                      evaluate=validate if ready.val_cases else None, eval_every=s.eval_every or cfg.steps,
                      best_metric="val_dice_mean" if ready.val_cases else None,
                      param_groups=groups, after_step=decay,
                      freeze=Freeze(ready.encoder, s.freeze_encoder_steps) if s.freeze_encoder_steps else None)
    if resume:
        trainer.resume()
    run.write_config(dump_config(config))
    trainer.fit()


def score_test_split(config: FinetuneSegConfig, ready: Prepared, run: RunDir) -> dict[str, Any]:
    """Test the best (else last) checkpoint; write predictions, test_cases.csv and the overlay PNG;
    returns the test metrics (flat keys)."""
    tested = run.best_checkpoint if run.best_checkpoint.exists() else run.last_checkpoint
    payload = load_checkpoint(tested, kind=Kind.FINETUNE_SEG)
    load_weights(ready.network, payload["model"], min_fraction=1.0, source=str(tested))
    shown: list[LabelledCase] = []  # the overlay's cases (config.seg.overlay_cases), the rest not kept

    def write_prediction(case: Case, loaded: LoadedCase, pred: np.ndarray) -> None:
        io.write_volume(run.path / "predictions" / f"{case.name}.nii.gz", pred, case.affine)
        if len(shown) < config.seg.overlay_cases:
            shown.append(LabelledCase(case.name, case.image(), case.affine, pred, loaded.label))

    tick = time.perf_counter()
    rows = evaluate_cases(ready.network, ready.test_cases, ready.predictor, ready.classes, on_case=write_prediction)
    seconds = time.perf_counter() - tick  # predictions written included
    write_cases_csv(run.path / "test_cases.csv", ready.test_cases, rows)
    if shown:
        write_label_overlay(run.path / "test_overlay.png", shown)
    return {**mean_metrics(rows, "test"), "test_cases": len(rows), "test_volumes_per_s": len(rows) / max(seconds, 1e-9),
            "test_checkpoint": f"{tested.name} (step {payload['step']})"}


def finetune_seg(config: FinetuneSegConfig, run_dir: str | Path, *, pretrained: Path | None = None,
                 resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate on the test split and write the run directory (module docstring); returns the
    summary. Every input is checked before anything is written: a UserError leaves `run_dir` as it was.
    Preprocessing warnings go to stderr (unless `quiet`) and into the summary."""
    run_dir = Path(run_dir)
    tick = time.perf_counter()
    ctx = init_distributed()
    if ctx.is_main:  # the other ranks would find rank 0's new folder
        prepare_run_dir(run_dir, resume=resume)
    ready = prepare(config, pretrained, ctx)
    if not quiet and ctx.is_main:
        for message in ready.warnings:
            print(f"warning: {message}", file=sys.stderr)
    run = RunDir(run_dir, enabled=ctx.is_main)
    train(config, ready, run, resume=resume, ctx=ctx)
    if not ctx.is_main:  # rank 0 tests and writes the summary
        return {}
    entries, report = ready.train_entries, ready.report
    summary = {**_read_json(run.path / "summary.json"), **score_test_split(config, ready, run),
               "labelled_volumes": len(entries), "labelled_patients": len({e["patient_id"] for e in entries}),
               "labelled_cases": ",".join(Path(e["image"]).name.split(".")[0] for e in entries),
               "pretrained": str(pretrained) if pretrained else None,
               "pretrained_parts": report.parts if report else None,
               "encoder_loaded_fraction": report.encoder_fraction if report else None,
               "pretrained_load_report": str(report) if report else None, "warnings": ready.warnings,
               "seconds": time.perf_counter() - tick}
    run.write_summary(summary)
    return summary


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
