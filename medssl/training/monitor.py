"""Collapse monitor: is the embedding still spread out?"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def collapse_metrics(embeddings: torch.Tensor) -> dict[str, float]:
    """Per-dimension std of L2-normalised embeddings and their effective rank.

    embeddings: (N, D). A collapsed encoder has std -> 0 and effective rank -> 1; a healthy one
    has std near 1/sqrt(D) and effective rank well above 1. Effective rank is exp(entropy) of the
    normalised singular values (Roy & Vetterli, 2007).
    """
    z = F.normalize(embeddings.detach().float().flatten(1), dim=1)
    std = z.std(dim=0).mean().item() if z.shape[0] > 1 else 0.0
    singular = torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"embedding_std": std, "effective_rank": float(torch.exp(entropy))}
