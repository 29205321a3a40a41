"""Global report-volume alignment: a volume's pooled embedding against its report's embedding.

Papers: ConVIRT, Zhang et al., "Contrastive Learning of Medical Visual Representations from Paired
Images and Text", arXiv:2010.00747, eq. (2)-(3) (the image-to-text and text-to-image InfoNCE, averaged);
GLoRIA's global term (Huang et al., ICCV 2021) is the same loss. Implemented:
L = 1/2 [-log softmax_b'(cos(v_b, r_b') / tau)_b - log softmax_b'(cos(r_b, v_b') / tau)_b].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medssl.losses.alignment import AlignmentObjective, AlignmentStep
from medssl.losses.contrastive import info_nce
from medssl.losses.objective import ContrastConfig


def volume_embeddings(voxels: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """Mean voxel embedding inside the body, unit length. Shape: voxels (B, E, V), body (B, V) -> (B, E)."""
    weights = body.float() / body.float().sum(dim=1, keepdim=True).clamp_min(1.0)
    return F.normalize(torch.einsum("bev,bv->be", voxels.float(), weights), dim=-1)


def report_volume_contrast(volumes: torch.Tensor, reports: torch.Tensor, exclude: torch.Tensor, *,
                           tau: float = 0.1) -> torch.Tensor:
    """Symmetric InfoNCE: volume b's positive is report b and vice versa; `exclude` pairs are neither.

    Shape: volumes, reports (B, E), exclude (B, B) bool -> scalar, float32.
    """
    eye = torch.eye(volumes.shape[0], dtype=torch.bool, device=volumes.device)
    exclude = exclude & ~eye
    return 0.5 * (info_nce(volumes, reports, eye, tau=tau, exclude=exclude)
                  + info_nce(reports, volumes, eye, tau=tau, exclude=exclude.T))


class GlobalConfig(ContrastConfig):
    """`objectives.global`: report vs volume."""

    weight: float = 0.5
    tau: float = 0.1


class GlobalObjective(AlignmentObjective):
    """{"global": report-volume contrast}."""

    Config = GlobalConfig

    def forward(self, step: AlignmentStep) -> dict[str, torch.Tensor]:
        volumes = volume_embeddings(step.flat_voxels, step.flat_body)
        return {"global": report_volume_contrast(volumes, step.reports, step.report_exclude, tau=self.config.tau)}
