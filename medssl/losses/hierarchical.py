"""Four-level hierarchical contrast for physiological time series (COMET), from ONE pair of views.

Inputs are the encoder outputs of two augmented views of the same B windows, aligned in time:
`z_a`, `z_b` (B, T, D) (timestamp t of view a and of view b is the same sample of the signal), and
ID tensors (B,) for the window (`sample`), its trial and its patient. Every level is built on
`medssl.losses.contrastive` (`info_nce`, `one_positive_pair_views`, `same_id_mask`); masks are built on the IDs'
device.

Levels (candidates of the pooled levels are the 2B window representations `pool(z)` of both views;
the anchor itself is never a candidate):
- observation: TS2Vec temporal loss. Per window, the 2T timestamps of both views; positive = the
  same timestamp in the other view; negatives = the other timestamps of the same window.
- sample: TS2Vec instance loss on the pooled window. Positive = the same window in the other view
  (and copies of it drawn twice into the batch); negatives = the other windows of the batch.
- trial: positives = *different* windows of the same trial (both views); negatives = windows of
  other trials; the anchor's own window (other view) is excluded.
- patient: positives = different windows of the same patient; negatives = other patients' windows;
  the anchor's own window is excluded.

Single-trial patients: when a patient contributes one trial only to the batch, its trial positives
are exactly its patient positives: the trial level carries no trial-specific positive and would
only repeat the patient level. Such anchors are skipped at the trial level and the patients are
counted (`trial_skipped_patients` in the terms). Anchors without any positive (a trial with one
window in the batch) are left out by `info_nce`.

Bad-pair down-weighting (DBPM-style, optional, for the pooled levels): per level, the statistic of
an anchor is the mean cosine similarity to its positives, s_i. A running mean m and variance v of
s (per training step: m <- momentum m + (1 - momentum) mean(s), v likewise with the batch variance
of s; the first step sets them; buffers of this module, so they are checkpointed and resumed)
give z_i = (s_i - m) / sqrt(v). After `warmup` updates, anchors with |z_i| > `threshold` are bad
pairs: abnormally easy (z > threshold, e.g. views that agree only through noise or duplicates) or
abnormally hard (z < -threshold, e.g. an artefact segment called positive). Their weight is
`w_min`, every other anchor's 1, and the level loss is the weighted mean of the anchors' InfoNCE
terms, so the weights are bounded in [w_min, 1] and never drop a pair entirely. The statistics are
updated with the batch after the weights are computed (history only, as DBPM). `dbpm_downweighted`
in the terms is the fraction of down-weighted anchors.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, model_validator
from torch import nn

from medssl.config import StrictModel
from medssl.losses.contrastive import info_nce, one_positive_pair_views, same_id_mask
from medssl.models.ts_encoder import pool
from medssl.training.distributed import DistContext, gather_rows, local_rows

LEVELS = ("observation", "sample", "trial", "patient")
PooledLevel = Literal["sample", "trial", "patient"]
POOLED_LEVELS: tuple[PooledLevel, ...] = ("sample", "trial", "patient")


class LevelConfig(StrictModel):
    """One level: its weight in the total (0 = level off) and its InfoNCE temperature."""

    weight: NonNegativeFloat = 0.25
    tau: PositiveFloat = 0.1


class DBPMConfig(StrictModel):
    """Bounded bad-pair down-weighting (see the module docstring for the rule)."""

    enabled: bool = False
    threshold: PositiveFloat = 2.5  # |z-score| of an anchor's positive similarity beyond which it is down-weighted
    w_min: float = Field(0.2, gt=0.0, le=1.0)  # weight of a bad pair
    momentum: float = Field(0.99, ge=0.0, lt=1.0)  # running mean/variance momentum
    warmup: NonNegativeInt = 20  # steps of statistics before any pair is down-weighted
    levels: list[PooledLevel] = Field(default_factory=lambda: list(POOLED_LEVELS))


class HierarchyConfig(StrictModel):
    """The `objectives` section: the four levels (any subset with weight > 0), DCL, DBPM."""

    observation: LevelConfig = LevelConfig()
    sample: LevelConfig = LevelConfig()
    trial: LevelConfig = LevelConfig()
    patient: LevelConfig = LevelConfig()
    decoupled: bool = False  # decoupled contrastive loss: positives left out of the denominator
    dbpm: DBPMConfig = DBPMConfig()

    @model_validator(mode="after")
    def _some_level(self) -> HierarchyConfig:
        if not self.active:
            raise ValueError("every level weight is 0: give at least one of "
                             f"{', '.join(LEVELS)} a positive weight")
        return self

    @property
    def active(self) -> list[str]:
        """Levels with a positive weight, in hierarchy order."""
        return [level for level in LEVELS if getattr(self, level).weight > 0]


def observation_loss(z_a: torch.Tensor, z_b: torch.Tensor, *, tau: float, decoupled: bool = False) -> torch.Tensor:
    """TS2Vec temporal contrast, mean over the B windows: z_a, z_b (B, T, D) -> scalar (one batched call)."""
    return one_positive_pair_views(z_a, z_b, tau=tau, decoupled=decoupled)


def window_masks(sample: torch.Tensor, group: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and excluded (2B, 2B) masks over the windows of both views (view a rows first).

    group None (sample level): positive = the same window (other view, or a duplicate), excluded = self.
    group ids (trial or patient level): positive = a different window of the same group,
    excluded = the same window (self, its other view, duplicates).
    sample, group: (B,) integer IDs on the device where the masks are wanted.
    """
    same_window = same_id_mask(sample.repeat(2))
    eye = torch.eye(same_window.shape[0], dtype=torch.bool, device=sample.device)
    if group is None:
        return same_window & ~eye, eye
    return same_id_mask(group.repeat(2)) & ~same_window, same_window


def positive_similarity(h: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each anchor to its positives: h (N, D), positives (N, N) -> (N,) (NaN: none)."""
    with torch.no_grad():
        u = F.normalize(h.detach().float(), dim=1)
        sim = (u @ u.T).masked_fill(~positives, 0.0)
        return sim.sum(dim=1) / positives.sum(dim=1).float().masked_fill(~positives.any(dim=1), float("nan"))


def anchor_weights(positives: torch.Tensor, exclude: torch.Tensor, *, decoupled: bool,
                   down: torch.Tensor | None = None, w_min: float = 1.0) -> torch.Tensor:
    """(N,) float: an anchor's weight in the level mean: 0 without a positive (decoupled: or without a
    negative), `w_min` when in `down` (N,) bool, else 1. positives, exclude: (N, N) bool."""
    usable = (positives & ~exclude).any(dim=1)
    if decoupled:
        usable &= (~positives & ~exclude).any(dim=1)
    weights = usable.float()
    return weights if down is None else weights * torch.where(down, w_min, 1.0)


def weighted_info_nce(h: torch.Tensor, positives: torch.Tensor, exclude: torch.Tensor, *, tau: float,
                      decoupled: bool, down: torch.Tensor | None = None, w_min: float = 1.0,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """`info_nce(h, h, ...)` over the anchors in `keep` (N,) bool; anchors in `down` weigh `w_min`, the rest 1.

    The weighted mean of the per-anchor terms is assembled from two `info_nce` calls (the means
    over the full-weight and the down-weighted anchors), each weighted by its count of usable anchors.
    """
    keep = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if keep is None else keep
    down = torch.zeros_like(keep) if down is None else down & keep
    full = keep & ~down
    if not down.any():
        return info_nce(h[full], h, positives[full], tau=tau, exclude=exclude[full], decoupled=decoupled)
    usable = anchor_weights(positives, exclude, decoupled=decoupled) > 0
    n_full = (usable & full).sum().float()
    n_down = (usable & down).sum().float() * w_min
    parts = [info_nce(h[rows], h, positives[rows], tau=tau, exclude=exclude[rows], decoupled=decoupled)
             for rows in (full, down)]
    return (n_full * parts[0] + n_down * parts[1]) / (n_full + n_down).clamp_min(1e-12)


class HierarchicalContrast(nn.Module):
    """Weighted sum of the active levels from one pair of views (state: DBPM running statistics).

    forward(z_a, z_b, sample, trial, patient) with z_a, z_b (B, T, D) and IDs (B,) integer ->
    (total loss, terms) where terms holds every active level's unweighted loss,
    `trial_skipped_patients` (when the trial level is on) and `dbpm_downweighted` (when DBPM is on).
    """

    def __init__(self, config: HierarchyConfig | None = None):
        super().__init__()
        self.config = config or HierarchyConfig()
        n = len(POOLED_LEVELS)
        self.register_buffer("dbpm_mean", torch.zeros(n))
        self.register_buffer("dbpm_var", torch.ones(n))
        self.register_buffer("dbpm_updates", torch.zeros(n, dtype=torch.long))

    def forward(self, z_a: torch.Tensor, z_b: torch.Tensor, sample: torch.Tensor, trial: torch.Tensor,
                patient: torch.Tensor, ctx: DistContext = DistContext()
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Under torchrun (`ctx`), the pooled levels gather every rank's windows and IDs (rank-major) and
        each rank's term is its anchors' share of the global weighted mean, times N: DDP's gradient average
        then equals the gradient of the global loss, and the logged mean over ranks is the global loss."""
        cfg = self.config
        terms: dict[str, torch.Tensor] = {}
        if cfg.observation.weight > 0:  # per-window problems: every rank has the same number of windows
            terms["observation"] = observation_loss(z_a, z_b, tau=cfg.observation.tau, decoupled=cfg.decoupled)
        h = torch.cat([gather_rows(pool(z_a), ctx), gather_rows(pool(z_b), ctx)])
        sample, trial, patient = (gather_rows(ids, ctx) for ids in (sample, trial, patient))
        mine = torch.zeros(sample.shape[0], dtype=torch.bool, device=h.device)
        mine[local_rows(z_a.shape[0], ctx.rank)] = True
        mine = mine.repeat(2)  # this rank's windows in both views
        downweighted: list[torch.Tensor] = []
        for level, group in (("sample", None), ("trial", trial), ("patient", patient)):
            if getattr(cfg, level).weight == 0:
                continue
            positives, exclude = window_masks(sample, group)
            keep = torch.ones_like(mine)
            if level == "trial":
                keep, skipped = self._patients_with_several_trials(trial, patient)
                terms["trial_skipped_patients"] = skipped
            down = self._bad_pairs(level, h, positives, keep)
            if down is not None:
                downweighted.append(down.float().mean())
            terms[level] = weighted_info_nce(h, positives, exclude, tau=getattr(cfg, level).tau,
                                             decoupled=cfg.decoupled, down=down, w_min=cfg.dbpm.w_min,
                                             keep=keep & mine)
            if ctx.distributed:
                weights = anchor_weights(positives, exclude, decoupled=cfg.decoupled, down=down, w_min=cfg.dbpm.w_min)
                terms[level] = terms[level] * (ctx.world_size * weights[keep & mine].sum()
                                               / weights[keep].sum().clamp_min(1e-12))
        if cfg.dbpm.enabled:
            terms["dbpm_downweighted"] = (torch.stack(downweighted).mean() if downweighted
                                          else torch.zeros((), device=h.device))
        total = sum(getattr(cfg, level).weight * terms[level] for level in cfg.active)
        return total, terms

    @staticmethod
    def _patients_with_several_trials(trial: torch.Tensor, patient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(2B,) bool: the window's patient has another trial in the batch; and the count of patients without."""
        several = (same_id_mask(patient) & ~same_id_mask(trial)).any(dim=1)
        skipped = torch.unique(patient[~several]).numel()
        return several.repeat(2), torch.tensor(float(skipped), device=patient.device)

    def _bad_pairs(self, level: str, h: torch.Tensor, positives: torch.Tensor,
                   keep: torch.Tensor | None) -> torch.Tensor | None:
        """(2B,) bool anchors to down-weight (None when DBPM is off for this level); updates the statistics."""
        dbpm = self.config.dbpm
        if not dbpm.enabled or level not in dbpm.levels:
            return None
        i = POOLED_LEVELS.index(level)
        s = positive_similarity(h, positives)
        valid = ~torch.isnan(s) if keep is None else ~torch.isnan(s) & keep
        ready = int(self.dbpm_updates[i]) >= dbpm.warmup
        z = (s - self.dbpm_mean[i]) / self.dbpm_var[i].clamp_min(1e-8).sqrt()
        down = valid & (z.abs() > dbpm.threshold) if ready else torch.zeros_like(valid)
        if self.training and valid.any():
            self._update(i, s[valid])
        return down

    @torch.no_grad()
    def _update(self, i: int, s: torch.Tensor) -> None:
        mean, var = s.mean(), s.var(unbiased=False)
        m = self.config.dbpm.momentum if int(self.dbpm_updates[i]) > 0 else 0.0
        self.dbpm_mean[i] = m * self.dbpm_mean[i] + (1 - m) * mean
        self.dbpm_var[i] = m * self.dbpm_var[i] + (1 - m) * var
        self.dbpm_updates[i] += 1
