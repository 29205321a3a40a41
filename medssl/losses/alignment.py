"""What a report-grounding alignment objective sees: one step's voxel and text embeddings.

The grounding model embeds every voxel of the feature grid and every phrase into one space (unit
vectors); a phrase's map over a volume is their cosine similarity (BioViL: a similarity map can say
"nothing here"). `AlignmentStep` carries a micro-batch of B volumes and their reports after that
embedding, plus what the objectives share: the attention of each phrase over each volume, computed once.

Adding an alignment objective: a module with the loss as a function of tensors, an `ObjectiveConfig`
subclass and an `AlignmentObjective` subclass, and one entry in
`medssl.downstream.grounding.config.GROUNDING_OBJECTIVES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from medssl.losses.objective import ObjectiveConfig


@dataclass
class PhraseAttention:
    """Every phrase against every volume. Shape: sims, attention (P, B, V); scores, peaks (P, B).

    sims: cosine of phrase p and voxel v of volume b (V = d*h*w, -inf-free: voxels outside the body are
    kept but get no attention); attention: softmax over body voxels of sims / attention_tau; scores:
    cosine of the attention-pooled voxel embedding with the phrase (GLoRIA's local score); peaks: the
    soft maximum of the map over the body, attention_tau x logsumexp(sims / attention_tau)."""

    sims: torch.Tensor
    attention: torch.Tensor
    scores: torch.Tensor
    peaks: torch.Tensor


def phrase_attention(phrases: torch.Tensor, voxels: torch.Tensor, body: torch.Tensor, *,
                     attention_tau: float) -> PhraseAttention:
    """Shape: phrases (P, E) and voxels (B, E, V) unit vectors, body (B, V) bool -> PhraseAttention (a volume
    without any body voxel is attended over all its voxels, so that nothing is NaN)."""
    with torch.autocast(device_type=phrases.device.type, enabled=False):
        phrases, voxels = phrases.float(), voxels.float()
        sims = torch.einsum("pe,bev->pbv", phrases, voxels)
        body = body | ~body.any(dim=1, keepdim=True)  # a crop without body voxels: attend over all of it
        logits = (sims / attention_tau).masked_fill(~body[None], float("-inf"))
        attention = torch.softmax(logits, dim=-1)
        pooled = torch.nn.functional.normalize(torch.einsum("pbv,bev->pbe", attention, voxels), dim=-1)
        scores = (pooled * phrases[:, None]).sum(dim=-1)
        peaks = attention_tau * torch.logsumexp(logits, dim=-1)
    return PhraseAttention(sims, attention, scores, peaks)


@dataclass
class AlignmentStep:
    """One micro-batch after embedding.

    voxels (B, E, d, h, w) unit vectors; body (B, d, h, w) bool; positions (B, 3, d, h, w) voxel centres in
    mm; phrases (P, E) unit vectors of the reports' finding statements, owner (P,) their volume,
    phrase_exclude (P, B) volumes that are neither positive nor negative for a phrase (the same patient,
    or a report stating a finding in much the same words), stated_mm (P,) the size a phrase states (NaN:
    none); reports (B, E) unit vectors of the findings sections, report_exclude (B, B); negated (Q, E)
    negated or normal statements with negated_owner (Q,); nodes: per anatomical-graph level (B, d, h, w)
    node ids (-1 outside), node_prompts (K_l, E) unit vectors and prompt_groups (K_l,) (equal for equal
    prompt texts).
    """

    voxels: torch.Tensor
    body: torch.Tensor
    positions: torch.Tensor
    phrases: torch.Tensor
    owner: torch.Tensor
    phrase_exclude: torch.Tensor
    stated_mm: torch.Tensor
    reports: torch.Tensor
    report_exclude: torch.Tensor
    negated: torch.Tensor
    negated_owner: torch.Tensor
    nodes: list[torch.Tensor]
    node_prompts: list[torch.Tensor]
    prompt_groups: list[torch.Tensor]
    _attention: dict[float, PhraseAttention] = field(default_factory=dict, repr=False)

    @property
    def flat_voxels(self) -> torch.Tensor:
        """(B, E, V)."""
        return self.voxels.flatten(2)

    @property
    def flat_body(self) -> torch.Tensor:
        """(B, V)."""
        return self.body.flatten(1)

    def attention(self, attention_tau: float) -> PhraseAttention:
        """The phrases' attention over every volume (computed once per temperature)."""
        if attention_tau not in self._attention:
            self._attention[attention_tau] = phrase_attention(self.phrases, self.flat_voxels, self.flat_body,
                                                              attention_tau=attention_tau)
        return self._attention[attention_tau]


class AlignmentObjective(nn.Module):
    """Base of the grounding objectives: `forward(step) -> {term: scalar}` (no parameters of its own)."""

    Config: ClassVar[type[ObjectiveConfig]]

    def __init__(self, config: ObjectiveConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, step: AlignmentStep) -> dict[str, torch.Tensor]:
        raise NotImplementedError
