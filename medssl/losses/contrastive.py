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


class _MeanLogSumExpGram(torch.autograd.Function):
    """z (..., M, D) -> the mean over all rows i of logsumexp_j (z_i . z_j), the pairs in `drop` (diagonals of the
    (M, M) matrix given by their offsets: 0 is i = j) left out; scalar. Written out so that the (..., M, M) matrix
    is made once and then worked on in place: exp(S - max) overwrites S in the forward pass and becomes the
    softmax in the backward pass, whose gradient to z is one matrix product, (P + P^T) z. (The composition of a
    batched product and `torch.logsumexp` makes and keeps several such matrices.)"""

    @staticmethod
    def forward(ctx, z: torch.Tensor, drop: tuple[int, ...]) -> torch.Tensor:
        scores = z @ z.transpose(-1, -2)
        for offset in drop:
            scores.diagonal(offset, dim1=-2, dim2=-1).fill_(float("-inf"))
        peak = scores.amax(dim=-1, keepdim=True)
        total = scores.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # scores now holds exp(S - max)
        ctx.save_for_backward(z, scores, total)
        ctx.used = False
        return (peak + total.log()).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        if ctx.used:
            raise RuntimeError("_MeanLogSumExpGram: its backward reuses its saved matrix in place and runs once")
        ctx.used = True
        z, softmax, total = ctx.saved_tensors
        softmax.mul_(grad / (total * total.numel()))  # d mean / d S_ij = softmax_ij / rows, times the incoming grad
        return (softmax + softmax.transpose(-1, -2)) @ z, None


def one_positive_pair_views(z_a: torch.Tensor, z_b: torch.Tensor, *, tau: float,
                            decoupled: bool = False) -> torch.Tensor:
    """`pair_views(z_a, z_b)` (no ids: every anchor's one positive is its other view), the same value computed
    without (..., 2N, 2N) masks, for problems where that matrix is large: TS2Vec's temporal loss runs on
    (B, 2T, 2T) similarities. The positive logit is computed directly; the self-similarity (and, decoupled,
    the positive) is left out of the log-sum-exp, which works on its one matrix in place
    (`_MeanLogSumExpGram`). Shape: (..., N, D) twice -> scalar, float32. (Crop contrast keeps `pair_views`:
    its matrix is 2B x 2B, and its rounding is pinned by tests/fixtures/pre_redesign.)"""
    if z_a.shape != z_b.shape or z_a.ndim < 2:
        raise ValueError(f"pair_views: expected two (..., N, D) tensors of one shape, got {tuple(z_a.shape)} and "
                         f"{tuple(z_b.shape)}")
    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a = F.normalize(z_a.float(), dim=-1)
        b = F.normalize(z_b.float(), dim=-1)
        n = a.shape[-2]
        if decoupled and n == 1:  # no negative for any anchor: nothing to contrast (as `info_nce`)
            return (a * b).sum() * 0.0
        z = torch.cat([a, b], dim=-2) * tau ** -0.5  # (..., 2N, D): z_i . z_j is the logit similarity / tau
        positive = (a * b).sum(dim=-1) / tau  # (..., N): the logit of i with its other view, both ways
        denominator = _MeanLogSumExpGram.apply(z, (0, n, -n) if decoupled else (0,))  # mean over the 2N rows
        return denominator - positive.mean()
