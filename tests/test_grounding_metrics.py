"""The grounding metrics (medssl.downstream.grounding.metrics) and the signed CNR they share with the app's
region statistics (medssl.explain.measures), by hand on tiny maps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medssl.downstream.grounding import metrics
from medssl.errors import UserError
from medssl.explain import measures


def _line(values, target_count=4):
    """A (10, 1, 1) map and a target covering its first `target_count` voxels."""
    values = np.asarray(values, np.float32).reshape(-1, 1, 1)
    target = np.zeros(values.shape, bool)
    target[:target_count] = True
    return values, target


def test_grounding_metrics_exact_values():
    # s = 2m - 1 = [1, .8, .36, .16, .56, 0, -1, -1, -1, -1]; target = first four voxels
    heat, target = _line([1.0, 0.9, 0.68, 0.58, 0.78, 0.5, 0, 0, 0, 0])
    # IoU at t = .1: {0..4} -> 4/5; .2 and .3: {0,1,2,4} -> 3/5; .4 and .5: {0,1,4} -> 2/5
    assert metrics.miou(heat, target) == pytest.approx((0.8 + 0.6 + 0.6 + 0.4 + 0.4) / 5)
    assert metrics.dice(heat, target) == pytest.approx(2 * 4 / (5 + 4))  # 0.5 itself is not above 0.5
    assert metrics.mass_inside(heat, target) == pytest.approx(3.16 / 4.44, rel=1e-6)
    inside, outside = heat[:4].ravel().astype(float), heat[4:].ravel().astype(float)
    expected_cnr = (inside.mean() - outside.mean()) / math.sqrt(inside.var() + outside.var())
    found = metrics.grounding_metrics(heat, target)
    assert found.cnr == pytest.approx(expected_cnr, rel=1e-6) and found.cnr > 0
    assert found.pointing_game and found.hit
    assert found.to_dict()["miou"] == pytest.approx(0.56)
    assert measures.cnr(heat, ~target) == pytest.approx(-expected_cnr, rel=1e-6)  # signed
    assert measures.cnr(2 * heat - 1, target) == pytest.approx(expected_cnr, rel=1e-5)  # scale-invariant


def test_cnr_by_hand_and_edge_cases():
    values = np.array([1.0, 3.0, 0.0, 2.0]).reshape(4, 1, 1)
    region = np.array([True, True, False, False]).reshape(4, 1, 1)
    assert measures.cnr(values, region) == pytest.approx(1 / math.sqrt(2))  # (2 - 1) / sqrt(1 + 1)
    constant, target = _line([0.5] * 10)
    assert measures.cnr(constant, target) == 0.0
    binary, target = _line([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    assert measures.cnr(binary, target) == math.inf and measures.cnr(binary, ~target) == -math.inf
    assert math.isnan(measures.cnr(binary, np.ones_like(target)))


def test_grounding_edge_cases():
    constant, target = _line([0.5] * 10)
    found = metrics.grounding_metrics(constant, target)
    assert found == metrics.GroundingMetrics(pointing_game=False, mass_inside=pytest.approx(0.4), miou=0.0, cnr=0.0,
                                             dice=0.0, hit=False)
    assert metrics.pointing_game(constant, np.ones_like(target))  # every maximum inside a whole-volume target
    tie, target = _line([1, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert not metrics.pointing_game(tie, target)  # a tie with a maximum outside counts against the map
    zero, target = _line([0.0] * 10)
    assert metrics.mass_inside(zero, target) == 0.0
    assert metrics.grounding_metrics(zero, target).cnr == 0.0  # constant map
    assert math.isnan(metrics.grounding_metrics(zero, np.ones_like(target)).cnr)  # no voxel outside the target
    with pytest.raises(UserError, match="target: the mask is empty"):
        metrics.grounding_metrics(constant, np.zeros_like(target))
    with pytest.raises(UserError, match="target: mask shape"):
        metrics.dice(constant, target[:5])
    with pytest.raises(UserError, match=r"map: values must lie in \[0, 1\]"):
        metrics.miou(constant * 3, target)
    with pytest.raises(UserError, match="NaN"):
        metrics.mass_inside(np.full((2, 2, 2), np.nan), np.ones((2, 2, 2), bool))
    with pytest.raises(UserError, match="3D"):
        metrics.pointing_game(np.zeros((4, 4)), np.ones((4, 4), bool))
