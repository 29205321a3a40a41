"""Local phrase-voxel alignment: each finding phrase against the voxels of every volume of the batch.

Paper: GLoRIA, Huang et al., "GLoRIA: A Multimodal Global-Local Representation Learning Framework for
Label-efficient Medical Image Recognition", ICCV 2021 (its local loss): the phrase attends over the
regions, a_j = softmax_j(cos(w, v_j) / tau_a), the attended feature c = sum_j a_j v_j is scored by s =
cos(c, w), and the scores are contrasted over the batch in both directions, L = 1/2 [-log
softmax_b(s(w_p, V_b) / tau)_own - mean_own log softmax_p(s(w_p, V_b) / tau)]. Here regions are the
voxels of a 3D feature grid (inside the body) and the query is the whole finding phrase; the similarity
map used for grounding is the cosine itself (BioViL, Boecking et al., arXiv:2204.09817, sec. 3.3).

`pooling: max` replaces the attention-pooled score by the map's soft maximum over the body (multiple-
instance learning: the phrase must find some voxel of its own volume, and none of the others), which puts
the gradient on the voxels that decide, where the attention-pooled feature can also match through the
volume's overall content."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import PositiveFloat

from medssl.losses.alignment import AlignmentObjective, AlignmentStep
from medssl.losses.contrastive import info_nce_logits
from medssl.losses.objective import ContrastConfig


def phrase_volume_contrast(scores: torch.Tensor, owner: torch.Tensor, exclude: torch.Tensor, *,
                           tau: float = 0.1) -> torch.Tensor:
    """Phrase -> its own volume among the batch's volumes, and volume -> its own phrases among all.

    Shape: scores (P, B) local scores, owner (P,) long, exclude (P, B) bool -> scalar, float32.
    """
    positives = owner[:, None] == torch.arange(scores.shape[1], device=scores.device)[None]
    exclude = exclude & ~positives
    logits = scores / tau
    return 0.5 * (info_nce_logits(logits, positives, exclude=exclude)
                  + info_nce_logits(logits.T, positives.T, exclude=exclude.T))


class LocalConfig(ContrastConfig):
    """`objectives.local`: attention-pooled phrase scores contrasted over the batch."""

    tau: float = 0.1
    attention_tau: PositiveFloat = 0.05  # sharpness of the phrase's attention over voxels
    pooling: Literal["attention", "max"] = "max"  # GLoRIA's attention-pooled score, or the map's soft maximum


class LocalObjective(AlignmentObjective):
    """{"local": phrase-volume contrast of the local scores}."""

    Config = LocalConfig

    def forward(self, step: AlignmentStep) -> dict[str, torch.Tensor]:
        attention = step.attention(self.config.attention_tau)
        scores = attention.peaks if self.config.pooling == "max" else attention.scores
        return {"local": phrase_volume_contrast(scores, step.owner, step.phrase_exclude, tau=self.config.tau)}
