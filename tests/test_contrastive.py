"""The shared InfoNCE core: values, masks, decoupling, numerics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.losses.contrastive import info_nce, one_positive_pair_views, pair_views, same_id_mask


def test_single_positive_matches_cross_entropy() -> None:
    g = torch.Generator().manual_seed(0)
    a, c = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    logits = F.normalize(a, dim=1) @ F.normalize(c, dim=1).T / 0.2
    expected = F.cross_entropy(logits, torch.arange(6))
    assert info_nce(a, c, torch.eye(6, dtype=torch.bool), tau=0.2) == pytest.approx(expected.item(), rel=1e-5)


def test_perfect_alignment_beats_random_and_exclusion_removes_pairs() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    aligned = pair_views(z, z, tau=0.1)
    random = pair_views(z, torch.randn(8, 16, generator=g), tau=0.1)
    assert aligned < random
    # with every negative excluded, the denominator holds the positive alone: loss 0
    pos = torch.eye(4, dtype=torch.bool)
    loss = info_nce(z[:4], z[:4], pos, tau=0.1, exclude=~pos)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_decoupled_drops_the_positive_from_the_denominator() -> None:
    a = torch.tensor([[1.0, 0.0]])
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos = torch.tensor([[True, False]])
    coupled = info_nce(a, c, pos, tau=1.0)
    decoupled = info_nce(a, c, pos, tau=1.0, decoupled=True)
    assert coupled.item() == pytest.approx(-1 + math.log(math.e + 1), rel=1e-6)
    assert decoupled.item() == pytest.approx(-1 + 0.0, rel=1e-6)


def test_ids_make_multiple_positives_and_no_positive_gives_zero_with_grad() -> None:
    mask = same_id_mask(torch.tensor([0, 0, 1]))
    assert mask.tolist() == [[True, True, False], [True, True, False], [False, False, True]]
    z = torch.randn(3, 4, requires_grad=True)
    loss = info_nce(z, z, torch.zeros(3, 3, dtype=torch.bool), tau=0.1)
    loss.backward()
    assert loss.item() == 0.0 and z.grad is not None


def test_float32_under_low_precision_inputs_and_shape_errors() -> None:
    z = (torch.randn(16, 32) * 50).to(torch.bfloat16)
    loss = pair_views(z, z, tau=0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with pytest.raises(ValueError, match="positives must be"):
        info_nce(torch.randn(2, 3), torch.randn(4, 3), torch.ones(2, 2, dtype=torch.bool), tau=0.1)


def test_leading_dims_are_independent_problems() -> None:
    g = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(5, 7, 8, generator=g), torch.randn(5, 7, 8, generator=g)
    looped = torch.stack([pair_views(a, b, tau=0.2) for a, b in zip(z_a, z_b)]).mean()
    assert pair_views(z_a, z_b, tau=0.2).item() == pytest.approx(looped.item(), rel=1e-5)
    with pytest.raises(ValueError, match="expected"):
        info_nce(torch.randn(2, 3, 4), torch.randn(3, 3, 4), torch.ones(3, 3, dtype=torch.bool), tau=0.1)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("shape", [(6, 8), (3, 2, 7, 5), (1, 4)])
def test_one_positive_pair_views_equals_pair_views(shape: tuple[int, ...], decoupled: bool) -> None:
    """The fast path of TS2Vec's temporal loss gives the masked `pair_views`'s value and gradients."""
    g = torch.Generator().manual_seed(sum(shape) + decoupled)
    a, b = (torch.randn(shape, generator=g).requires_grad_(True) for _ in range(2))
    a_ref, b_ref = (x.detach().clone().requires_grad_(True) for x in (a, b))
    fast = one_positive_pair_views(a, b, tau=0.1, decoupled=decoupled)
    reference = pair_views(a_ref, b_ref, tau=0.1, decoupled=decoupled)
    assert fast.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-6)
    (fast + reference).backward()
    assert torch.allclose(a.grad, a_ref.grad, atol=1e-5) and torch.allclose(b.grad, b_ref.grad, atol=1e-5)
