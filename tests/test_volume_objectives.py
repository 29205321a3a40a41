"""The 3D pretraining objectives, each alone: values, masks, gradients, precision, config."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.config import validate_config
from medssl.errors import UserError
from medssl.losses.contrastive import info_nce
from medssl.losses.crop import crop_contrast
from medssl.losses.part_whole import PartWhole, _distance, octants
from medssl.losses.patient import patient_contrast, patient_masks
from medssl.losses.region import pool_regions, region_contrast
from medssl.losses.registry import VOLUME_OBJECTIVES, VolumeObjectivesConfig, total_loss
from medssl.losses.voxel import sample_features, voxel_contrast


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_points(batch: int, n: int, shape: tuple[int, int, int], g: torch.Generator) -> torch.Tensor:
    """(batch, n, 3) continuous (z, y, x) coordinates inside a grid of `shape`."""
    return torch.rand(batch, n, 3, generator=g) * (torch.tensor(shape, dtype=torch.float32) - 1)


# ---- voxel level ----

def test_sample_features_matches_indexing_at_integer_points_and_interpolates() -> None:
    g = _gen(0)
    feat = torch.randn(2, 3, 4, 5, 6, generator=g)
    idx = torch.stack([torch.randint(0, s, (2, 7), generator=g) for s in (4, 5, 6)], dim=-1)
    sampled = sample_features(feat, idx.float())
    assert sampled.shape == (2, 7, 3)
    for b in range(2):
        expected = feat[b, :, idx[b, :, 0], idx[b, :, 1], idx[b, :, 2]].T
        torch.testing.assert_close(sampled[b], expected)
    midpoint = sample_features(feat, torch.tensor([[[1.0, 2.0, 3.5]]] * 2))
    torch.testing.assert_close(midpoint[0, 0], (feat[0, :, 1, 2, 3] + feat[0, :, 1, 2, 4]) / 2)
    with pytest.raises(ValueError, match="outside the feature grid"):
        sample_features(feat, torch.tensor([[[0.0, 0.0, 5.5]]] * 2))


def test_voxel_contrast_is_lower_for_corresponding_points_and_has_gradients() -> None:
    g = _gen(1)
    feat = torch.randn(2, 16, 6, 6, 6, generator=g, requires_grad=True)
    points = _random_points(2, 20, (6, 6, 6), g)
    aligned = voxel_contrast(feat, feat, points, points, min_separation=0.0)
    shuffled = voxel_contrast(feat, feat, points, points[:, torch.randperm(20, generator=g)], min_separation=0.0)
    assert aligned.ndim == 0 and torch.isfinite(aligned) and aligned < shuffled
    aligned.backward()
    assert feat.grad is not None and feat.grad.abs().sum() > 0
    # view b: the same volume flipped along x and cut at z=1; points mapped with that geometry
    feat_b = feat.detach().flip(-1)[:, :, 1:]
    points = points.clamp_min(1.0)
    points_b = torch.stack([points[..., 0] - 1, points[..., 1], 5 - points[..., 2]], dim=-1)
    torch.testing.assert_close(sample_features(feat_b, points_b), sample_features(feat.detach(), points))
    assert voxel_contrast(feat.detach(), feat_b, points, points_b, min_separation=0.0) < shuffled


def _reference_direction(za: torch.Tensor, zb: torch.Tensor, excluded: set[tuple[int, int]], tau: float) -> float:
    """Plain per-anchor InfoNCE with explicit loops: positive j == i, candidates not in `excluded`."""
    a, b = F.normalize(za, dim=1), F.normalize(zb, dim=1)
    losses = []
    for i in range(len(a)):
        logits = [float(a[i] @ b[j]) / tau for j in range(len(b)) if (i, j) not in excluded]
        losses.append(-float(a[i] @ b[i]) / tau + math.log(sum(math.exp(x) for x in logits)))
    return sum(losses) / len(losses)


def test_voxel_min_separation_excludes_exactly_the_near_points_of_the_same_crop() -> None:
    g = _gen(2)
    feat_a, feat_b = torch.randn(2, 1, 4, 3, 3, 5, generator=g)
    idx_a = [(1, 1, 0), (1, 1, 1), (1, 2, 4)]  # points 0 and 1 are 1 voxel apart, 2 is far
    idx_b = [(0, 0, 0), (2, 1, 3), (0, 2, 2)]
    za = torch.stack([feat_a[0, :, z, y, x] for z, y, x in idx_a])
    zb = torch.stack([feat_b[0, :, z, y, x] for z, y, x in idx_b])
    pa, pb = torch.tensor([idx_a], dtype=torch.float32), torch.tensor([idx_b], dtype=torch.float32)
    for separation, excluded in ((0.5, set()), (1.5, {(0, 1), (1, 0)})):
        expected = 0.5 * (_reference_direction(za, zb, excluded, 0.2) + _reference_direction(zb, za, excluded, 0.2))
        loss = voxel_contrast(feat_a, feat_b, pa, pb, tau=0.2, min_separation=separation)
        assert loss.item() == pytest.approx(expected, rel=1e-5)
    # points of another crop are never excluded, however close
    two_crops = voxel_contrast(feat_a.expand(2, -1, -1, -1, -1), feat_b.expand(2, -1, -1, -1, -1),
                               pa.expand(2, -1, -1), pb.expand(2, -1, -1), min_separation=1.5)
    dup = torch.cat([za, za]), torch.cat([zb, zb])
    excluded = {(0, 1), (1, 0), (3, 4), (4, 3)}
    expected = 0.5 * (_reference_direction(*dup, excluded, 0.2) + _reference_direction(*dup[::-1], excluded, 0.2))
    assert two_crops.item() == pytest.approx(expected, rel=1e-5)


# ---- region level ----

def test_pool_regions_averages_per_element_and_region() -> None:
    g = _gen(3)
    feat = torch.randn(2, 3, 2, 2, 3, generator=g, requires_grad=True)
    region_map = torch.randint(-1, 3, (2, 2, 2, 3), generator=g)
    region_map[1] = -1
    region_map[1, 0, 0, 0] = 4
    emb, ids, batch = pool_regions(feat, region_map)
    expected = [(b, r) for b in range(2) for r in range(5) if (region_map[b] == r).any()]
    assert list(zip(batch.tolist(), ids.tolist())) == expected
    for row, (b, r) in enumerate(expected):
        torch.testing.assert_close(emb[row], feat[b][:, region_map[b] == r].mean(dim=1))
    emb.sum().backward()
    assert feat.grad is not None and feat.grad[1, :, 0, 0, 0].abs().sum() > 0 and feat.grad[1, :, 1, 1, 1].sum() == 0


def test_region_contrast_prefers_consistent_regions_and_has_gradients() -> None:
    g = _gen(4)
    regions = torch.arange(4).repeat(3)  # 4 regions in 3 patients
    patients = torch.arange(3).repeat_interleave(4)
    onehot = F.one_hot(regions, 8).float() + 0.05 * torch.randn(12, 8, generator=g)
    random = torch.randn(12, 8, generator=g, requires_grad=True)
    consistent = region_contrast(onehot, regions, patients)
    shuffled = region_contrast(random, regions, patients)
    assert consistent.ndim == 0 and torch.isfinite(consistent) and consistent < shuffled
    shuffled.backward()
    assert random.grad is not None and random.grad.abs().sum() > 0


def test_region_false_negative_radius_equals_removing_that_negative() -> None:
    g = _gen(5)
    z = torch.randn(4, 6, generator=g)
    regions = torch.tensor([0, 0, 1, 2])  # anchors 0 and 1 (regions 1, 2 have no positive)
    patients = torch.tensor([0, 1, 0, 1])
    positions = torch.tensor([[0.5, 0.5, 0.5], [0.52, 0.5, 0.5], [0.55, 0.5, 0.5], [0.9, 0.1, 0.1]])
    masked = region_contrast(z, regions, patients, positions, fn_radius=0.1)
    keep = torch.tensor([0, 1, 3])
    removed = region_contrast(z[keep], regions[keep], patients[keep])
    assert masked.item() == pytest.approx(removed.item(), rel=1e-6)
    assert region_contrast(z, regions, patients, positions, fn_radius=0.0) != pytest.approx(masked.item())
    # positives are never masked, however close
    assert region_contrast(z, regions, patients, positions, fn_radius=2.0).item() == pytest.approx(
        region_contrast(z[:2], regions[:2], patients[:2]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs positions"):
        region_contrast(z, regions, patients, None, fn_radius=0.1)


def test_region_cross_patient_drops_same_patient_positives() -> None:
    g = _gen(6)
    z = torch.randn(3, 5, generator=g)
    regions, patients = torch.tensor([0, 0, 0]), torch.tensor([0, 0, 1])
    loss = region_contrast(z, regions, patients, cross_patient=True)
    pos = torch.tensor([[0, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    excl = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert loss.item() == pytest.approx(info_nce(z, z, pos, tau=0.2, exclude=excl).item(), rel=1e-6)


# ---- crop level ----

def test_crop_contrast_aligned_beats_shuffled_decoupled_differs_and_grads() -> None:
    g = _gen(7)
    z_a = torch.randn(6, 16, generator=g, requires_grad=True)
    z_b = z_a.detach() + 0.05 * torch.randn(6, 16, generator=g)
    aligned = crop_contrast(z_a, z_b)
    shuffled = crop_contrast(z_a, z_b[torch.tensor([1, 2, 3, 4, 5, 0])])
    assert aligned.ndim == 0 and aligned < shuffled
    decoupled = crop_contrast(z_a, z_b, decoupled=True)
    assert torch.isfinite(decoupled) and decoupled < aligned  # the positive left the denominator
    aligned.backward()
    assert z_a.grad is not None and z_a.grad.abs().sum() > 0


# ---- patient level ----

def test_patient_positives_only_across_studies() -> None:
    patients = torch.tensor([0, 0, 0, 1, 1, 2])
    studies = torch.tensor([0, 0, 1, 0, 0, 0])
    assert int(patient_masks(patients, studies)[0].any(dim=1).sum()) == 3  # patient 1: one study, patient 2: one crop
    e1, e2 = torch.eye(2)
    z = torch.stack([e1, e1, e1, e2]).requires_grad_(True)
    tau = 0.5
    loss = patient_contrast(z, patients[[0, 1, 2, 5]], studies[[0, 1, 2, 5]], tau=tau)
    # anchors 0, 1: positive crop 2, same-study crop excluded, negative crop 3; anchor 2: positives 0, 1
    first = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1))
    third = -math.log(math.exp(1 / tau) / (2 * math.exp(1 / tau) + 1))
    assert loss.item() == pytest.approx((2 * first + third) / 3, rel=1e-6)
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    one_study = patient_contrast(z, torch.tensor([0, 0, 1, 1]), torch.tensor([3, 3, 3, 3]))
    assert one_study.item() == 0.0


# ---- part-whole ----

def test_octants_follow_the_documented_order_and_invert() -> None:
    x = torch.arange(2 * 3 * 4 * 6 * 2, dtype=torch.float32).reshape(2, 3, 4, 6, 2)
    parts = octants(x)
    assert parts.shape == (16, 3, 2, 3, 1)
    for b in range(2):
        for k in range(8):
            iz, iy, ix = k // 4, (k // 2) % 2, k % 2
            torch.testing.assert_close(parts[b * 8 + k], x[b, :, 2 * iz:2 * iz + 2, 3 * iy:3 * iy + 3, ix:ix + 1])
    grid = parts.reshape(2, 2, 2, 2, 3, 2, 3, 1)  # (B, iz, iy, ix, C, d, h, w)
    rebuilt = torch.cat([torch.cat([torch.cat([grid[:, iz, iy, 0], grid[:, iz, iy, 1]], dim=-1)
                                    for iy in range(2)], dim=-2) for iz in range(2)], dim=-3)
    torch.testing.assert_close(rebuilt, x)
    with pytest.raises(ValueError, match="even"):
        octants(torch.zeros(1, 1, 3, 2, 2))


def test_part_whole_losses_fall_when_the_mlps_are_trained_and_targets_get_no_gradient() -> None:
    torch.manual_seed(0)
    g = _gen(8)
    head = PartWhole(dim=8)
    parts, whole = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, generator=g)
    target_parts = torch.randn(4, 8, 8, generator=g, requires_grad=True)
    target_whole = torch.randn(4, 8, generator=g, requires_grad=True)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    history = []
    for _ in range(50):
        losses = head(parts, whole, target_parts, target_whole)
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        (losses["compose"] + losses["decompose"]).backward()
        optimizer.step()
    assert target_parts.grad is None and target_whole.grad is None
    for key in ("compose", "decompose"):
        assert 0 <= history[-1][key] < 0.5 * history[0][key]
    # perfect predictions give 0, opposite ones 4
    assert _distance(whole, 3 * whole).item() == pytest.approx(0.0, abs=1e-6)
    assert _distance(whole, -whole).item() == pytest.approx(4.0, rel=1e-6)


def test_part_whole_with_one_octant_alone_targets_that_octant_of_the_decomposer() -> None:
    g = _gen(10)
    head = PartWhole(dim=8)
    parts, whole, target_whole = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, generator=g), torch.randn(
        3, 8, generator=g)
    all_targets = torch.randn(3, 8, 8, generator=g)
    index = torch.tensor([5, 0, 7])
    one = head(parts, whole, all_targets[torch.arange(3), index], target_whole, part_index=index)
    decomposed = head.decompose(whole).reshape(3, 8, 8)[torch.arange(3), index]
    assert one["decompose"].item() == pytest.approx(_distance(decomposed, all_targets[torch.arange(3), index]).item())
    assert one["compose"].item() == pytest.approx(head(parts, whole, all_targets, target_whole)["compose"].item())
    # the mean over the draws of one octant is the 8-octant loss
    every = [head(parts, whole, all_targets[:, k], target_whole, part_index=torch.full((3,), k))["decompose"]
             for k in range(8)]
    assert torch.stack(every).mean().item() == pytest.approx(
        head(parts, whole, all_targets, target_whole)["decompose"].item(), rel=1e-5)
    with pytest.raises(ValueError, match="target_parts must be"):
        head(parts, whole, all_targets, target_whole, part_index=index)


# ---- precision ----

def test_bf16_inputs_give_float32_finite_losses() -> None:
    g = _gen(9)

    def bf(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 30).to(torch.bfloat16)

    points = _random_points(2, 5, (4, 4, 4), g).to(torch.bfloat16)
    ids = torch.tensor([0, 0, 1, 1])
    emb, region_ids, batch = pool_regions(bf(2, 6, 4, 4, 4), torch.randint(0, 3, (2, 4, 4, 4), generator=g))
    losses = [
        voxel_contrast(bf(2, 6, 4, 4, 4), bf(2, 6, 4, 4, 4), points, points, tau=0.05),
        region_contrast(emb.bfloat16(), region_ids, batch, torch.rand(len(batch), 3).bfloat16(), fn_radius=0.3),
        crop_contrast(bf(4, 6), bf(4, 6), tau=0.05),
        patient_contrast(bf(4, 6), ids, torch.tensor([0, 1, 0, 1]), tau=0.05, decoupled=True),
        *PartWhole(6).to(torch.bfloat16)(bf(2, 8, 6), bf(2, 6), bf(2, 8, 6), bf(2, 6)).values(),
    ]
    assert emb.dtype == torch.float32
    for loss in losses:
        assert loss.dtype == torch.float32 and loss.ndim == 0 and torch.isfinite(loss)


# ---- config and total ----

def test_config_defaults_and_total_loss_skips_zero_weights() -> None:
    config = validate_config({"patient": {"weight": 0}, "crop": {"decoupled": True}}, VolumeObjectivesConfig)
    assert tuple(VolumeObjectivesConfig.model_fields) == tuple(VOLUME_OBJECTIVES)
    assert config.active() == ("crop", "voxel", "region", "part_whole") and config.crop.decoupled  # table order
    terms = {"voxel": torch.tensor(2.0), "crop": torch.tensor(1.0, dtype=torch.bfloat16),
             "patient": torch.tensor(float("nan")), "part_whole.compose": torch.tensor(1.0),
             "part_whole.decompose": torch.tensor(3.0)}
    total = total_loss(terms, config)
    assert total.dtype == torch.float32 and total.item() == pytest.approx(2 + 1 + 0.5 * 4)
    with pytest.raises(ValueError, match="unknown objective term 'mask'"):
        total_loss({"mask": torch.tensor(1.0)}, config)
    with pytest.raises(ValueError, match="no term with a positive weight"):
        total_loss({"patient": torch.tensor(1.0)}, config)


@pytest.mark.parametrize("tree, key", [
    ({"voxel": {"weight": -1.0}}, "voxel.weight"),
    ({"part_whole": {"weight": -0.5}}, "part_whole.weight"),
    ({"crop": {"tau": 0}}, "crop.tau"),
    ({"voxl": {"weight": 1.0}}, "unknown key 'voxl'"),
    ({"region": {"radius": 0.2}}, "unknown key 'region.radius'"),
    ({name: {"weight": 0} for name in VOLUME_OBJECTIVES}, "every objective weight is 0"),
])
def test_config_rejects_bad_weights_and_names_with_the_dotted_key(tree: dict, key: str) -> None:
    with pytest.raises(UserError, match=r"^objectives: .*" + key.replace(".", r"\.")):
        validate_config(tree, VolumeObjectivesConfig, source="objectives")
