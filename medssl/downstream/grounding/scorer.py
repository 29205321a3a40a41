"""The finding scorer: per finding kind, a linear score of the voxel features of `features.OrganVoxels.phi`,
trained from reports only (`task`: multiple-instance learning over organs named in findings and organs
called normal).

It starts as the untrained anomaly score: |z| of the organ-normalised intensity at the stated size summed
over the windows (relu(z) and relu(-z) weighted 1), minus 10 x the depth deficit (a finding of the stated size
lies inside its organ), the decoder features weighted 0, bias -3; training moves the weights (kept near that
start, `losses.anchored_l2`), so each kind learns its sign (hypo- / hyperdense) and which features help.

voxel logit(v) = w_kind . phi(v) + b_kind + b_organ + PRIOR_WEIGHT x log prior(v) (the places' soft prior);
bag logit = the mean of the k largest voxel logits in the organ, k = the voxels of a ball of the stated size.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from medssl.downstream.grounding.losses import top_k_mean

PRIOR_WEIGHT = 1.0
INIT_ABS_Z, INIT_DEPTH, INIT_BIAS = 1.0, -10.0, -3.0


def ball_voxels(size_mm: float, spacing_mm: float) -> int:
    """Voxels of a ball of diameter `size_mm` on an isotropic grid of `spacing_mm` (at least 1)."""
    return max(1, round(math.pi / 6.0 * (size_mm / spacing_mm) ** 3))


class FindingScorer(nn.Module):
    """weight (K, F), bias (K,) for `kinds` (K names), organ_bias (O,) for `organs` (O label names: each organ's
    own offset, e.g. the lungs' vessels make their strongest voxels stronger than the liver's); F = 2 x windows
    + 1 + decoder channels."""

    def __init__(self, kinds: list[str], organs: list[str], windows: int, decoder_channels: int):
        super().__init__()
        self.kinds, self.organs = list(kinds), list(organs)
        self.windows, self.decoder_channels = int(windows), int(decoder_channels)
        features = 2 * self.windows + 1 + self.decoder_channels
        init = torch.zeros(len(self.kinds), features)
        init[:, :2 * self.windows] = INIT_ABS_Z
        init[:, 2 * self.windows] = INIT_DEPTH
        self.weight = nn.Parameter(init.clone())
        self.bias = nn.Parameter(torch.full((len(self.kinds),), INIT_BIAS))
        self.organ_bias = nn.Parameter(torch.zeros(len(self.organs)))
        self.register_buffer("anchor", init.clone())

    def arch(self) -> dict:
        return {"kinds": self.kinds, "organs": self.organs, "windows": self.windows,
                "decoder_channels": self.decoder_channels}

    def voxel_logits(self, kind: int, organ: str, phi: torch.Tensor, prior: torch.Tensor | None = None
                     ) -> torch.Tensor:
        """phi (n, F), prior (n,) in (0, 1] or None -> (n,) logits of kind index `kind` in `organ` (an organ
        unseen in training has offset 0)."""
        logits = phi @ self.weight[kind] + self.bias[kind]
        if organ in self.organs:
            logits = logits + self.organ_bias[self.organs.index(organ)]
        return logits if prior is None else logits + PRIOR_WEIGHT * torch.log(prior)

    def bag_logit(self, kind: int, organ: str, phi: torch.Tensor, k: int, prior: torch.Tensor | None = None
                  ) -> torch.Tensor:
        """The bag's logit: top-k mean of the voxel logits. () tensor."""
        return top_k_mean(self.voxel_logits(kind, organ, phi, prior), k)

    def generic_logits(self, kinds: list[int], organ: str, phi: torch.Tensor, prior: torch.Tensor | None = None
                       ) -> torch.Tensor:
        """The voxel logits of a finding of no particular kind: the maximum over `kinds`. (n,)."""
        return torch.stack([self.voxel_logits(k, organ, phi, prior) for k in kinds]).amax(dim=0)


def as_prior(values: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
