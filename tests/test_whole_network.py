"""Whole-network pretraining: the masked-reconstruction objective (loss as tensors), pretraining that trains
and exports the whole network, and `finetune seg` loading it whole or encoder-only with a load report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medssl.config import load_config
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.downstream.segmentation.training import build_network
from medssl.errors import UserError
from medssl.losses.masked import block_mask, masked_mse
from medssl.losses.registry import VolumeObjectivesConfig
from medssl.models.volume_encoders import VolumeEncoderConfig, build_segmentation_network, network_encoder
from medssl.pretrain.volume import PretrainVolumeConfig, VolumePretrainModel, pretrain_volume
from medssl.training.checkpoint import load_checkpoint
from medssl.training.pretrained import export_network, load_pretrained

REPO = Path(__file__).resolve().parents[1]
MAE = REPO / "configs" / "pretrain_volume_mae.yaml"
FINETUNE = REPO / "configs" / "finetune_seg_tiny.yaml"
SMALL = ["model.width=4", "train.batch_size=2", "probe.enabled=false", "train.log_every=1"]

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ the loss


def test_block_mask_masks_whole_cubes_at_the_ratio():
    generator = torch.Generator().manual_seed(0)
    mask = block_mask((3, 32, 32, 32), block=4, ratio=0.6, generator=generator)
    assert mask.shape == (3, 1, 32, 32, 32) and mask.dtype == torch.bool
    cubes = mask.view(3, 8, 4, 8, 4, 8, 4)
    per_cube = cubes.float().mean(dim=(2, 4, 6))
    assert set(per_cube.unique().tolist()) <= {0.0, 1.0}  # a cube is masked whole or not at all
    assert per_cube.sum(dim=(1, 2, 3)).tolist() == [round(0.6 * 512)] * 3  # exactly the ratio, per crop
    assert not torch.equal(mask[0], mask[1])
    again = block_mask((3, 32, 32, 32), block=4, ratio=0.6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)
    odd = block_mask((1, 10, 12, 9), block=4, ratio=0.5, generator=generator)  # cubes cut at the far edges
    assert odd.shape == (1, 1, 10, 12, 9)


def test_masked_mse_counts_only_masked_voxels():
    target = torch.rand(2, 1, 8, 8, 8)
    mask = torch.zeros(2, 1, 8, 8, 8, dtype=torch.bool)
    mask[:, :, :4] = True
    prediction = target.clone()
    prediction[:, :, 4:] += 5.0  # wrong where nothing is masked: no loss
    assert masked_mse(prediction, target, mask).item() == pytest.approx(0.0)
    prediction[:, :, :4] += 0.5
    assert masked_mse(prediction, target, mask).item() == pytest.approx(0.25)
    assert masked_mse(prediction, target, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="do not fit"):
        masked_mse(prediction, target[:, :, :4], mask)


def test_the_masked_objective_is_off_by_default_and_trains_the_decoder():
    assert VolumeObjectivesConfig().masked.weight == 0.0
    assert "masked" not in VolumeObjectivesConfig().active()  # the default pretraining is unchanged
    config = load_config(MAE, PretrainVolumeConfig, ["data.manifest=x.json", *SMALL])
    model = VolumePretrainModel(config)
    assert model.network is not None and model.projector is None and not model.encoder_pass
    assert model.encoder.conv_0 is model.network.conv_0  # one set of weights
    crops = {k: torch.rand(2, 1, 32, 32, 32) for k in "abcd"}
    out = model({**crops, "match_accept_rate": torch.tensor(1.0)}, torch.Generator().manual_seed(0))
    assert set(out.terms) == {"masked", "match_accept_rate"} and out.embeddings is None
    out.loss.backward()
    assert model.network.upcat_1.convs.conv_0.conv.weight.grad.abs().sum() > 0  # the decoder learns
    assert model.objectives["masked"].mask_token.grad is not None


# ------------------------------------------------------------------------------------------------ export / load


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("whole") / "hospital", patients=3, studies=1, size=32, seed=2,
                         trials=1, signal_seconds=2.0)


@pytest.fixture(scope="module")
def pretrained(hospital, tmp_path_factory) -> Path:
    """A 6-step masked-reconstruction pretraining (width 4)."""
    run = tmp_path_factory.mktemp("mae") / "run"
    config = load_config(MAE, PretrainVolumeConfig, [f"data.manifest={hospital}", *SMALL, "train.steps=6",
                                                     "train.warmup_steps=1", "train.checkpoint_every=3"])
    pretrain_volume(config, run)
    return run


def test_pretraining_exports_the_whole_network(pretrained):
    records = [json.loads(line) for line in (pretrained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7)) and all(r["masked"] > 0 for r in records)
    payload = load_checkpoint(pretrained / "network.pt", kind="volume-network")
    assert payload["arch"] == {"encoder": VolumeEncoderConfig(width=4).model_dump(mode="json"), "out_channels": 1}
    network = build_segmentation_network(VolumeEncoderConfig(width=4), 1)
    assert payload["model"].keys() == network.state_dict().keys()  # MONAI's own key names
    last = load_checkpoint(pretrained / "checkpoints" / "last.pt")["model"]
    for key, value in payload["model"].items():
        assert torch.equal(value, last[f"network.{key}"])
    encoder = load_checkpoint(pretrained / "encoder.pt", kind="volume-encoder")["model"]
    for key, value in encoder.items():
        assert torch.equal(value, payload["model"][key])  # the encoder is the network's encoder


def _finetune_config(hospital: Path, *overrides: str) -> FinetuneSegConfig:
    return load_config(FINETUNE, FinetuneSegConfig, [f"data.manifest={hospital}", "model.width=4", *overrides])


@pytest.mark.parametrize("checkpoint", ["network.pt", "checkpoints/last.pt"])
def test_finetune_loads_the_whole_network_but_the_output_layer(hospital, pretrained, checkpoint):
    stored = load_checkpoint(pretrained / "network.pt")["model"]
    cfg = _finetune_config(hospital)
    scratch, _ = build_network(cfg, 10, None)
    network, report = build_network(cfg, 10, pretrained / checkpoint)
    assert report.parts == "network" and report.encoder_fraction == 1.0
    assert report.output_left == ["final_conv.weight", "final_conv.bias"] == report.mismatched
    assert not report.missing and not report.unexpected
    assert str(report).startswith("network: loaded 80, missing 0, unexpected 0, shape-mismatched 2")
    assert "output layer left random (final_conv.weight, final_conv.bias)" in str(report)
    for key, value in network.state_dict().items():
        if key.startswith("final_conv."):
            assert torch.equal(value, scratch.state_dict()[key])  # 10 classes: as initialised
        else:
            assert torch.equal(value, stored[key]), key  # decoder included


def test_finetune_loads_the_encoder_only_when_asked(hospital, pretrained, tmp_path):
    stored = load_checkpoint(pretrained / "network.pt")["model"]
    cfg = _finetune_config(hospital, "seg.pretrained_parts=encoder")
    scratch, _ = build_network(cfg, 10, None)
    network, report = build_network(cfg, 10, pretrained / "network.pt")
    encoder_keys = set(network_encoder(network, cfg.model).state_dict())
    assert report.parts == "encoder" and report.fraction == 1.0 and len(report.unexpected) > 0
    for key, value in network.state_dict().items():
        expected = stored[key] if key in encoder_keys else scratch.state_dict()[key]
        assert torch.equal(value, expected), key
    # auto takes what the checkpoint has: the encoder from encoder.pt
    assert build_network(_finetune_config(hospital), 10, pretrained / "encoder.pt")[1].parts == "encoder"


def test_whole_network_requests_that_cannot_be_met_are_refused(hospital, pretrained, tmp_path):
    from medssl.downstream.segmentation.task import finetune_seg

    with pytest.raises(UserError, match=r"seg.pretrained_parts: 'network' asks for the whole network, but .*"
                                        r"encoder.pt is a 'volume-encoder' checkpoint with the encoder only"):
        finetune_seg(_finetune_config(hospital, "seg.pretrained_parts=network"), tmp_path / "run",
                     pretrained=pretrained / "encoder.pt")
    assert not (tmp_path / "run").exists()
    payload = torch.load(pretrained / "network.pt", weights_only=True)
    payload["model"] = {k: v for k, v in payload["model"].items() if not k.startswith("upcat_1.")}
    torch.save(payload, tmp_path / "partial.pt")
    network = build_segmentation_network(VolumeEncoderConfig(width=4), 10)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(UserError, match=r"partial.pt: only .* of the network's tensors load, 100% required .*upcat_1"):
        load_pretrained(network, tmp_path / "partial.pt", arch=VolumeEncoderConfig(width=4), parts="network")
    assert all(torch.equal(v, before[k]) for k, v in network.state_dict().items())  # nothing half-loaded
    with pytest.raises(ValueError, match="is not the network of segresnet"):
        export_network(tmp_path / "x.pt", network, VolumeEncoderConfig(name="segresnet"), 1, {}, {}, 0)


def test_finetune_from_the_whole_network_end_to_end(hospital, pretrained, tmp_path):
    from medssl.downstream.segmentation.task import finetune_seg

    cfg = _finetune_config(hospital, "train.steps=2", "train.log_every=1", "seg.eval_every=0", "seg.overlay_cases=0")
    summary = finetune_seg(cfg, tmp_path / "run", pretrained=pretrained / "network.pt", quiet=True)
    assert summary["pretrained_parts"] == "network" and summary["encoder_loaded_fraction"] == 1.0
    assert summary["pretrained_load_report"].startswith("network: loaded 80")
