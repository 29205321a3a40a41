"""Report-derived priors on a phrase's map: what the report text states constrains where and how big
the map is, and statements that name nothing present must map to nothing.

Paper: R-Super, "Learning Segmentation from Radiology Reports" (MICCAI 2025): the size a report states
becomes a loss on the predicted mask's volume and on its mass falling in a ball of that size inside the
named organ. Here, label-free, on the cosine map m(v) = cos(phrase, v) and the phrase's attention
a(v) (softmax of m / tau_a over the body):
- ball: 1 - sum_v a(v) sigmoid((r - |x_v - mu|) / (margin / 2)), mu = sum_v a(v) x_v, r = size / 2 + margin;
- volume: (log(V + v0) - log(V_stated + v0))^2 with V = sum_v sigmoid(m(v) / sharpness) x voxel volume
  (the volume with positive similarity), V_stated = pi / 6 size^3, v0 one voxel;
- region: 1 - the attention mass inside the anatomical-graph region (organ level) of the attention's
  peak (R-Super's "inside the named organ", with the label-free region standing for the organ);
- negated: a negated or normal statement ("No focal abnormality of the spleen.") names nothing present:
  relu(smooth-max_v m(v) + margin_cos) over its own volume;
- absent: a finding phrase names nothing in the other volumes of the batch (those whose reports do not
  state much the same finding): the same hinge there.
The last two make the map able to say "nothing here" (BioViL), which the not-groundable call reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import PositiveFloat

from medssl.losses.alignment import AlignmentObjective, AlignmentStep
from medssl.losses.objective import ObjectiveConfig


def smooth_max(values: torch.Tensor, mask: torch.Tensor, sharpness: float) -> torch.Tensor:
    """sharpness x logsumexp(values / sharpness) over the last axis inside `mask` (a soft maximum).

    Shape: values, mask (..., V) -> (...)."""
    return sharpness * torch.logsumexp((values / sharpness).masked_fill(~mask, float("-inf")), dim=-1)


def ball_mass_loss(attention: torch.Tensor, positions: torch.Tensor, size_mm: torch.Tensor,
                   margin_mm: float) -> torch.Tensor:
    """1 - attention mass within size/2 + margin of the attention's centroid, mean over phrases.

    Shape: attention (P, V) summing to 1, positions (P, V, 3) mm, size_mm (P,) -> scalar."""
    centroid = (attention[..., None] * positions).sum(dim=1, keepdim=True)
    distance = (positions - centroid).norm(dim=-1)
    radius = size_mm[:, None] / 2 + margin_mm
    inside = torch.sigmoid((radius - distance) / (margin_mm / 2))
    return (1 - (attention * inside).sum(dim=1)).mean()


def volume_loss(sims: torch.Tensor, body: torch.Tensor, size_mm: torch.Tensor, voxel_mm3: torch.Tensor,
                sharpness: float) -> torch.Tensor:
    """Squared log-ratio of the positive-similarity volume to the stated volume, mean over phrases.

    Shape: sims, body (P, V), size_mm (P,), voxel_mm3 (P,) -> scalar."""
    predicted = (torch.sigmoid(sims / sharpness) * body).sum(dim=1) * voxel_mm3
    stated = math.pi / 6 * size_mm ** 3
    return ((torch.log(predicted + voxel_mm3) - torch.log(stated + voxel_mm3)) ** 2).mean()


def region_mass_loss(attention: torch.Tensor, nodes: torch.Tensor) -> torch.Tensor:
    """1 - attention mass inside the graph region of the attention's peak, mean over phrases.

    Shape: attention (P, V), nodes (P, V) long node ids (-1 outside) -> scalar (a zero with a gradient when
    P = 0: a batch whose reports state no finding)."""
    if attention.shape[0] == 0:
        return attention.sum() * 0.0
    peak_node = nodes.gather(1, attention.argmax(dim=1, keepdim=True))
    return (1 - (attention * (nodes == peak_node)).sum(dim=1)).mean()


def absence_loss(sims: torch.Tensor, body: torch.Tensor, sharpness: float, margin: float) -> torch.Tensor:
    """relu(smooth max of the map + margin), mean over maps that should be empty. Shape: sims, body (N, V)."""
    if sims.shape[0] == 0:
        return sims.sum() * 0.0
    return F.relu(smooth_max(sims, body, sharpness) + margin).mean()


class PriorConfig(ObjectiveConfig):
    """`objectives.prior`: the report-derived priors (each term gets the weight)."""

    weight: float = 0.5
    margin_mm: PositiveFloat = 6.0  # slack around the stated size
    sharpness: PositiveFloat = 0.05  # temperature of the soft threshold / soft maximum on the cosine map
    empty_margin: float = 0.1  # an empty map stays below cosine -empty_margin
    attention_tau: PositiveFloat = 0.05  # as objectives.local


class PriorObjective(AlignmentObjective):
    """{"prior.ball", "prior.volume", "prior.region", "prior.negated", "prior.absent"}."""

    Config = PriorConfig

    def forward(self, step: AlignmentStep) -> dict[str, torch.Tensor]:
        c = self.config
        att = step.attention(c.attention_tau)
        own = torch.arange(step.phrases.shape[0], device=step.owner.device)
        sims, attention = att.sims[own, step.owner], att.attention[own, step.owner]  # (P, V) in the own volume
        body = step.flat_body[step.owner]
        positions = step.positions.flatten(2).transpose(1, 2)[step.owner]  # (P, V, 3)
        spacing = (step.positions[:, :, 1, 1, 1] - step.positions[:, :, 0, 0, 0]).abs()  # (B, 3)
        voxel_mm3 = spacing.prod(dim=1)[step.owner]
        sized = torch.isfinite(step.stated_mm)
        terms = {}
        if sized.any():
            terms["prior.ball"] = ball_mass_loss(attention[sized], positions[sized], step.stated_mm[sized], c.margin_mm)
            terms["prior.volume"] = volume_loss(sims[sized], body[sized], step.stated_mm[sized], voxel_mm3[sized],
                                                c.sharpness)
        if step.nodes:
            terms["prior.region"] = region_mass_loss(attention, step.nodes[0].flatten(1)[step.owner])
        negated = torch.einsum("qe,qev->qv", step.negated.float(), step.flat_voxels[step.negated_owner].float())
        terms["prior.negated"] = absence_loss(negated, step.flat_body[step.negated_owner], c.sharpness, c.empty_margin)
        others = (step.owner[:, None] != torch.arange(step.voxels.shape[0], device=step.owner.device)) \
            & ~step.phrase_exclude
        terms["prior.absent"] = absence_loss(att.sims[others], step.flat_body[others.nonzero()[:, 1]], c.sharpness,
                                             c.empty_margin)
        return terms
