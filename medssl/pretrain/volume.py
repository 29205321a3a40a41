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
Whole-network objectives (masked: masked-volume reconstruction, off by default) train the full MONAI
segmentation network whose encoder this is, decoder included, in their own pass; the model then holds
that network and the run also writes `network.pt` (kind "volume-network") beside `encoder.pt`. When no
active objective reads the shared encoder pass, that pass and the projector are skipped.
Labels, masks and reports are never read (the optional probe reads held-out labels only to score).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field, PositiveFloat, PositiveInt, confloat, model_validator
from torch import nn

from medssl.config import StrictModel, TrainConfig, dump_config
from medssl.data.checks import patient_split_problems, raise_first
from medssl.data.manifest import load_manifest
from medssl.data.preprocessing import VolumeDataConfig
from medssl.data.store import task_store
from medssl.errors import UserError
from medssl.losses.objective import VIEWS, ObjectiveContext, VolumeStep
from medssl.losses.registry import VOLUME_OBJECTIVES, VolumeObjectivesConfig, total_loss
from medssl.models.heads import ProjectionHead, grid_pool
from medssl.models.volume_encoders import (
    VolumeEncoderConfig,
    build_segmentation_network,
    build_volume_encoder,
    network_encoder,
)
from medssl.pretrain.probe import OrganProbe, ProbeUnavailable
from medssl.pretrain.volume_batches import VolumePretrainBatches
from medssl.training.checkpoint import Kind
from medssl.training.distributed import DistContext, init_distributed, main_first
from medssl.training.loop import Checkpointing, StepOutput, Trainer
from medssl.training.pretrained import export_encoder, export_network
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

    @model_validator(mode="after")
    def _batch_norm_needs_two_anchors(self) -> PretrainVolumeConfig:
        if self.heads.norm == "batch" and self.train.batch_size < 2:
            raise ValueError("train.batch_size is 1 but heads.norm is batch (batch norm needs at least 2 anchors per "
                             "step and process): raise train.batch_size or set heads.norm=layer")
        return self


class VolumePretrainModel(nn.Module):
    """Encoder, projector (when an active objective uses the shared encoder pass), the dense head when one
    needs it, the whole network (`network`, sharing the encoder's modules) when one needs it, and the
    active objectives (`medssl.losses.registry.VOLUME_OBJECTIVES`); `forward(batch, generator) -> StepOutput`."""

    def __init__(self, config: PretrainVolumeConfig, ctx: DistContext = DistContext()):
        super().__init__()
        self.config = config
        self.ctx = ctx
        active = config.objectives.active()
        self.encoder_pass = any(VOLUME_OBJECTIVES[name].uses_encoder_pass for name in active)
        if any(VOLUME_OBJECTIVES[name].needs_network for name in active):
            # the reconstruction has as many channels as the input; built as build_volume_encoder builds it
            self.network = build_segmentation_network(config.model, out_channels=config.model.in_channels)
            self.encoder = network_encoder(self.network, config.model)
        else:
            self.network = None
            self.encoder = build_volume_encoder(config.model)
        strides = self.encoder.strides
        if config.views.feature_stride not in strides:
            raise UserError(f"views.feature_stride: {config.views.feature_stride} is not a stride of the "
                            f"{config.model.name} encoder ({strides})")
        self.dense_level = strides.index(config.views.feature_stride)
        dim = config.heads.proj_dim
        self.projector = (ProjectionHead(self.encoder.embed_dim * 8, config.heads.hidden, dim, norm=config.heads.norm)
                          if self.encoder_pass else None)
        if any(VOLUME_OBJECTIVES[name].needs_dense for name in active):
            self.dense = nn.Conv3d(self.encoder.out_channels[self.dense_level], dim, kernel_size=1)
        self.objectives = nn.ModuleDict({name: VOLUME_OBJECTIVES[name](getattr(config.objectives, name), self.context())
                                         for name in active})

    def context(self) -> ObjectiveContext:
        return ObjectiveContext(proj_dim=self.config.heads.proj_dim, student=self.student,
                                teacher_momentum=self.config.teacher.momentum, total_steps=self.config.train.steps,
                                in_channels=self.config.model.in_channels)

    def student(self) -> nn.ModuleDict:
        """The live encoder and projector (what an EMA teacher copies and follows)."""
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def arch(self) -> dict:
        """What must match for a checkpoint to fit this model."""
        arch = {"encoder": self.config.model.model_dump(mode="json"),
                "heads": self.config.heads.model_dump(mode="json"), "objectives": sorted(self.objectives),
                "feature_stride": self.config.views.feature_stride}
        if self.network is not None:
            arch["network_out_channels"] = self.config.model.in_channels
        return arch

    def embed(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """x (N,1,S,S,S) -> (feature maps fine to coarse, projected crop embeddings (N, proj_dim)).

        The crop embedding projects the coarsest map pooled on a 2x2x2 grid (`grid_pool`)."""
        feats = self.encoder(x)
        return feats, self.projector(grid_pool(feats[-1]))

    def forward(self, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        feats, z = self.embed(torch.cat([batch[k] for k in VIEWS])) if self.encoder_pass else (None, None)
        step = VolumeStep(batch, z, self.embed, lambda: self.dense(feats[self.dense_level]), network=self.network,
                          generator=generator, ctx=self.ctx, coarse=feats[-1] if feats is not None else None)
        terms: dict[str, torch.Tensor] = {}
        for objective in self.objectives.values():
            terms.update(objective(step))
        loss = total_loss(terms, self.config.objectives)
        logged = {**terms, "match_accept_rate": batch["match_accept_rate"].float()}
        return StepOutput(loss=loss, terms=logged, items=4 * step.anchors, embeddings=z)

    def update_teacher(self, step: int) -> None:
        """After optimiser step `step`: every objective's after-step update (the part-whole EMA teacher)."""
        context = self.context()
        for objective in self.objectives.values():
            objective.after_step(step, context)


def _objective(model: nn.Module, batch: dict, generator: torch.Generator) -> StepOutput:
    return model(batch, generator)


def pretrain_volume(config: PretrainVolumeConfig, run_dir: str | Path, *, resume: bool = False) -> dict:
    """Pretrain, write the run directory (../shared/DESIGN.md 3.2) and `encoder.pt`; return the summary."""
    run_dir = Path(run_dir)
    ctx = init_distributed()
    if ctx.is_main:  # the other ranks would find rank 0's new folder
        prepare_run_dir(run_dir, resume=resume)
    # the store's index alone when it is current: neither time nor memory to the first step grow with the manifest
    store, prep = main_first(lambda: task_store(config.data, quiet=not ctx.is_main), ctx)
    raise_first(patient_split_problems(store.shared_patients(), str(config.data.manifest)))  # later evaluations
    torch.manual_seed(config.train.seed)
    model = VolumePretrainModel(config, ctx)
    model.encoder.check_input_size(prep.crop_size)
    if ctx.distributed and config.heads.norm == "batch":
        if ctx.device.type == "cuda":  # batch statistics over every rank's crops, as in one process
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif ctx.is_main:
            print("warning: heads.norm=batch on CPU processes: the projector's batch statistics are each process's "
                  "own (torch's SyncBatchNorm needs GPUs); heads.norm=layer has no batch statistics",
                  file=sys.stderr)
    views = config.views
    batches = VolumePretrainBatches.from_store(
        store, config.split, prep, views.matcher,
        batch_size=config.train.batch_size, points=views.points, stride=views.feature_stride, grid=views.region_grid,
        scale_range=views.scale_range, max_shift_fraction=views.max_shift_fraction, flip_prob=views.flip_prob,
        jitter=views.jitter, match_retries=views.match_retries, seed=config.train.seed, rank=ctx.rank,
        world_size=ctx.world_size)
    probe, probe_off = None, {}
    if config.probe.enabled and ctx.is_main:
        probe_prep = prep.model_copy(update={"crop_size": config.probe.crop_size})
        try:
            probe = OrganProbe.from_manifest(load_manifest(config.data.manifest), config.probe.split, probe_prep,
                                             max_volumes=config.probe.max_volumes, stride=config.probe.stride,
                                             voxels_per_class=config.probe.voxels_per_class, seed=config.train.seed)
        except ProbeUnavailable as err:  # a small cohort: pretrain without the probe, and say so
            print(f"warning: {err}; the organ probe is off for this run (probe.enabled=false hides this)",
                  file=sys.stderr)
            probe_off = {"probe_off": str(err)}
    run = RunDir(run_dir, enabled=ctx.is_main)
    trainer = Trainer(model, _objective, batches, config=config.train, run_dir=run, ctx=ctx,
                      checkpointing=Checkpointing(kind=Kind.PRETRAIN_VOLUME, arch=model.arch(),
                                                  preprocessing=prep.to_dict(),
                                                  config=config.model_dump(mode="json")),
                      evaluate=(lambda m, step: probe(m.encoder)) if probe else None,
                      eval_every=config.probe.every, best_metric="probe_dice" if probe else None,
                      after_step=lambda m, step: m.update_teacher(step),
                      find_unused_parameters=model.encoder.find_unused_parameters, generator_per_rank=False)
    if resume:
        trainer.resume()
    run.write_config(dump_config(config))  # after a resume is accepted: a refused one changes nothing
    initial_probe = probe(model.encoder) if probe and trainer.step == 0 else {}
    summary = trainer.fit({**probe_off, **{f"init_{k}": v for k, v in initial_probe.items()}})
    if not ctx.is_main:
        return {}
    export_encoder(run_dir / "encoder.pt", model.encoder, config.model, prep.to_dict(), config.model_dump(mode="json"),
                   trainer.step)
    if model.network is not None:
        export_network(run_dir / "network.pt", model.network, config.model, config.model.in_channels, prep.to_dict(),
                       config.model_dump(mode="json"), trainer.step)
    return summary
