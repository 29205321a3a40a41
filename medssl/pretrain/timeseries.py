"""Four-level hierarchical contrastive pretraining of the time-series encoder (COMET, done once per step).

Data: the manifest's training split -> `load_recordings` (resampled to `data.fs`, channels selected by
name) -> `WindowDataset` (windows of `data.window_seconds`) -> `HierarchicalBatchSampler` (P patients
x R trials x S windows per micro-batch, re-drawn every epoch). Micro-batch i is a pure function of
(seed, i): epoch i // len(sampler), batch i % len(sampler), so `--resume` replays it exactly.

Under torchrun with N processes, `train.batch_size` and `sampler.patients` are per process: every rank
draws the same global batch of N x P patients and takes its own P; the views are drawn for the global
batch too, and the pooled levels contrast each rank's windows with every rank's (`gather_rows`, the
gradient flowing back to the rank that made them). N processes with B windows each therefore train
like one process with N x B (tests/test_ts_distributed.py).

Views (on the device, from the step's generator): two crops of length `crop x window` with a common
random shift (so that they overlap by at least `2 crop - 1` of the window), per-window random start,
optional Gaussian jitter (relative to each window channel's std), and `mask_spans` masked spans of
`mask_span_fraction` of the view's length per view (TS2Vec timestamp masking, in the encoder's
latent space). Both views go through the encoder in ONE batched call (2B windows); the overlapping
timestamps feed every level of `medssl.losses.hierarchical.HierarchicalContrast`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveInt, model_validator
from rich.console import Console
from torch import nn
from torch.utils.data import Dataset, default_collate

from medssl.config import StrictModel, TrainConfig, dump_config
from medssl.data.preprocessing import SignalDataConfig
from medssl.data.timeseries import HierarchicalBatchSampler, WindowDataset, signal_windows
from medssl.errors import UserError
from medssl.losses.hierarchical import HierarchicalContrast, HierarchyConfig
from medssl.models.ts_encoder import TSEncoder, TSEncoderConfig, pool
from medssl.seeding import derive_seed, torch_generator
from medssl.training.checkpoint import Kind, save_checkpoint
from medssl.training.distributed import DistContext, init_distributed, local_part, local_rows
from medssl.training.loop import Checkpointing, StepOutput, Trainer
from medssl.training.rundir import RunDir, prepare_run_dir


class ViewConfig(StrictModel):
    """How the two views of a window are made."""

    crop: float = Field(0.8, gt=0.5, le=1.0)  # view length / window length (1.0: no crop, views differ by masks)
    mask_spans: NonNegativeInt = 5  # masked spans per view
    mask_span_fraction: float = Field(0.1, ge=0.0, le=1.0)  # length of each span / view length
    jitter: NonNegativeFloat = 0.0  # Gaussian noise std relative to each window channel's std


class SamplerConfig(StrictModel):
    """Batch composition: `patients` x `trials` x (train.batch_size / (patients x trials)) windows."""

    patients: PositiveInt = 4
    trials: PositiveInt = 2
    batches_per_epoch: PositiveInt | None = None  # None: windows // batch_size


class PretrainTimeseriesConfig(StrictModel):
    """`medssl pretrain timeseries` (configs/pretrain_timeseries.yaml)."""

    data: SignalDataConfig
    train: TrainConfig
    model: TSEncoderConfig = TSEncoderConfig()
    objectives: HierarchyConfig = HierarchyConfig()
    views: ViewConfig = ViewConfig()
    sampler: SamplerConfig = SamplerConfig()

    @model_validator(mode="after")
    def _consistent(self) -> PretrainTimeseriesConfig:
        group = self.sampler.patients * self.sampler.trials
        if self.train.batch_size % group:
            raise ValueError(f"train.batch_size {self.train.batch_size} is not a multiple of sampler.patients x "
                             f"sampler.trials = {group}")
        self.data.check_channel_count(self.model.in_channels)
        return self

    @property
    def samples_per_trial(self) -> int:
        return self.train.batch_size // (self.sampler.patients * self.sampler.trials)


class HierarchicalBatches(Dataset):
    """Item i = this rank's part of micro-batch i: {"x": (B, C, W), "sample", "trial", "patient", "label": (B,)}.

    Global batch i (`world_size` x `patients` patients) comes from the sampler's epoch i // len(sampler)
    (re-drawn per epoch), position i % len; rank r keeps the r-th block of `patients` patients. No epoch is
    held: a cursor (epoch, position, generator) moves forward through the epoch's draws, so reading batches in
    order (each DataLoader worker reads every k-th) costs one draw per batch, and memory does not grow with
    the epoch's length; going back (a resume) replays the epoch's draws from its start.
    """

    def __init__(self, windows: WindowDataset, *, patients: int, trials: int, samples: int,
                 batches_per_epoch: int | None, seed: int, rank: int = 0, world_size: int = 1):
        self.windows = windows
        self.rows = local_rows(patients * trials * samples, rank)
        self.sampler = HierarchicalBatchSampler(windows, patients=patients * world_size, trials=trials,
                                                samples=samples, batches_per_epoch=batches_per_epoch,
                                                seed=derive_seed(seed, 0))  # 0: where the rank was
        self._cursor: tuple[int, int, torch.Generator] | None = None  # (epoch, next position, its generator)

    def __len__(self) -> int:
        return sys.maxsize

    def indices(self, i: int) -> list[int]:
        """Window indices of micro-batch i."""
        epoch, position = divmod(i, len(self.sampler))
        if self._cursor is None or self._cursor[0] != epoch or self._cursor[1] > position:
            self._cursor = (epoch, 0, torch_generator(self.sampler.seed, epoch))
        _, at, generator = self._cursor
        for _ in range(position - at):
            self.sampler.batch(generator)
        batch = self.sampler.batch(generator)
        self._cursor = (epoch, position + 1, generator)
        return batch[self.rows]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return default_collate([self.windows[k] for k in self.indices(i)])


# ------------------------------------------------------------------------------------------------ views


@dataclass
class Views:
    """Two views of B windows stacked: `x` (2B, C, L) (view a first), `mask` (2B, L) bool (True = masked).

    Timestamps `start_a + k` of view a and `start_b + k` of view b (k < `overlap`) are the same sample.
    """

    x: torch.Tensor
    mask: torch.Tensor
    start_a: int
    start_b: int
    overlap: int

    def aligned(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (2B, L, D) -> the overlapping timestamps of each view, (B, overlap, D) twice."""
        z_a, z_b = z.chunk(2)
        return (z_a[:, self.start_a:self.start_a + self.overlap], z_b[:, self.start_b:self.start_b + self.overlap])


def _randint(low: int, high: int, size: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Uniform integers in [low, high] (inclusive) on the generator's device."""
    return torch.randint(low, high + 1, size, generator=generator, device=generator.device)


def span_mask(batch: int, length: int, *, spans: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(batch, length) bool with `spans` random spans of round(fraction x length) timestamps masked per row."""
    span = round(fraction * length)
    t = torch.arange(length, device=generator.device)
    if spans == 0 or span == 0:
        return torch.zeros(batch, length, dtype=torch.bool, device=generator.device)
    starts = _randint(0, length - span, (batch, spans, 1), generator)
    return ((t >= starts) & (t < starts + span)).any(dim=1)


def make_views(x: torch.Tensor, config: ViewConfig, generator: torch.Generator, ctx: DistContext = DistContext()
               ) -> Views:
    """Two cropped, jittered, masked views of the windows x (B, C, W): this rank's rows of the views drawn
    for the global batch (`ctx.world_size` x B windows, rank-major), so the draws do not depend on N."""
    batch, channels, width = x.shape
    length = max(1, round(config.crop * width))
    slack = width - length
    shift = int(_randint(-slack, slack, (1,), generator))  # view b starts `shift` samples after view a
    start = local_part(_randint(max(0, -shift), slack - max(0, shift), (batch * ctx.world_size, 1, 1), generator), ctx)
    t = torch.arange(length, device=x.device)
    crops = [x.gather(2, (start + offset + t).expand(batch, channels, length)) for offset in (0, shift)]
    stacked = torch.cat(crops)
    if config.jitter > 0:
        noise = local_part(torch.randn((2 * batch * ctx.world_size, channels, length), generator=generator,
                                       device=generator.device, dtype=stacked.dtype), ctx, groups=2)
        stacked = stacked + config.jitter * stacked.std(dim=2, keepdim=True) * noise
    mask = local_part(span_mask(2 * batch * ctx.world_size, length, spans=config.mask_spans,
                                fraction=config.mask_span_fraction, generator=generator), ctx, groups=2)
    return Views(stacked, mask, start_a=max(0, shift), start_b=max(0, -shift), overlap=length - abs(shift))


# ------------------------------------------------------------------------------------------------ model and objective


class TimeseriesPretrainer(nn.Module):
    """The trained module: `encoder` (its forward is the encoder's) and `loss` (DBPM statistics as buffers)."""

    def __init__(self, model: TSEncoderConfig, objectives: HierarchyConfig):
        super().__init__()
        self.encoder = TSEncoder(model)
        self.loss = HierarchicalContrast(objectives)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(x, mask)


class HierarchicalObjective:
    """objective(model, batch, generator) -> StepOutput: one pair of views, one encoder call, all levels
    (contrasting with every rank's windows under torchrun)."""

    def __init__(self, views: ViewConfig, ctx: DistContext = DistContext()):
        self.views = views
        self.ctx = ctx

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> StepOutput:
        core = getattr(model, "module", model)  # DistributedDataParallel wraps the module
        views = make_views(batch["x"], self.views, generator, self.ctx)
        z_a, z_b = views.aligned(model(views.x, views.mask))
        loss, terms = core.loss(z_a, z_b, batch["sample"], batch["trial"], batch["patient"], ctx=self.ctx)
        return StepOutput(loss=loss, terms=terms, items=batch["x"].shape[0], embeddings=pool(z_a).detach())


# ------------------------------------------------------------------------------------------------ the task


def pretrain_timeseries(config: PretrainTimeseriesConfig, run_dir: Path, *, resume: bool) -> dict[str, Any]:
    """Train the encoder; writes config.yaml, metrics.jsonl, tb/, checkpoints/last.pt, summary.json in run_dir.

    Returns the summary (the trainer's final metrics plus the data counts and notes).
    """
    run_dir = Path(run_dir)
    ctx = init_distributed()
    if ctx.is_main:
        prepare_run_dir(run_dir, resume=resume)
    windows, notes = signal_windows(config.data, "training")
    if len(windows.channels) != config.model.in_channels:
        raise UserError(f"model.in_channels: {config.model.in_channels}, but the recordings have "
                        f"{len(windows.channels)} channels ({', '.join(windows.channels)})")
    console = Console(stderr=True)
    for note in notes if ctx.is_main else []:
        console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)  # never cut a path
    wanted = config.sampler.patients * ctx.world_size
    if ctx.distributed and wanted > len(windows.patient_ids):
        raise UserError(f"sampler.patients: {config.sampler.patients} per process x {ctx.world_size} processes = "
                        f"{wanted} patients per step, but the training split has {len(windows.patient_ids)}")
    batches = HierarchicalBatches(windows, patients=config.sampler.patients, trials=config.sampler.trials,
                                  samples=config.samples_per_trial, batches_per_epoch=config.sampler.batches_per_epoch,
                                  seed=config.train.seed, rank=ctx.rank, world_size=ctx.world_size)
    torch.manual_seed(config.train.seed)
    rundir = RunDir(run_dir, enabled=ctx.is_main)
    trainer = Trainer(TimeseriesPretrainer(config.model, config.objectives),
                      HierarchicalObjective(config.views, ctx), batches, config=config.train, run_dir=rundir,
                      checkpointing=Checkpointing(kind=Kind.PRETRAIN_TIMESERIES, arch=config.model.model_dump(),
                                                  preprocessing=config.data.to_dict(),
                                                  config=config.model_dump(mode="json")), ctx=ctx,
                      generator_per_rank=False)
    if resume:
        trainer.resume()
    rundir.write_config(dump_config(config))  # after a resume is accepted: a refused one changes nothing
    summary = trainer.fit({"windows": len(windows), "patients": len(windows.patient_ids),
                           "trials": len(windows.trial_ids), "batches_per_epoch": len(batches.sampler),
                           "notes": notes})
    if ctx.is_main:  # the encoder alone, like volume pretraining's encoder.pt
        encoder = trainer.model.encoder
        save_checkpoint(run_dir / "encoder.pt", kind=Kind.TIMESERIES_ENCODER, step=trainer.step,
                        model=encoder.state_dict(), arch=config.model.model_dump(), preprocessing=config.data.to_dict(),
                        config=config.model_dump(mode="json"))
    return summary
