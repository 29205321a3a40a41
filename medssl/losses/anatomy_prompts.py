"""Anatomical consistency: every region of a label-free anatomy graph matches its own text prompt, in
every patient, coarse to fine.

Paper: SS-ACL, "Self-supervised Anatomical Consistency Learning for Vision-Grounded Medical Report
Generation" (ACM MM 2025): a hierarchical anatomy tree whose node prompts are aligned with their image
regions, recursively from coarse to fine (its region-level contrast, here with hard targets). The regions
come from `medssl.downstream.grounding.graph` (clusters of pretrained voxel features and body
coordinates), never from label maps.
"""

from __future__ import annotations

import torch

from medssl.losses.alignment import AlignmentObjective, AlignmentStep
from medssl.losses.contrastive import info_nce
from medssl.losses.objective import ContrastConfig
from medssl.losses.region import pool_regions


def region_prompt_contrast(voxels: torch.Tensor, nodes: torch.Tensor, prompts: torch.Tensor, groups: torch.Tensor,
                           *, tau: float = 0.1) -> torch.Tensor:
    """Each (volume, node) region's mean embedding against all prompts of its level: its own prompt (and
    prompts with the same text) positive.

    Shape: voxels (B, E, d, h, w), nodes (B, d, h, w) long (-1 outside), prompts (K, E), groups (K,) long
    -> scalar, float32.
    """
    embeddings, node_ids, _ = pool_regions(voxels, nodes)
    positives = groups[node_ids][:, None] == groups[None, :]
    return info_nce(embeddings, prompts, positives, tau=tau)


class AnatomyConfig(ContrastConfig):
    """`objectives.anatomy`: graph regions vs their prompts, every level from coarse to fine."""

    weight: float = 0.5
    tau: float = 0.1


class AnatomyObjective(AlignmentObjective):
    """{"anatomy": mean over graph levels (organ-level regions, then their parts)}."""

    Config = AnatomyConfig

    def forward(self, step: AlignmentStep) -> dict[str, torch.Tensor]:
        levels = [region_prompt_contrast(step.voxels, nodes, prompts, groups, tau=self.config.tau)
                  for nodes, prompts, groups in zip(step.nodes, step.node_prompts, step.prompt_groups)]
        return {"anatomy": torch.stack(levels).mean()}
