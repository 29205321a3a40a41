"""The four levels of the hierarchical time-series contrast, one at a time, plus weighting and DBPM."""

from __future__ import annotations

import pydantic
import pytest
import torch

from medssl.losses.contrastive import info_nce, pair_views
from medssl.losses.hierarchical import (
    HierarchicalContrast,
    HierarchyConfig,
    LevelConfig,
    observation_loss,
    weighted_info_nce,
    window_masks,
)
from medssl.models.ts_encoder import pool

OFF = LevelConfig(weight=0.0)


def only(level: str, **extra) -> HierarchyConfig:
    levels = {name: OFF for name in ("observation", "sample", "trial", "patient")}
    levels[level] = LevelConfig(weight=1.0, tau=0.1)
    return HierarchyConfig(**levels, **extra)


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values)


def test_observation_level_is_the_temporal_loss_per_window() -> None:
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 8, generator=g)
    expected = sum(pair_views(z_a[i], z_b[i], tau=0.1) for i in range(3)) / 3
    assert observation_loss(z_a, z_b, tau=0.1).item() == pytest.approx(expected.item(), rel=1e-6)
    # the same timestamp in both views is the positive: aligned views beat time-shuffled ones
    aligned = observation_loss(z_a, z_a, tau=0.1)
    shuffled = observation_loss(z_a, z_a[:, torch.randperm(10, generator=g)], tau=0.1)
    assert aligned < shuffled


def test_window_masks_per_level() -> None:
    sample, trial = ids(0, 1, 1, 2), ids(0, 0, 0, 1)
    pos, excl = window_masks(sample, None)  # sample level: other view of the same window (and its duplicate)
    assert pos[0].tolist() == [False, False, False, False, True, False, False, False]
    assert pos[1].tolist() == [False, False, True, False, False, True, True, False]
    assert excl.tolist() == torch.eye(8, dtype=torch.bool).tolist()
    pos, excl = window_masks(sample, trial)  # trial level: other windows of the same trial, both views
    assert pos[0].tolist() == [False, True, True, False, False, True, True, False]
    assert excl[0].tolist() == [True, False, False, False, True, False, False, False]
    assert not (pos & excl).any() and not pos[3].any()  # trial 1 has one window: no positive


def test_sample_level_equals_nt_xent_on_pooled_windows() -> None:
    g = torch.Generator().manual_seed(1)
    z_a, z_b = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    loss, terms = HierarchicalContrast(only("sample"))(z_a, z_b, ids(0, 1, 2, 3), ids(0, 0, 1, 1), ids(0, 0, 0, 0))
    assert set(terms) == {"sample"}
    assert loss.item() == pytest.approx(pair_views(pool(z_a), pool(z_b), tau=0.1).item(), rel=1e-6)


def _trial_structured(trials: torch.Tensor, g: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    centres = torch.randn(int(trials.max()) + 1, 8, generator=g)
    return (centres[trials][:, None, :] + noise * torch.randn(len(trials), 5, 8, generator=g))


@pytest.mark.parametrize("level", ["trial", "patient"])
def test_group_levels_reward_windows_of_the_same_group(level: str) -> None:
    g = torch.Generator().manual_seed(2)
    sample, trial, patient = ids(0, 1, 2, 3, 4, 5, 6, 7), ids(0, 0, 1, 1, 2, 2, 3, 3), ids(0, 0, 0, 0, 1, 1, 1, 1)
    group = trial if level == "trial" else patient
    structured = _trial_structured(group, g)
    loss_fn = HierarchicalContrast(only(level))
    good, _ = loss_fn(structured, structured + 0.01, sample, trial, patient)
    scrambled = structured[torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])]
    bad, _ = loss_fn(scrambled, scrambled + 0.01, sample, trial, patient)
    assert good < bad


def test_patient_level_value_by_hand() -> None:
    # two windows of one patient and one window of another: the positive of window 0 is window 1 in both views
    h_a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    h_b = torch.tensor([[1.0, 0.1], [0.1, 1.0], [1.0, 0.9]])
    sample, trial, patient = ids(0, 1, 2), ids(0, 1, 2), ids(0, 0, 1)
    loss, _ = HierarchicalContrast(only("patient"))(h_a[:, None], h_b[:, None], sample, trial, patient)
    h = torch.cat([h_a, h_b])
    pos = torch.zeros(6, 6, dtype=torch.bool)
    for i, j in ((0, 1), (0, 4), (1, 0), (1, 3), (3, 1), (3, 4), (4, 0), (4, 3)):
        pos[i, j] = True
    excl = torch.zeros(6, 6, dtype=torch.bool)
    for i, j in ((0, 0), (0, 3), (3, 0), (3, 3), (1, 1), (1, 4), (4, 1), (4, 4), (2, 2), (2, 5), (5, 2), (5, 5)):
        excl[i, j] = True
    assert loss.item() == pytest.approx(info_nce(h, h, pos, tau=0.1, exclude=excl).item(), rel=1e-6)


def test_single_trial_patients_are_skipped_at_the_trial_level_and_counted() -> None:
    g = torch.Generator().manual_seed(3)
    z_a, z_b = torch.randn(6, 4, 8, generator=g), torch.randn(6, 4, 8, generator=g)
    sample, trial, patient = ids(0, 1, 2, 3, 4, 5), ids(0, 0, 1, 1, 2, 2), ids(0, 0, 0, 0, 1, 1)
    loss, terms = HierarchicalContrast(only("trial"))(z_a, z_b, sample, trial, patient)
    assert terms["trial_skipped_patients"].item() == 1.0  # patient 1 has one trial in the batch
    h = torch.cat([pool(z_a), pool(z_b)])
    pos, excl = window_masks(sample, trial)
    keep = torch.tensor([1, 1, 1, 1, 0, 0] * 2, dtype=torch.bool)
    expected = info_nce(h[keep], h, pos[keep], tau=0.1, exclude=excl[keep])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # every patient single-trial: the level is skipped entirely (zero with a gradient), all counted
    z_a.requires_grad_(True)
    loss, terms = HierarchicalContrast(only("trial"))(z_a, z_b, sample, ids(0, 0, 1, 1, 2, 2), ids(0, 0, 1, 1, 2, 2))
    loss.backward()
    assert loss.item() == 0.0 and terms["trial_skipped_patients"].item() == 3.0 and z_a.grad is not None


def test_weighted_sum_of_active_levels() -> None:
    g = torch.Generator().manual_seed(4)
    z_a, z_b = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g)
    args = (ids(0, 1, 2, 3), ids(0, 1, 2, 3), ids(0, 0, 1, 1))
    cfg = HierarchyConfig(observation=LevelConfig(weight=0.1), sample=LevelConfig(weight=0.1),
                          trial=LevelConfig(weight=0.7), patient=LevelConfig(weight=0.1))
    loss, terms = HierarchicalContrast(cfg)(z_a, z_b, *args)
    assert {"observation", "sample", "trial", "patient", "trial_skipped_patients"} == set(terms)
    expected = 0.1 * terms["observation"] + 0.1 * terms["sample"] + 0.7 * terms["trial"] + 0.1 * terms["patient"]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    two = HierarchyConfig(trial=OFF, patient=OFF)
    assert HierarchicalContrast(two).config.active == ["observation", "sample"]
    assert set(HierarchicalContrast(two)(z_a, z_b, *args)[1]) == {"observation", "sample"}


def test_float32_under_bfloat16() -> None:
    z = (torch.randn(4, 6, 8) * 30).to(torch.bfloat16)
    loss, _ = HierarchicalContrast()(z, z, ids(0, 1, 2, 3), ids(0, 0, 1, 1), ids(0, 0, 0, 0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_config_validation() -> None:
    with pytest.raises(pydantic.ValidationError, match="greater than or equal to 0"):
        HierarchyConfig(trial={"weight": -1})
    with pytest.raises(pydantic.ValidationError, match="extra"):
        HierarchyConfig(session={"weight": 1})
    with pytest.raises(pydantic.ValidationError, match="at least one"):
        HierarchyConfig(observation=OFF, sample=OFF, trial=OFF, patient=OFF)
    with pytest.raises(pydantic.ValidationError):
        HierarchyConfig(dbpm={"w_min": 0.0})
    with pytest.raises(pydantic.ValidationError):
        HierarchyConfig(dbpm={"levels": ["observation"]})


def test_weighted_info_nce_is_the_bounded_weighted_mean_of_anchor_terms() -> None:
    g = torch.Generator().manual_seed(5)
    h = torch.randn(8, 4, generator=g)
    pos, excl = window_masks(ids(0, 1, 2, 3), None)
    down = torch.tensor([1, 0, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    per_anchor = torch.stack([info_nce(h[i:i + 1], h, pos[i:i + 1], tau=0.1, exclude=excl[i:i + 1]) for i in range(8)])
    w = torch.where(down, 0.25, 1.0)
    expected = (w * per_anchor).sum() / w.sum()
    got = weighted_info_nce(h, pos, excl, tau=0.1, decoupled=False, down=down, w_min=0.25)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert weighted_info_nce(h, pos, excl, tau=0.1, decoupled=False).item() == pytest.approx(
        per_anchor.mean().item(), rel=1e-5)


def test_dbpm_downweights_abnormal_pairs_after_warmup_and_keeps_state_in_buffers() -> None:
    cfg = only("sample", dbpm={"enabled": True, "warmup": 5, "threshold": 2.0, "w_min": 0.5, "momentum": 0.5})
    loss_fn = HierarchicalContrast(cfg)
    g = torch.Generator().manual_seed(6)
    sample = torch.arange(16)
    for step in range(6):
        z = torch.randn(16, 4, 8, generator=g)
        _, terms = loss_fn(z, z + 0.3 * torch.randn(16, 4, 8, generator=g), sample, sample, sample)
        if step < 5:
            assert terms["dbpm_downweighted"].item() == 0.0  # warm-up: statistics only
    assert int(loss_fn.dbpm_updates[0]) == 6 and "dbpm_mean" in loss_fn.state_dict()
    # one window whose views disagree completely is an abnormally hard pair: down-weighted alone
    z = torch.randn(16, 4, 8, generator=g)
    z_b = z + 0.3 * torch.randn(16, 4, 8, generator=g)
    z_b[0] = -z[0]
    loss_fn.eval()
    before = loss_fn.dbpm_mean.clone()
    loss, terms = loss_fn(z, z_b, sample, sample, sample)
    assert terms["dbpm_downweighted"].item() == pytest.approx(2 / 32)  # anchor 0 in both views
    assert torch.equal(before, loss_fn.dbpm_mean)  # eval mode does not update the statistics
    plain, _ = HierarchicalContrast(only("sample"))(z, z_b, sample, sample, sample)
    assert loss < plain  # the bad pair's large term counts half
