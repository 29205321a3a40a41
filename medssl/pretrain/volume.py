"""`medssl pretrain volume`: anatomical-consistency pretraining with contrast at several levels.

One micro-batch (from `VolumePretrainBatches`) holds, per anchor, four crops: `a` and `b` overlap in
the same study, `c` is the matched anatomy in another study of the same patient, `d` the matched
anatomy in another patient. A single encoder pass over all of them feeds:
- voxel: dense contrast of corresponding voxels of `a` and `b` (feature map at `views.feature_stride`);
- region: pooled features of anatomical grid cells of `a` and `d`, same cell = positive;
- crop: instance contrast of `a` and `b`;
- patient: `a` and `c` (another study of the same patient) are positives;
- part_whole: `a`'s octants (each resized to the crop size, one more student pass) compose the EMA
  teacher's embedding of `a`, and `a` predicts the teacher's octant embeddings.
Labels, masks and reports are never read (the optional probe reads held-out labels only to score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, confloat
from torch import nn

from medssl.config import StrictModel, TrainConfig, dump_config
from medssl.data.manifest import load_manifest
from medssl.data.preprocessing import VolumeDataConfig
from medssl.errors import UserError
from medssl.losses.crop import crop_contrast
from medssl.losses.part_whole import PartWhole, octants
from medssl.losses.patient import patient_contrast
from medssl.losses.region import pool_regions, region_contrast
from medssl.losses.registry import VolumeObjectivesConfig, total_loss
from medssl.losses.voxel import voxel_contrast
from medssl.models.ema import EMATeacher, ema_momentum
from medssl.models.heads import ProjectionHead, grid_pool
from medssl.models.volume_encoders import VolumeEncoderConfig, build_volume_encoder, export_encoder
from medssl.pretrain.probe import OrganProbe
from medssl.pretrain.volume_batches import VolumePretrainBatches
from medssl.training.checkpoint import Kind
from medssl.training.distributed import init_distributed
from medssl.training.loop import Checkpointing, StepOutput, Trainer
from medssl.training.rundir import RunDir, prepare_run_dir


class ViewsConfig(StrictModel):
    """How the crops of a micro-batch are drawn (medssl.pretrain.volume_batches)."""

    matcher: Literal["body_box", "registration"] = "body_box"
    points: PositiveInt = 64  # corresponding voxels per crop pair (voxel objective)
    feature_stride: Literal[1, 2, 4, 8, 16] = 4  # feature map used by the voxel and region objectives
    region_grid: PositiveInt = 4  # anatomical cells per axis of the normalised body frame
    scale_range: tuple[PositiveFloat, PositiveFloat] = (0.8, 1.25)
    max_shift_fraction: confloat(ge=0.0, le=0.9) = 0.25
    flip_prob: confloat(ge=0.0, le=1.0) = 0.5
    jitter: bool = True
    match_retries: PositiveInt = 10


class HeadsConfig(StrictModel):
    proj_dim: PositiveInt = 64
    hidden: PositiveInt = 128
    norm: Literal["batch", "layer"] = "batch"  # batch: centres the crop embeddings of a step (SimCLR's choice)


class TeacherConfig(StrictModel):
    momentum: confloat(ge=0.0, lt=1.0) = 0.996  # EMA base momentum, cosine-scheduled to 1


class ProbeConfig(StrictModel):
    """Frozen-feature organ probe on held-out labelled volumes (medssl.pretrain.probe)."""

    enabled: bool = False
    every: PositiveInt = 50
    split: Literal["training", "validation", "test"] = "validation"
    max_volumes: PositiveInt = 4
    crop_size: tuple[PositiveInt, PositiveInt, PositiveInt] = (64, 64, 64)
    stride: PositiveInt = 2
    voxels_per_class: PositiveInt = 200


class PretrainVolumeConfig(StrictModel):
    data: VolumeDataConfig
    train: TrainConfig
    model: VolumeEncoderConfig = Field(default_factory=VolumeEncoderConfig)
    heads: HeadsConfig = Field(default_factory=HeadsConfig)
    views: ViewsConfig = Field(default_factory=ViewsConfig)
    objectives: VolumeObjectivesConfig = Field(default_factory=VolumeObjectivesConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    split: Literal["training", "validation", "test"] = "training"


class VolumePretrainModel(nn.Module):
    """Encoder plus the heads of the active objectives; `forward(batch, generator) -> StepOutput`."""

    def __init__(self, config: PretrainVolumeConfig):
        super().__init__()
        self.config = config
        self.active = set(config.objectives.active())
        self.encoder = build_volume_encoder(config.model)
        strides = self.encoder.strides
        if config.views.feature_stride not in strides:
            raise UserError(f"views.feature_stride: {config.views.feature_stride} is not a stride of the "
                            f"{config.model.name} encoder ({strides})")
        self.dense_level = strides.index(config.views.feature_stride)
        dim = config.heads.proj_dim
        self.projector = ProjectionHead(self.encoder.embed_dim * 8, config.heads.hidden, dim, norm=config.heads.norm)
        if self.active & {"voxel", "region"}:
            self.dense = nn.Conv3d(self.encoder.out_channels[self.dense_level], dim, kernel_size=1)
        if "part_whole" in self.active:
            self.part_whole = PartWhole(dim)
            self.teacher = EMATeacher(nn.ModuleDict({"encoder": self.encoder, "projector": self.projector}))

    def arch(self) -> dict:
        """What must match for a checkpoint to fit this model."""
        return {"encoder": self.config.model.model_dump(mode="json"),
                "heads": self.config.heads.model_dump(mode="json"), "objectives": sorted(self.active),
                "feature_stride": self.config.views.feature_stride}

    def embed(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (N,1,S,S,S) -> (feature maps fine to coarse, projected crop embeddings (N, proj_dim)).

        The crop embedding projects the coarsest map pooled on a 2x2x2 grid (`grid_pool`)."""
        feats = self.encoder(x)
        return feats, self.projector(grid_pool(feats[-1]))

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        obj = self.config.objectives
        n = batch["a"].shape[0]
        feats, z = self.embed(torch.cat([batch[k] for k in "abcd"]))
        z_a, z_b, z_c, _ = z.split(n)
        terms: dict[str, torch.Tensor] = {}
        if "crop" in self.active:
            terms["crop"] = crop_contrast(z_a, z_b, tau=obj.crop.tau, decoupled=obj.crop.decoupled)
        if "patient" in self.active:
            keep = torch.cat([torch.ones_like(batch["has_c"]), batch["has_c"]])
            terms["patient"] = patient_contrast(torch.cat([z_a, z_c])[keep],
                                                batch["patient"].repeat(2)[keep],
                                                torch.cat([batch["study_a"], batch["study_c"]])[keep],
                                                tau=obj.patient.tau, decoupled=obj.patient.decoupled)
        if self.active & {"voxel", "region"}:
            dense_a, dense_b, _, dense_d = self.dense(feats[self.dense_level]).split(n)
            if "voxel" in self.active:
                terms["voxel"] = voxel_contrast(dense_a, dense_b, batch["points_a"], batch["points_b"],
                                                tau=obj.voxel.tau, min_separation=obj.voxel.min_separation)
            if "region" in self.active:
                terms["region"] = self._region(batch, dense_a, dense_d)
        if "part_whole" in self.active:
            terms.update(self._part_whole(batch["a"], z_a))
        loss = total_loss(terms, obj)
        logged = {**terms, "match_accept_rate": batch["match_accept_rate"].float()}
        return StepOutput(loss=loss, terms=logged, items=4 * n, embeddings=z)

    def _region(self, batch: dict[str, torch.Tensor], dense_a: torch.Tensor, dense_d: torch.Tensor) -> torch.Tensor:
        has_d = batch["has_d"]
        feat = torch.cat([dense_a, dense_d[has_d]])
        regions = torch.cat([batch["region_a"], batch["region_d"][has_d]])
        patients = torch.cat([batch["patient"], batch["patient_d"][has_d]])
        embeddings, region_ids, crop_index = pool_regions(feat, regions)
        obj = self.config.objectives.region
        return region_contrast(embeddings, region_ids, patients[crop_index], batch["cell_positions"][region_ids],
                               tau=obj.tau, fn_radius=obj.fn_radius, cross_patient=obj.cross_patient)

    def _part_whole(self, whole: torch.Tensor, z_whole: torch.Tensor) -> dict[str, torch.Tensor]:
        n, size = whole.shape[0], whole.shape[2:]
        parts = F.interpolate(octants(whole), size=size, mode="trilinear", align_corners=False)
        _, z_parts = self.embed(parts)
        with torch.no_grad():
            teacher = self.teacher.module
            t_whole = teacher["projector"](grid_pool(teacher["encoder"](whole)[-1]))
            t_parts = teacher["projector"](grid_pool(teacher["encoder"](parts)[-1]))
        out = self.part_whole(z_parts.view(n, 8, -1), z_whole, t_parts.view(n, 8, -1), t_whole)
        return {f"part_whole.{k}": v for k, v in out.items()}

    def update_teacher(self, step: int) -> None:
        if "part_whole" in self.active:
            momentum = ema_momentum(step, self.config.train.steps, base=self.config.teacher.momentum)
            self.teacher.update(nn.ModuleDict({"encoder": self.encoder, "projector": self.projector}), momentum)


def _objective(model: nn.Module, batch: dict, generator: torch.Generator) -> StepOutput:
    return model(batch, generator)


def pretrain_volume(config: PretrainVolumeConfig, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Pretrain, write the run directory (DESIGN.md 3.2) and `encoder.pt`; return the summary."""
    run_dir = Path(run_dir)
    prepare_run_dir(run_dir, resume=resume)
    ctx = init_distributed()
    manifest = load_manifest(config.data.manifest)
    prep = config.data.preprocessing(manifest.modality.get("0"))
    torch.manual_seed(config.train.seed)
    model = VolumePretrainModel(config)
    model.encoder.check_input_size(prep.crop_size)
    views = config.views
    batches = VolumePretrainBatches.from_manifest(
        manifest, config.split, prep, views.matcher, cache_dir=config.data.cache_dir,
        batch_size=config.train.batch_size, points=views.points, stride=views.feature_stride, grid=views.region_grid,
        scale_range=views.scale_range, max_shift_fraction=views.max_shift_fraction, flip_prob=views.flip_prob,
        jitter=views.jitter, match_retries=views.match_retries, seed=config.train.seed, rank=ctx.rank)
    probe = None
    if config.probe.enabled and ctx.is_main:
        probe_prep = prep.model_copy(update={"crop_size": config.probe.crop_size})
        probe = OrganProbe.from_manifest(manifest, config.probe.split, probe_prep, max_volumes=config.probe.max_volumes,
                                         stride=config.probe.stride, voxels_per_class=config.probe.voxels_per_class,
                                         seed=config.train.seed)
    run = RunDir(run_dir, enabled=ctx.is_main)
    run.write_config(dump_config(config))
    trainer = Trainer(model, _objective, batches, config=config.train, run_dir=run, ctx=ctx,
                      checkpointing=Checkpointing(kind=Kind.PRETRAIN_VOLUME, arch=model.arch(), preprocessing=prep.to_dict(),
                                                  config=config.model_dump(mode="json")),
                      evaluate=(lambda m, step: probe(m.encoder)) if probe else None,
                      eval_every=config.probe.every, best_metric="probe_dice" if probe else None,
                      after_step=lambda m, step: m.update_teacher(step),
                      find_unused_parameters=config.model.name == "swinunetr")
    if resume:
        trainer.resume()
    initial_probe = probe(model.encoder) if probe and trainer.step == 0 else {}
    summary = trainer.fit({f"init_{k}": v for k, v in initial_probe.items()})
    if not ctx.is_main:
        return {}
    export_encoder(run_dir / "encoder.pt", model.encoder, config.model, prep.to_dict(), config.model_dump(mode="json"),
                   trainer.step)
    return summary
