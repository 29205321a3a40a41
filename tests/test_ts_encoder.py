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


def _plain_forward(enc: TSEncoder, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The encoder as its modules read: 1D convolutions with every tap, (B, C, T) memory."""
    h = enc.input(x).masked_fill(mask[:, None, :], 0.0)
    for block in enc.blocks:
        residual = h if block.project is None else block.project(h)
        h = block.conv2(torch.nn.functional.gelu(block.conv1(torch.nn.functional.gelu(h)))) + residual
    return h.transpose(1, 2)


@pytest.mark.parametrize("length", [7, 40, 300])
def test_the_fast_encoder_equals_its_plain_1d_convolutions(length: int) -> None:
    """The forward pass runs channels-last 2D convolutions and drops the taps that reach only zero padding (at
    dilation >= T): the same outputs, input gradients and weight gradients (the dropped taps' are 0) as the plain
    1D convolutions of its modules."""
    torch.manual_seed(0)
    enc = TSEncoder(TSEncoderConfig(in_channels=3, hidden=8, out_dim=12, depth=8, kernel=3))  # dilations 1..128
    x = torch.randn(2, 3, length)
    mask = torch.rand(2, length) < 0.2
    outputs, grads = [], []
    for forward in (enc.forward, lambda x, m: _plain_forward(enc, x, m)):
        enc.zero_grad()
        xx = x.clone().requires_grad_()
        out = forward(xx, mask)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append(out)
        grads.append([xx.grad] + [p.grad.clone() for p in enc.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    for fast, plain in zip(*grads):
        torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-4)  # sums over B x T in another order
    last = enc.blocks[-1].conv2.weight.grad  # dilation 128: beyond a 7- or 40-sample window the side taps are 0
    assert (last[:, :, [0, 2]] == 0).all() == (length <= 128)
