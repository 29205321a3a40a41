"""The TS2Vec-style dilated CNN encoder: shapes, masking, receptive field, config validation."""

from __future__ import annotations

import pydantic
import pytest
import torch

from medssl.models.ts_encoder import TSEncoder, TSEncoderConfig, pool


def test_shapes_and_pool() -> None:
    enc = TSEncoder(TSEncoderConfig(in_channels=3, hidden=8, out_dim=16, depth=3))
    z = enc(torch.randn(4, 3, 50))
    assert z.shape == (4, 50, 16)
    assert torch.equal(pool(z), z.max(dim=1).values) and pool(z).shape == (4, 16)


def test_mask_zeroes_the_projected_input_at_masked_timestamps() -> None:
    torch.manual_seed(0)
    enc = TSEncoder(TSEncoderConfig(in_channels=2, hidden=8, out_dim=8, depth=2))
    x = torch.randn(2, 2, 40)
    mask = torch.zeros(2, 40, dtype=torch.bool)
    mask[0, 10:20] = True
    masked, plain = enc(x, mask), enc(x)
    assert torch.equal(masked[1], plain[1])  # the unmasked series is untouched
    assert not torch.allclose(masked[0], plain[0])
    # what a masked timestamp held does not matter
    x2 = x.clone()
    x2[0, :, 10:20] = 100.0
    assert torch.allclose(enc(x2, mask), masked)


def test_receptive_field() -> None:
    enc = TSEncoder(TSEncoderConfig(in_channels=1, hidden=4, out_dim=4, depth=3, kernel=3))
    assert enc.receptive_field == 1 + 2 * 2 * 7
    x = torch.randn(1, 1, 200)
    y = x.clone()
    y[0, 0, 100] += 5.0
    changed = (enc(x) - enc(y)).abs().sum(dim=2)[0] > 0
    reach = enc.receptive_field // 2
    assert changed[100] and not changed[: 100 - reach].any() and not changed[100 + reach + 1:].any()


def test_config_defaults_and_validation() -> None:
    cfg = TSEncoderConfig()
    assert (cfg.hidden, cfg.depth, cfg.out_dim) == (32, 6, 64)
    paper = TSEncoder(TSEncoderConfig(hidden=64, out_dim=320, depth=10))
    assert len(paper.blocks) == 10 and paper(torch.randn(1, 2, 16)).shape == (1, 16, 320)
    with pytest.raises(pydantic.ValidationError, match="odd"):
        TSEncoderConfig(kernel=4)
    with pytest.raises(pydantic.ValidationError, match="extra"):
        TSEncoderConfig(width=3)
    with pytest.raises(ValueError, match=r"expected \(B, 2, T\)"):
        TSEncoder()(torch.randn(1, 3, 10))
