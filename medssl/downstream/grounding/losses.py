"""The losses of report grounding (multiple-instance learning from reports; Ilse et al. 2018, top-k pooling
as in R-Super's report-stated sizes): tensors in, scalar out."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def top_k_mean(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest of values (n,) (k clipped to [1, n]). Shape: (n,) -> ()."""
    k = max(1, min(int(k), values.numel()))
    return values.topk(k).values.mean()


def balanced_bag_loss(bag_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of bag logits (B,) against labels (B,) in {0, 1}, positives and negatives each
    weighted to half of the total (reports name fewer findings than normal organs), float32. A side with no
    bag contributes nothing. Shape: (B,), (B,) -> ()."""
    logits, labels = bag_logits.float(), labels.float()
    losses = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    sides = [losses[labels == value] for value in (1.0, 0.0)]
    present = [side.mean() for side in sides if side.numel()]
    return torch.stack(present).mean() if present else logits.sum() * 0.0


def anchored_l2(weights: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Squared distance of the weights from their initial values (the untrained scorer), summed. The MIL
    problem is not convex: this keeps the learnt scorer near the untrained anomaly score it starts from, so
    no random start can flip a kind's sign. Shape: (K, F), (K, F) -> ()."""
    return (weights.float() - anchor.float()).pow(2).sum()
