"""`medssl ground train`: train report grounding from (volume, report) pairs, calibrate, evaluate.

prepare (everything read and checked before the run directory is touched): the manifest, patient
independence of the training / calibration / evaluation splits, the training studies (preprocessed
volumes and their reports; no label, mask or lesion metadata), the anatomy graph (clustered on the
frozen initial encoder's features and body coordinates), the tokenizer (fitted on the training reports
and the graph's prompts), the model (encoder from --pretrained when given).
train: the shared Trainer with the active alignment objectives; the encoder at `grounding.encoder_lr_scale`
x the learning rate (0: frozen).
After training: the not-groundable threshold from the calibration split's reports, `grounding.pt` (the
model with its threshold, for `ground infer` and the app), the evaluation of `medssl.downstream.grounding.
evaluate` on the evaluation split with the model-randomisation control, `grounding_eval.csv` (one row
per scored phrase) and summary.json.
"""

from __future__ import annotations

import copy
import csv
import io as textio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.atomic import write_text
from medssl.config import dump_config
from medssl.data.checks import require_patient_independent
from medssl.data.manifest import Manifest, load_manifest
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.volumes import manifest_volume_entries
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.grounding.data import GroundingBatches, Study, grid_body, load_studies
from medssl.downstream.grounding.evaluate import calibrate, eval_studies, evaluate
from medssl.downstream.grounding.graph import AnatomyGraph
from medssl.downstream.grounding.infer import Grounder
from medssl.downstream.grounding.model import GroundingModel, fuse_maps, model_text
from medssl.downstream.grounding.objective import GroundingObjective
from medssl.errors import UserError
from medssl.models.volume_encoders import build_volume_encoder, load_pretrained_encoder
from medssl.text.encoders import build_text_encoder
from medssl.training.checkpoint import Kind, save_checkpoint
from medssl.training.distributed import init_distributed, rank_seed
from medssl.training.loop import Checkpointing, ParamGroup, Trainer
from medssl.training.rundir import RunDir, prepare_run_dir


@dataclass
class Prepared:
    """Everything a run needs, built and checked before the run directory is touched."""

    manifest: Manifest
    prep: VolumePreprocessing
    studies: list[Study]
    graph: AnatomyGraph | None
    model: GroundingModel
    arch: dict[str, Any]
    warnings: list[str]


def _preprocessing(config: GroundingConfig, manifest: Manifest, stored: dict | None, source: str
                   ) -> tuple[VolumePreprocessing, list[str]]:
    """The config's preprocessing, and a warning per field where a pretrained encoder saw other data (the
    crop size is the grounding run's own: it grounds whole volumes)."""
    prep = config.data.preprocessing(manifest.modality.get("0"))
    if stored is None:
        return prep, []
    theirs = VolumePreprocessing.from_dict(stored, where=source)
    return prep, [f"data.{name}: {mine!r} here, the pretrained encoder {source} was trained with {value!r}"
                  for name, (mine, value) in prep.differences(theirs).items() if name != "crop_size"]


def _graph_inputs(encoder: nn.Module, studies: list[Study], stride: int) -> list[tuple[np.ndarray, ...]]:
    """(features (F, d, h, w), coordinates (3, d, h, w), body (d, h, w)) of each study on the feature grid."""
    out = []
    with torch.no_grad():
        encoder.eval()
        for study in studies:
            x = study.x[None]
            features = fuse_maps(encoder(x[:, :1]), encoder.strides, stride)[0].numpy()
            coords = torch.nn.functional.avg_pool3d(x[:, 1:4], stride)[0].numpy()
            body = grid_body(study.body, stride).numpy()
            out.append((features, coords, body))
    return out


def prepare(config: GroundingConfig, pretrained: Path | None) -> Prepared:
    """Read and check every input, build the graph, the tokenizer and the model; writes nothing."""
    manifest = load_manifest(config.data.manifest)
    require_patient_independent(manifest, (config.train_split, config.eval.split, config.eval.calibration_split),
                                str(config.data.manifest))
    torch.manual_seed(config.train.seed)
    encoder = build_volume_encoder(config.model)
    report = load_pretrained_encoder(encoder, pretrained, arch=config.model) if pretrained else None
    prep, warnings = _preprocessing(config, manifest, report.preprocessing if report else None, str(pretrained))
    encoder.check_input_size(prep.crop_size)
    entries = manifest_volume_entries(manifest, config.train_split)
    reports = {str(manifest.path(e.image)): e.report or "" for e in manifest.split(config.train_split) if e.image}
    studies = load_studies(entries, reports, prep, edge_margin=config.grounding.edge_margin,
                           cache_dir=config.data.cache_dir, cache_max_gib=config.data.cache_max_gib)
    if not any(study.statements.findings for study in studies):
        raise UserError(f"{config.data.manifest}: no finding statement in any '{config.train_split}' report; "
                        "grounding learns from reports that state findings")
    stride = config.grounding.feature_stride
    graph = None
    if config.objectives.anatomy.weight > 0 or config.objectives.prior.weight > 0:
        inputs = _graph_inputs(encoder, studies[:config.graph.volumes], stride)
        graph = AnatomyGraph.build([f for f, _, _ in inputs], [c for _, c, _ in inputs], [b for _, _, b in inputs],
                                   regions=config.graph.regions, parts=config.graph.parts,
                                   voxels_per_volume=config.graph.voxels_per_volume,
                                   coord_weight=config.graph.coord_weight, seed=config.train.seed)
        for study, (features, coords, body) in zip(studies, _graph_inputs(encoder, studies, stride)):
            study.nodes = graph.assign(features, coords, body)
    texts = [s.report for s in studies] + ([p for level in (1, 2) for p in graph.prompts(level)] if graph else [])
    texts = [model_text(t, config.grounding.strip_measurements) for t in texts]
    text = build_text_encoder(config.text, texts)
    model = GroundingModel(config.model, config.grounding, text)
    model.encoder.load_state_dict(encoder.state_dict())
    model.freeze_graph_encoder_from_encoder()
    if config.grounding.encoder_lr_scale == 0:  # a frozen encoder: its features once per volume
        with torch.no_grad():
            model.encoder.eval()
            for study in studies:
                study.features = model.encoder_features(study.x[None, :1])[0].half()
    arch = {"encoder": config.model.model_dump(mode="json"), "grounding": config.grounding.model_dump(mode="json"),
            "text": config.text.model_dump(mode="json"), "tokenizer": text.tokenizer_state(),
            "graph": graph.to_dict() if graph else None}
    return Prepared(manifest, prep, studies, graph, model, arch, warnings)


def param_groups(model: GroundingModel, encoder_lr_scale: float) -> list[ParamGroup]:
    """The encoder at `encoder_lr_scale` (frozen at 0), the heads and the text encoder at 1; biases and
    norm weights without weight decay; the graph's frozen encoder not at all."""
    if encoder_lr_scale == 0:
        model.encoder.requires_grad_(False)
    encoder = {id(p) for p in model.encoder.parameters()}
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(("encoder" if id(p) in encoder else "heads", p.ndim > 1), []).append(p)
    return [ParamGroup(f"{part}{'' if decay else '.no_decay'}", params,
                       lr_scale=encoder_lr_scale if part == "encoder" else 1.0, weight_decay=decay)
            for (part, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0] != "heads", not kv[0][1]))]


def randomised(model: GroundingModel) -> GroundingModel:
    """A copy of the model with every layer re-initialised (the model-randomisation control)."""
    copied = copy.deepcopy(model)
    torch.manual_seed(12345)
    for module in copied.modules():
        if hasattr(module, "reset_parameters") and module is not copied:
            module.reset_parameters()
    return copied


def _rows_csv(rows: list[dict]) -> str:
    columns = sorted({key for row in rows for key in row})
    buffer = textio.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def ground_train(config: GroundingConfig, run_dir: str | Path, *, pretrained: Path | None = None,
                 resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Train, calibrate, export `grounding.pt`, evaluate and write the run directory; returns the summary."""
    run_dir = Path(run_dir)
    ctx = init_distributed()
    if ctx.is_main:
        prepare_run_dir(run_dir, resume=resume)
    ready = prepare(config, pretrained)
    if not quiet and ctx.is_main:
        for message in ready.warnings:
            print(f"warning: {message}", file=sys.stderr)
    run = RunDir(run_dir, enabled=ctx.is_main)
    batches = GroundingBatches(ready.studies, crop=ready.prep.crop_size, stride=config.grounding.feature_stride,
                               batch_size=config.train.batch_size, max_phrases=config.grounding.max_phrases,
                               seed=rank_seed(config.train.seed, ctx))
    checkpointing = Checkpointing(kind=Kind.GROUNDING, arch=ready.arch, preprocessing=ready.prep.to_dict(),
                                  config=config.model_dump(mode="json"))
    trainer = Trainer(ready.model, GroundingObjective(config, ready.graph), batches, config=config.train, run_dir=run,
                      ctx=ctx, checkpointing=checkpointing,
                      param_groups=param_groups(ready.model, config.grounding.encoder_lr_scale),
                      find_unused_parameters=True)
    if resume:
        trainer.resume()
    run.write_config(dump_config(config))  # after a resume is accepted: a refused one changes nothing
    summary = trainer.fit({"train_studies": len(ready.studies),
                           "train_phrases": sum(len(s.statements.findings) for s in ready.studies)})
    if not ctx.is_main:
        return {}
    model = trainer.model.eval()
    studies = [(s.image, s.patient_id, s.report) for s in eval_studies(ready.manifest, config.eval.calibration_split)]
    grounder = Grounder(model, ready.prep, ready.graph, 0.0, str(run_dir / "grounding.pt"),
                        sw_batch_size=config.eval.sw_batch_size)
    calibration = calibrate(grounder, studies, seed=config.train.seed)
    grounder.threshold = calibration["threshold"]
    save_checkpoint(run_dir / "grounding.pt", kind=Kind.GROUNDING_MODEL, step=trainer.step, model=model.state_dict(),
                    arch=ready.arch, preprocessing=ready.prep.to_dict(), config=config.model_dump(mode="json"),
                    state={"calibration": calibration})
    scores, rows = evaluate(grounder, ready.manifest, config.eval.split, absent_per_study=config.eval.absent_per_study,
                            swap_per_study=config.eval.swap_per_study, seed=config.train.seed)
    control = Grounder(randomised(model), ready.prep, ready.graph, calibration["threshold"], "randomised",
                       sw_batch_size=config.eval.sw_batch_size)
    random_scores, _ = evaluate(control, ready.manifest, config.eval.split, absent_per_study=0, swap_per_study=0,
                                seed=config.train.seed)
    write_text(run_dir / "grounding_eval.csv", _rows_csv(rows))
    summary.update({f"test_{k}": v for k, v in scores.items()})
    summary.update({f"random_{k}": v for k, v in random_scores.items() if k.startswith("lesion_all_")})
    summary.update({f"calibration_{k}": v for k, v in calibration.items()})
    summary.update({"pretrained": str(pretrained) if pretrained else None, "warnings": ready.warnings,
                    "graph_nodes": len(ready.graph.nodes()) if ready.graph else 0})
    run.write_summary(summary)
    return summary
