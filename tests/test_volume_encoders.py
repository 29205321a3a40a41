"""Volume encoders from MONAI networks, encoder export/loading, EMA teacher, heads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medssl.config import validate_config
from medssl.errors import UserError
from medssl.models.ema import EMATeacher, ema_momentum
from medssl.models.heads import ProjectionHead
from medssl.models.volume_encoders import (
    VolumeEncoderConfig,
    build_segmentation_network,
    build_volume_encoder,
    encoder_state,
    network_encoder,
)
from medssl.training.checkpoint import save_checkpoint
from medssl.training.pretrained import export_encoder, load_pretrained_encoder

NAMES = ("basicunet", "segresnet", "swinunetr")
PARTS = {"basicunet": {"conv_0", "down_1", "down_2", "down_3", "down_4"},
         "segresnet": {"convInit", "down_layers"},
         "swinunetr": {"swinViT", "encoder1", "encoder2", "encoder3", "encoder4"}}
PREP = {"spacing": [2.0, 2.0, 2.0], "window": [40.0, 400.0], "crop_size": [32, 32, 32]}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", NAMES)
def test_maps_follow_the_strides_and_gradients_reach_input_and_every_weight(name: str) -> None:
    encoder = build_volume_encoder(VolumeEncoderConfig(name=name))
    x = torch.randn(2, 1, 32, 32, 32, requires_grad=True)
    maps = encoder(x)
    assert len(maps) == len(encoder.strides) == len(encoder.out_channels)
    assert encoder.strides[0] == 1 and encoder.strides == sorted(encoder.strides)
    for feat, stride, channels in zip(maps, encoder.strides, encoder.out_channels):
        assert feat.shape == (2, channels, 32 // stride, 32 // stride, 32 // stride)
    assert encoder.embed_dim == encoder.out_channels[-1] == maps[-1].shape[1]
    sum(feat.mean() for feat in maps).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    unused = [k for k, p in encoder.named_parameters() if p.grad is None]
    assert not unused  # no exported weight is left untrained


@pytest.mark.parametrize("name", NAMES)
def test_encoder_is_exactly_the_networks_encoder_part(name: str) -> None:
    cfg = VolumeEncoderConfig(name=name)
    encoder_keys = encoder_state(build_volume_encoder(cfg))
    network = build_segmentation_network(cfg, out_channels=3)
    network_keys = network.state_dict()
    assert {k.split(".")[0] for k in encoder_keys} == PARTS[name]
    assert all(network_keys[k].shape == v.shape for k, v in encoder_keys.items())
    assert {k for k in network_keys if k.split(".")[0] in PARTS[name]} == set(encoder_keys)
    assert len(network_keys) > len(encoder_keys)  # the decoder is not part of it
    shared = network_encoder(network, cfg)  # shares the network's tensors
    next(shared.parameters()).data.fill_(0.5)
    assert torch.all(next(network.parameters()) == 0.5)


def test_config_defaults_and_errors_name_the_field() -> None:
    assert VolumeEncoderConfig(name="swinunetr").width == 12 and VolumeEncoderConfig().width == 8
    for bad, field in [({"name": "swinunetr", "width": 8}, "width 8"), ({"name": "segresnet", "width": 4}, "width 4"),
                       ({"name": "unet"}, "name"), ({"depth": 3}, "depth"),
                       ({"name": "swinunetr", "swin_heads": [5, 6, 12, 24]}, "swin_heads")]:
        with pytest.raises(UserError, match=field):
            validate_config(bad, VolumeEncoderConfig, source="model")


def test_input_sizes_the_backbone_cannot_take_are_refused() -> None:
    encoder = build_volume_encoder(VolumeEncoderConfig())
    with pytest.raises(UserError, match=r"model.name: basicunet .* multiples of 16, got \(24, 32, 32\)"):
        encoder(torch.zeros(1, 1, 24, 32, 32))
    with pytest.raises(UserError, match="at least 2 voxels"):
        encoder(torch.zeros(1, 1, 16, 16, 16))


@pytest.mark.parametrize("name", NAMES)
def test_export_then_load_puts_every_encoder_tensor_into_the_monai_network(tmp_path: Path, name: str) -> None:
    cfg = VolumeEncoderConfig(name=name)
    encoder = build_volume_encoder(cfg)
    path = tmp_path / "encoder.pt"
    export_encoder(path, encoder, cfg, PREP, {"train": {"steps": 3}}, step=3)
    network = build_segmentation_network(cfg, out_channels=4)
    decoder_before = {k: v.clone() for k, v in network.state_dict().items() if k.split(".")[0] not in PARTS[name]}
    report = load_pretrained_encoder(network, path, arch=cfg)
    assert report.fraction == 1.0 and not report.missing and not report.unexpected and not report.mismatched
    assert report.kind == "volume-encoder" and report.step == 3 and report.preprocessing == PREP
    state = network.state_dict()
    for key, value in encoder_state(encoder).items():
        assert torch.equal(state[key], value), key
    assert sorted(report.loaded) == sorted(encoder_state(encoder))
    assert all(torch.equal(state[k], v) for k, v in decoder_before.items())


@pytest.mark.parametrize("name", NAMES)
def test_an_exported_encoder_loads_into_plain_monai_without_medssl(tmp_path: Path, name: str) -> None:
    """The three lines of the README: the file names the MONAI class and its arguments."""
    cfg = VolumeEncoderConfig(name=name)
    encoder = build_volume_encoder(cfg)
    export_encoder(tmp_path / "encoder.pt", encoder, cfg, PREP, {}, step=1)

    import monai.networks.nets

    ckpt = torch.load(tmp_path / "encoder.pt", weights_only=True)
    net = getattr(monai.networks.nets, ckpt["monai"]["class"].rsplit(".", 1)[1])(**ckpt["monai"]["kwargs"])
    missing, unexpected = net.load_state_dict(ckpt["model"], strict=False)
    assert not unexpected and missing and all(k.split(".")[0] not in PARTS[name] for k in missing)
    assert type(net) is type(build_segmentation_network(cfg, 1))


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "seg.pt"
    cfg = VolumeEncoderConfig(name="segresnet")
    export_encoder(path, build_volume_encoder(cfg), cfg, PREP, {}, step=1)
    target = VolumeEncoderConfig()
    with pytest.raises(UserError, match=rf"{path}: the checkpoint's encoder differs from the config's: .*"
                                        "model.name: 'segresnet' in the checkpoint, 'basicunet' in the config"):
        load_pretrained_encoder(build_segmentation_network(target, 2), path, arch=target)
    wider = VolumeEncoderConfig(name="segresnet", width=16)
    with pytest.raises(UserError) as info:
        load_pretrained_encoder(build_segmentation_network(wider, 2), path, arch=wider)
    assert str(info.value) == (f"{path}: the checkpoint's encoder differs from the config's: model.width: 8 in the "
                               "checkpoint, 16 in the config")


def test_pretraining_checkpoint_from_ddp_loads_the_encoder_prefix(tmp_path: Path) -> None:
    cfg = VolumeEncoderConfig()
    encoder = build_volume_encoder(cfg)
    model = {f"module.encoder.{k}": v for k, v in encoder_state(encoder).items()}
    model["module.head.weight"] = torch.ones(4, 4)  # the rest of the pretraining model is not looked at
    path = tmp_path / "last.pt"
    save_checkpoint(path, kind="pretrain-volume", step=7, model=model, preprocessing=PREP, config={},
                    arch={"encoder": cfg.model_dump(mode="json"), "head_dim": 4})
    network = build_segmentation_network(cfg, 2)
    report = load_pretrained_encoder(network, path, arch=cfg)
    assert report.fraction == 1.0 and not report.unexpected and report.step == 7
    assert torch.equal(network.conv_0.conv_0.conv.weight, encoder.conv_0.conv_0.conv.weight)


def test_partial_weights_fail_below_the_fraction_and_leave_the_network_unchanged(tmp_path: Path) -> None:
    cfg = VolumeEncoderConfig()
    weights = {k: v for k, v in encoder_state(build_volume_encoder(cfg)).items() if not k.startswith("down_4.")}
    path = tmp_path / "partial.pt"
    save_checkpoint(path, kind="volume-encoder", step=0, model=weights, arch=cfg.model_dump(mode="json"),
                    preprocessing={}, config={})
    network = build_segmentation_network(cfg, 2)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(UserError, match=rf"{path}: only \d+% .* e\.g\. down_4\."):
        load_pretrained_encoder(network, path, arch=cfg)
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    report = load_pretrained_encoder(network, path, arch=cfg, min_fraction=0.5)
    assert report.missing and all(k.startswith("down_4.") for k in report.missing)


def test_truncated_or_foreign_checkpoints_are_user_errors(tmp_path: Path) -> None:
    cfg = VolumeEncoderConfig()
    path = tmp_path / "enc.pt"
    export_encoder(path, build_volume_encoder(cfg), cfg, PREP, {}, step=1)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    network = build_segmentation_network(cfg, 2)
    with pytest.raises(UserError, match=str(truncated)):
        load_pretrained_encoder(network, truncated, arch=cfg)
    toy = tmp_path / "toy.pt"
    save_checkpoint(toy, kind="toy", step=0, model={}, arch={}, preprocessing={}, config={})
    with pytest.raises(UserError, match=rf"{toy}: a 'toy' checkpoint holds no volume encoder"):
        load_pretrained_encoder(network, toy, arch=cfg)


def test_ema_teacher_update_math_and_frozen_copy() -> None:
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = EMATeacher(student)
    assert not any(p.requires_grad for p in teacher.parameters())
    old = teacher.module[0].weight.clone()
    with torch.no_grad():
        student[0].weight.add_(1.0)
        student[1].running_mean.fill_(3.0)
    teacher.update(student, momentum=0.9)
    assert torch.allclose(teacher.module[0].weight, 0.9 * old + 0.1 * student[0].weight)
    assert torch.equal(teacher.module[1].running_mean, torch.full((2,), 3.0))  # buffers are copied
    assert not teacher(torch.randn(4, 3)).requires_grad
    teacher.update(student, momentum=0.0)
    assert torch.equal(teacher.module[0].weight, student[0].weight)
    with pytest.raises(ValueError):
        teacher.update(student, momentum=1.5)


def test_ema_momentum_is_a_cosine_from_base_to_one() -> None:
    assert ema_momentum(0, 100) == pytest.approx(0.996)
    assert ema_momentum(50, 100) == pytest.approx(0.998)
    assert ema_momentum(100, 100) == ema_momentum(150, 100) == 1.0
    values = [ema_momentum(s, 10, base=0.9) for s in range(11)]
    assert values == sorted(values) and values[0] == pytest.approx(0.9)


def test_projection_head() -> None:
    pooled = torch.randn(2, 5)
    for norm in ("layer", "batch"):
        head = ProjectionHead(5, 16, 7, norm=norm)
        assert head(pooled).shape == (2, 7)
