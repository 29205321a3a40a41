"""`medssl ground train`: the organ head, the finding scorer from reports, calibration, evaluation.

1. The organ head (where): `--organs RUN` takes a `finetune seg` run (or checkpoint) of the manifest's label
   set; otherwise `finetune seg` runs into RUN/organs/ (`organs` section: `seg.labelled_volumes` labelled
   training volumes, default 8, small organs weighted, from --pretrained when given). A resumed run reuses a
   finished RUN/organs/ and resumes an unfinished one.
2. The training studies (volume + report, nothing else): every report parsed into positive findings and
   normal organs (`data.report_bags`), every volume through the organ head (`infer.Grounder.prepare`), the
   organ voxels of every bag (`features.OrganVoxels`) written to RUN/organ_voxels/ as they are computed and read
   back a few at a time (`voxel_store`); a resumed run reuses those already written.
3. The finding scorer (what) trained by the shared Trainer on bags: balanced bag cross-entropy plus the pull
   towards its untrained start (`losses`).
4. The not-found threshold from the calibration split's reports (`evaluate.calibrate`), `grounding.pt`,
   the evaluation of `evaluate.evaluate` on the evaluation split, `grounding_eval.csv`, summary.json.
"""

from __future__ import annotations

import csv
import io as textio
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.atomic import write_text
from medssl.config import dump_config
from medssl.data import io
from medssl.data.checks import require_patient_independent
from medssl.data.manifest import Manifest, load_manifest
from medssl.data.volumes import manifest_volume_entries
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.grounding.data import Bag, MILBatches, ReportBags, build_bags, kinds_seen, report_bags
from medssl.downstream.grounding.evaluate import calibrate, eval_studies, evaluate
from medssl.downstream.grounding.infer import Grounder, GroundingSettings
from medssl.downstream.grounding.losses import anchored_l2, balanced_bag_loss
from medssl.downstream.grounding.organs import OrganHead, check_label_set
from medssl.downstream.grounding.scorer import FindingScorer
from medssl.downstream.grounding.voxel_store import OrganVoxelStore, organ_voxels_key
from medssl.downstream.segmentation.cases import select_labelled
from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.errors import UserError
from medssl.training.checkpoint import Kind, save_checkpoint
from medssl.training.distributed import (DistContext, init_distributed, main_first, raise_on_every_rank, rank_seed,
                                        wait_for_all)
from medssl.training.loop import Checkpointing, StepOutput, Trainer
from medssl.training.pretrained import read_encoder_checkpoint
from medssl.training.rundir import RunDir, prepare_run_dir


VOXELS = "organ_voxels"  # RUN/organ_voxels: the training studies' organ voxels (`voxel_store`)


def organ_class_weights(entries: list[dict], classes: dict[int, str]) -> tuple[float, ...]:
    """Dice + CE weight per class: (median organ volume / the organ's volume) ** 0.5 clipped to [1, 4] over
    the labelled volumes `entries`; background and body 1."""
    counts = np.zeros(len(classes))
    for entry in entries:
        labels = io.read_volume(entry["label"], label=True).array
        counts += np.bincount(labels.ravel().astype(np.int64), minlength=len(classes))[:len(classes)]
    organs = [k for k, name in classes.items() if name not in ("background", "body") and counts[k] > 0]
    median = float(np.median(counts[organs])) if organs else 1.0
    return tuple(float(np.clip((median / counts[k]) ** 0.5, 1.0, 4.0)) if k in organs else 1.0
                 for k in sorted(classes))


def organ_head_entries(config: GroundingConfig, manifest: Manifest) -> list[dict]:
    """The labelled training volumes the organ head is fine-tuned on (as `finetune seg` chooses them)."""
    seg = config.organs.seg
    return select_labelled(manifest_volume_entries(manifest, seg.train_split, with_label=True),
                           seg.labelled_volumes, config.organs.train.seed, field="organs.seg.labelled_volumes")


def organ_head_config(config: GroundingConfig, manifest: Manifest) -> FinetuneSegConfig:
    """The finetune seg config of the organ head (the grounding run's data and model)."""
    seg = config.organs.seg
    if config.organs.small_organ_weight and seg.class_weights is None:
        classes = {int(k): v for k, v in (seg.labels or manifest.labels or {}).items()}
        if not classes:
            raise UserError(f"{config.data.manifest}: no 'labels' to train the organ head on (set organs.seg.labels)")
        seg = seg.model_copy(update={"class_weights": organ_class_weights(organ_head_entries(config, manifest),
                                                                            classes)})
    return FinetuneSegConfig(data=config.data, train=config.organs.train, model=config.model, seg=seg)


def organ_head(config: GroundingConfig, manifest: Manifest, run_dir: Path, *, organs: Path | None,
               pretrained: Path | None, quiet: bool, ctx: DistContext) -> tuple[OrganHead, dict[str, Any]]:
    """(the organ head, what to say of it in the summary): loaded from `organs`, or trained into
    RUN/organs/ (reused when finished, resumed when interrupted; under torchrun every rank trains it, then
    waits for rank 0 to have tested and written it)."""
    if organs is not None:
        head = OrganHead.load(organs)
        check_label_set(head, manifest.labels, str(config.data.manifest))
        return head, {"organ_head": str(organs)}
    from medssl.downstream.segmentation.task import finetune_seg

    folder = run_dir / "organs"
    if not (folder / "summary.json").is_file():
        resume = (folder / "checkpoints" / "last.pt").is_file()
        finetune_seg(organ_head_config(config, manifest), folder, pretrained=pretrained, resume=resume, quiet=quiet)
    wait_for_all(ctx)
    head = OrganHead.load(folder)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return head, {"organ_head": str(folder), "organ_head_test_dice_mean": summary.get("test_dice_mean")}


@dataclass
class TrainingStudies:
    """The training studies' bags and the organ voxels they point at (on disk)."""

    reports: list[ReportBags]
    bags: list[Bag]
    voxels: OrganVoxelStore
    kinds_by_organ: dict[str, list[str]]
    median_size: dict[str, float]


def training_entries(manifest: Manifest, split: str) -> list:
    """The volumes of `split`; one without a report, or whose header breaks `io.check_geometry`, is a UserError
    (grounding trains on (volume, report) pairs; headers only are read)."""
    entries = [e for e in manifest.split(split) if e.image]
    missing = [str(e.image) for e in entries if not (e.report or "").strip()]
    if missing:
        raise UserError(f"{len(missing)} volume(s) have no report to ground ({', '.join(missing[:5])}): grounding "
                        "trains on (volume, report) pairs")
    for entry in entries:
        io.read_shape(manifest.path(entry.image))
    return entries


def training_studies(grounder: Grounder, manifest: Manifest, split: str, store: OrganVoxelStore, *,
                     quiet: bool, ctx: DistContext | None = None) -> TrainingStudies:
    """Parse every report of `split`; run the organ head on each volume whose bags' organ voxels `store` lacks
    and write them there. Under torchrun each rank takes every world_size-th study, then every rank indexes all
    of them (a failure on one rank is raised on all)."""
    ctx = ctx or DistContext()
    entries = training_entries(manifest, split)
    organs = grounder.head.organs
    reports = [report_bags(e.report, organs) for e in entries]
    if not any(r.findings for r in reports):
        raise UserError(f"{manifest.root}: no finding statement naming an organ and a kind in any '{split}' "
                        "report; grounding learns from reports that state findings")
    kinds_by_organ, median_size = kinds_seen(reports)
    bags = build_bags(reports, kinds_by_organ, median_size)
    needed: dict[int, set[str]] = {}
    for bag in bags:
        needed.setdefault(bag.study, set()).add(bag.organ)
    from tqdm.auto import tqdm

    studies = sorted(needed)
    mine = studies[ctx.rank::ctx.world_size]
    error = None
    try:
        for study in tqdm(mine, desc="organ head over the training studies", disable=quiet):
            image = manifest.path(entries[study].image)
            missing = [organ for organ in sorted(needed[study]) if not store.reuse(study, image, organ)]
            if missing:
                grounded = grounder.prepare(image)
                for organ in missing:
                    store.add(study, image, organ, grounded.organ(organ))
    except UserError as err:
        error = str(err)
    raise_on_every_rank(error, ctx)
    for study in sorted(set(studies) - set(mine)):  # the other ranks' studies: their files are complete now
        image = manifest.path(entries[study].image)
        for organ in sorted(needed[study]):
            if not store.reuse(study, image, organ):
                raise UserError(f"{store.folder}: no organ voxels of {organ} in {image} after every rank wrote its "
                                "share; is RUN on a filesystem every node shares?")
    if not store:
        raise UserError(f"{manifest.root}: the organ head finds none of the organs the '{split}' reports name in "
                        "any of their volumes; nothing to train the finding scorer on")
    return TrainingStudies(reports, bags, store, kinds_by_organ, median_size)


def prepare_ground_run(run_dir: Path, *, resume: bool) -> None:
    """`prepare_run_dir`'s checks, except that --resume also continues a run stopped before the finding scorer's
    first checkpoint (its organ head or organ voxels on disk)."""
    started = any((run_dir / folder).is_dir() for folder in ("organs", VOXELS))
    if not (resume and started and not (run_dir / "checkpoints" / "last.pt").is_file()):
        prepare_run_dir(run_dir, resume=resume)


class MILObjective:
    """objective(model, batch, generator) -> StepOutput: balanced bag cross-entropy + anchor pull."""

    def __init__(self, anchor_weight: float):
        self.anchor_weight = anchor_weight

    def __call__(self, model: nn.Module, batch: dict, generator: torch.Generator) -> StepOutput:
        scorer = model.module if hasattr(model, "module") else model
        logits = torch.stack([scorer.bag_logit(int(kind), organ, phi, k, prior) for phi, prior, k, kind, organ
                              in zip(batch["phi"], batch["prior"], batch["k"], batch["kind"], batch["organ"])])
        mil = balanced_bag_loss(logits, batch["label"])
        anchor = anchored_l2(scorer.weight, scorer.anchor)
        return StepOutput(loss=mil + self.anchor_weight * anchor, terms={"mil": mil, "anchor": anchor},
                          items=len(batch["k"]))


def _rows_csv(rows: list[dict]) -> str:
    columns = sorted({key for row in rows for key in row})
    buffer = textio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def ground_train(config: GroundingConfig, run_dir: str | Path, *, pretrained: Path | None = None,
                 organs: Path | None = None, resume: bool = False, quiet: bool = False,
                 evaluate_split: bool = True) -> dict[str, Any]:
    """Train, calibrate, export `grounding.pt`, evaluate and write the run directory; returns the summary."""
    run_dir = Path(run_dir)
    ctx = init_distributed()
    manifest = load_manifest(config.data.manifest)
    require_patient_independent(manifest, (config.train_split, config.eval.split, config.eval.calibration_split),
                                str(config.data.manifest))
    training_entries(manifest, config.train_split)  # refused before minutes of organ-head training
    if pretrained is not None and organs is None:
        read_encoder_checkpoint(pretrained)
    if ctx.is_main:
        prepare_ground_run(run_dir, resume=resume)
    head, head_summary = organ_head(config, manifest, run_dir, organs=organs, pretrained=pretrained, quiet=quiet,
                                    ctx=ctx)
    windows = [tuple(w) for w in config.scorer.windows] if head.prep.modality == "CT" else None
    probe = Grounder(head, FindingScorer(["lesion"], [], len(windows or [None]), 1),
                     GroundingSettings(windows, {}, {}), str(run_dir / "grounding.pt"))
    key = organ_voxels_key(head, windows)
    store = main_first(lambda: OrganVoxelStore.open(run_dir / VOXELS, key, clean=ctx.is_main), ctx)
    studies = training_studies(probe, manifest, config.train_split, store, quiet=quiet or not ctx.is_main,
                               ctx=ctx)
    kinds = sorted(studies.median_size)
    channels = studies.voxels[next(iter(studies.voxels))].decoder_z.shape[0]
    torch.manual_seed(config.train.seed)
    scorer = FindingScorer(kinds, sorted(studies.kinds_by_organ), len(windows or [None]), channels)
    run = RunDir(run_dir, enabled=ctx.is_main)
    batches = MILBatches(studies.bags, studies.voxels, kinds, bags_per_step=config.train.batch_size,
                         seed=rank_seed(config.train.seed, ctx))
    checkpointing = Checkpointing(kind=Kind.GROUNDING, arch={"scorer": scorer.arch()},
                                  preprocessing=head.prep.to_dict(), config=config.model_dump(mode="json"))
    trainer = Trainer(scorer, MILObjective(config.scorer.anchor_weight), batches, config=config.train, run_dir=run,
                      ctx=ctx, checkpointing=checkpointing)
    if resume and run.last_checkpoint.is_file():
        trainer.resume()
    elif resume:  # stopped before the scorer's first checkpoint: its training starts over
        run.truncate_metrics(0)
    run.write_config(dump_config(config))  # after a resume is accepted: a refused one changes nothing
    positives = sum(b.label for b in studies.bags)
    summary = trainer.fit({"train_studies": len(studies.reports), "train_positive_bags": positives,
                           "train_negative_bags": len(studies.bags) - positives,
                           "train_statements_skipped": sum(r.skipped for r in studies.reports)})
    if not ctx.is_main:
        return {}
    settings = GroundingSettings(windows, studies.kinds_by_organ, studies.median_size)
    grounder = Grounder(head, trainer.model.eval(), settings, str(run_dir / "grounding.pt"))
    calibration = calibrate(grounder, eval_studies(manifest, config.eval.calibration_split),
                            per_study=config.eval.calibration_per_study, seed=config.train.seed)
    settings.threshold = calibration["threshold"]
    weights, arch = grounder.state()
    save_checkpoint(run_dir / "grounding.pt", kind=Kind.GROUNDING_MODEL, step=trainer.step, model=weights, arch=arch,
                    preprocessing=head.prep.to_dict(), config=config.model_dump(mode="json"),
                    state={"calibration": calibration})
    summary.update(head_summary)
    summary.update({f"calibration_{k}": v for k, v in calibration.items()})
    summary.update({"pretrained": str(pretrained) if pretrained else None, "kinds": ", ".join(kinds)})
    if evaluate_split:
        scores, rows = evaluate(grounder, manifest, config.eval.split, absent_per_study=config.eval.absent_per_study,
                                swap_per_study=config.eval.swap_per_study, seed=config.train.seed)
        write_text(run_dir / "grounding_eval.csv", _rows_csv(rows))
        summary.update({f"test_{k}": v for k, v in scores.items()})
    run.write_summary(summary)
    return summary
