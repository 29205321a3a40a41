"""The contrastive core every level shares: masked multi-positive InfoNCE (and its decoupled form).

Computed in float32 with log-sum-exp, also under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(anchors: torch.Tensor, candidates: torch.Tensor, positives: torch.Tensor, *, tau: float,
             exclude: torch.Tensor | None = None, decoupled: bool = False) -> torch.Tensor:
    """Mean over anchors of `-mean_{j in pos(i)} log( exp(s_ij/tau) / sum_{k in den(i)} exp(s_ik/tau) )`.

    anchors: (..., N, D); candidates: (..., M, D) with the same leading dims (a batch of independent
    problems, e.g. the timestamps of each window); s is their cosine similarity.
    positives: (..., N, M) bool (leading dims may be omitted: broadcast), several per anchor allowed.
    exclude: (..., N, M) bool, pairs that are neither positive nor negative (the anchor itself, false
        negatives such as the same anatomy in another patient).
    decoupled: drop the positives from the denominator (DCL): den(i) holds the negatives only,
        which makes the loss less sensitive to batch size.
    Anchors with no positive (or, decoupled, no negative) are left out; the mean runs over the usable
    anchors of every problem. With none left the result is a zero that still carries a gradient.
    """
    if (anchors.ndim < 2 or anchors.ndim != candidates.ndim or anchors.shape[:-2] != candidates.shape[:-2]
            or anchors.shape[-1] != candidates.shape[-1]):
        raise ValueError(f"info_nce: expected (..., N, D) and (..., M, D), got {tuple(anchors.shape)} and "
                         f"{tuple(candidates.shape)}")
    if positives.shape[-2:] != (anchors.shape[-2], candidates.shape[-2]):
        raise ValueError(f"info_nce: positives must be (..., {anchors.shape[-2]}, {candidates.shape[-2]}), "
                         f"got {tuple(positives.shape)}")
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(anchors.float(), dim=-1)
        c = F.normalize(candidates.float(), dim=-1)
        return info_nce_logits(a @ c.transpose(-1, -2) / tau, positives, exclude=exclude, decoupled=decoupled)


def info_nce_logits(logits: torch.Tensor, positives: torch.Tensor, *, exclude: torch.Tensor | None = None,
                    decoupled: bool = False) -> torch.Tensor:
    """The InfoNCE of `info_nce` from precomputed logits (similarity / tau), for objectives whose
    anchor-candidate similarity is not a plain dot product (e.g. an attention-pooled phrase score).

    Shape: logits (..., N, M), positives / exclude (..., N, M) bool (broadcast) -> scalar, float32.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = logits.float()
        valid = torch.ones_like(positives, dtype=torch.bool) if exclude is None else ~exclude
        valid = torch.broadcast_to(valid, logits.shape)
        pos = torch.broadcast_to(positives, logits.shape) & valid
        neg = valid & ~pos
        if decoupled:
            denominator = torch.logsumexp(logits.masked_fill(~neg, float("-inf")), dim=-1, keepdim=True)
            usable = pos.any(dim=-1) & neg.any(dim=-1)
        else:
            denominator = torch.logsumexp(logits.masked_fill(~valid, float("-inf")), dim=-1, keepdim=True)
            usable = pos.any(dim=-1)
        if not usable.any():
            return logits.sum() * 0.0
        log_prob = (logits - denominator).masked_fill(~pos, 0.0)
        per_anchor = -log_prob.sum(dim=-1) / pos.sum(dim=-1).clamp_min(1)
        return per_anchor[usable].mean()


def same_id_mask(ids_a: torch.Tensor, ids_b: torch.Tensor | None = None) -> torch.Tensor:
    """(N, M) bool: `ids_a[i] == ids_b[j]`, built on the ids' device. ids: (N,), (M,) integer."""
    ids_b = ids_a if ids_b is None else ids_b
    return ids_a[:, None] == ids_b[None, :]


def pair_views(z_a: torch.Tensor, z_b: torch.Tensor, ids: torch.Tensor | None = None, *, tau: float,
               decoupled: bool = False) -> torch.Tensor:
    """Symmetric contrast of two views of N items: z_a, z_b (..., N, D); ids (N,) or None.

    Both views are pooled into 2N candidates; the anchor itself is excluded. Without ids, the
    other view of the same item is the one positive (NT-Xent / SimCLR). With ids, every other
    embedding with the same id is positive (supervised-contrastive style): e.g. trial or patient ids.
    Leading dims are independent problems (e.g. the timestamps of each window: TS2Vec's temporal loss).
    """
    z = torch.cat([z_a, z_b], dim=-2)
    n = z_a.shape[-2]
    item = torch.arange(n, device=z.device).repeat(2) if ids is None else ids.repeat(2)
    eye = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    return info_nce(z, z, same_id_mask(item) & ~eye, tau=tau, exclude=eye, decoupled=decoupled)


class _Gram(torch.autograd.Function):
    """z (..., M, D) -> z z^T (..., M, M) with a backward of one matrix product, (G + G^T) z, instead of the
    two autograd makes for `z @ z.transpose(-1, -2)`."""

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(z)
        return z @ z.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (z,) = ctx.saved_tensors
        return (grad + grad.transpose(-1, -2)) @ z


def one_positive_pair_views(z_a: torch.Tensor, z_b: torch.Tensor, *, tau: float,
                            decoupled: bool = False) -> torch.Tensor:
    """`pair_views(z_a, z_b)` (no ids: every anchor's one positive is its other view), the same value computed
    without (..., 2N, 2N) masks, for problems where that matrix is large: TS2Vec's temporal loss runs on
    (B, 2T, 2T) similarities. The positive logit is computed directly, the self-similarity (and, decoupled,
    the positive) is set to -inf in place before the log-sum-exp, and the similarity's backward is one
    matrix product (`_Gram`). Shape: (..., N, D) twice -> scalar, float32. (Crop contrast keeps
    `pair_views`: its matrix is 2B x 2B, and its rounding is pinned by tests/fixtures/pre_redesign.)"""
    if z_a.shape != z_b.shape or z_a.ndim < 2:
        raise ValueError(f"pair_views: expected two (..., N, D) tensors of one shape, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a = F.normalize(z_a.float(), dim=-1)
        b = F.normalize(z_b.float(), dim=-1)
        n = a.shape[-2]
        if decoupled and n == 1:  # no negative for any anchor: nothing to contrast (as `info_nce`)
            return (a * b).sum() * 0.0
        z = torch.cat([a, b], dim=-2) * tau ** -0.5
        logits = _Gram.apply(z)  # (..., 2N, 2N) similarities / tau
        positive = (a * b).sum(dim=-1) / tau  # (..., N): the logit of i with its other view, both ways
        logits.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
        if decoupled:
            logits[..., :n, n:].diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
            logits[..., n:, :n].diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
        denominator = torch.logsumexp(logits, dim=-1)  # (..., 2N)
        return denominator.mean() - positive.mean()
