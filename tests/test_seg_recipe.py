"""The fine-tuning recipe (medssl.downstream.segmentation.training): class-balanced crops, augmentation that
keeps image and label aligned, deep supervision, class weights and their config errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.config import load_config
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.segmentation.config import AugmentSettings, CropSettings, FinetuneSegConfig
from medssl.downstream.segmentation.task import finetune_seg
from medssl.downstream.segmentation.training import DeepSupervisionHeads, DiceCEObjective, SegBatches
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_segmentation_network
from medssl.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "finetune_seg_tiny.yaml"
FAST = ["model.name=segresnet", "model.width=8", "model.segresnet_blocks=[1,1,1]", "data.crop_size=[16,16,16]",
        "train.lr=0.01"]
NO_AUGMENT = AugmentSettings(enabled=False)

pytestmark = pytest.mark.usefixtures("one_thread")


def _phantom() -> torch.Tensor:
    """(1, 48, 48, 48) labels: class 1 fills the border shell, class 0 a cavity [10, 38)^3 inside it, class 2
    a block [14, 22)^3 and class 3 a 4^3 block at [28, 32)^3; nothing but class 1 within 10 voxels of an edge,
    so a 16^3 crop centred on a voxel of class 0, 2 or 3 is never moved to fit."""
    label = torch.ones(1, 48, 48, 48, dtype=torch.uint8)
    label[0, 10:38, 10:38, 10:38] = 0
    label[0, 14:22, 14:22, 14:22] = 2
    label[0, 28:32, 28:32, 28:32] = 3
    return label


def _centre_classes(batches: SegBatches, count: int) -> np.ndarray:
    """The class at the centre voxel (8, 8, 8) of every crop of the first `count` micro-batches."""
    return np.concatenate([batches[i]["label"][:, 0, 8, 8, 8].numpy() for i in range(count)])


@pytest.mark.parametrize("uniform_fraction", [0.0, 0.5])
def test_class_balanced_crops_follow_the_configured_ratios(uniform_fraction):
    label = _phantom()
    ratios = (2.0, 0.0, 1.0, 1.0)  # background (the cavity) half, the shell never, blocks 2 and 3 a quarter each
    batches = SegBatches([label.float() / 3], [label], crop=(16, 16, 16), size=8, seed=0, classes=4,
                         crops=CropSettings(ratios=ratios, uniform_fraction=uniform_fraction), augment=NO_AUGMENT)
    centres = _centre_classes(batches, 150)  # 1200 crops
    measured = np.bincount(centres, minlength=4) / len(centres)
    # a uniform crop's centre is uniform over [8, 40]^3: the classes' shares of that cube
    interior = label[0, 8:41, 8:41, 8:41].flatten()
    volume_share = np.bincount(interior.numpy(), minlength=4) / interior.numel()
    expected = (1 - uniform_fraction) * np.asarray(ratios) / sum(ratios) + uniform_fraction * volume_share
    np.testing.assert_allclose(measured, expected, atol=0.045)  # about 3 binomial standard deviations
    assert expected[3] > 10 * volume_share[3] * (uniform_fraction or 0.01)  # the 64-voxel block is oversampled
    if uniform_fraction == 0.0:
        assert measured[1] == 0.0


def test_uniform_crops_without_augmentation_are_the_original_sampler():
    label = _phantom()
    image = torch.rand(1, 48, 48, 48)
    batches = SegBatches([image], [label], crop=(16, 16, 16), size=2, seed=3,
                         crops=CropSettings(sampler="uniform"), augment=NO_AUGMENT)
    from medssl.seeding import numpy_generator

    rng = numpy_generator(3, 5)  # the original: volume, then the corner per axis, from (seed, i)
    for b in range(2):
        assert int(rng.integers(1)) == 0
        start = [int(rng.integers(0, 48 - 16 + 1)) for _ in range(3)]
        window = (0, slice(start[0], start[0] + 16), slice(start[1], start[1] + 16), slice(start[2], start[2] + 16))
        assert torch.equal(batches[5]["image"][b, 0], image[window])
        assert torch.equal(batches[5]["label"][b, 0], label[window].long())


def _asymmetric_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """An image whose intensity encodes the label (0.1 + 0.25 x class) of an object with no symmetry: a
    block of class 1 with a bar of class 2 on one side and a small class 3 block on one corner."""
    label = torch.zeros(1, 48, 48, 48, dtype=torch.uint8)
    label[0, 12:34, 16:30, 18:26] = 1
    label[0, 30:34, 16:40, 18:22] = 2
    label[0, 12:16, 16:20, 22:26] = 3
    return 0.1 + 0.25 * label.float(), label


def test_augmentation_moves_image_and_label_together():
    image, label = _asymmetric_pair()
    spatial = AugmentSettings(flip_axes=(0, 1, 2), flip_prob=0.5, affine_prob=1.0, rotate_deg=20.0, scale=0.15,
                              intensity_prob=0.0, noise_prob=0.0)
    batches = SegBatches([image], [label], crop=(24, 24, 24), size=4, seed=0, classes=4,
                         crops=CropSettings(ratios=(0.0, 1.0, 1.0, 1.0), uniform_fraction=0.0), augment=spatial)
    plain = SegBatches([image], [label], crop=(24, 24, 24), size=4, seed=0, classes=4,
                       crops=CropSettings(ratios=(0.0, 1.0, 1.0, 1.0), uniform_fraction=0.0), augment=NO_AUGMENT)
    agreements, moved = [], 0
    for i in range(12):
        batch = batches[i]
        decoded = ((batch["image"] - 0.1) / 0.25).round().clamp(0, 3).long()
        agreements += [(decoded[b] == batch["label"][b]).float().mean().item() for b in range(4)]
        moved += sum(not torch.equal(batch["label"][b], plain[i]["label"][b]) for b in range(4))
        assert set(batch["label"].unique().tolist()) <= {0, 1, 2, 3}
    # bilinear image vs nearest label disagree only on a thin rim of the boundaries
    assert min(agreements) > 0.93 and np.mean(agreements) > 0.97
    assert moved == 48  # every crop was rotated / scaled


def test_intensity_augmentation_leaves_the_label_alone():
    image, label = _asymmetric_pair()
    intensity = AugmentSettings(flip_axes=(), affine_prob=0.0, intensity_prob=1.0, noise_prob=1.0, noise_std=0.05)
    batches = SegBatches([image], [label], crop=(24, 24, 24), size=2, seed=0, classes=4,
                         crops=CropSettings(uniform_fraction=0.0), augment=intensity)
    plain = SegBatches([image], [label], crop=(24, 24, 24), size=2, seed=0, classes=4,
                       crops=CropSettings(uniform_fraction=0.0), augment=NO_AUGMENT)
    for i in range(3):
        assert torch.equal(batches[i]["label"], plain[i]["label"])
        assert not torch.allclose(batches[i]["image"], plain[i]["image"], atol=1e-3)
    assert torch.equal(batches[2]["image"], batches[2]["image"])  # deterministic per (seed, i)


@pytest.mark.parametrize("name, extra", [("basicunet", {"width": 4}),
                                         ("segresnet", {"segresnet_blocks": (1, 1, 1, 1)})])
def test_deep_supervision_heads_and_loss(name, extra):
    cfg = VolumeEncoderConfig(name=name, **extra)
    torch.manual_seed(0)
    network = build_segmentation_network(cfg, 3)
    network.deep_supervision = DeepSupervisionHeads(network, cfg, 3)
    assert network.deep_supervision.strides == [2, 4]
    assert any(k.startswith("deep_supervision.heads.1.") for k in network.state_dict())
    x = torch.rand(2, 1, 32, 32, 32)
    label = (x > 0.5).long() + (x > 0.8).long()
    assert network(x).shape == (2, 3, 32, 32, 32)
    assert [o.shape[2:] for o in network.deep_supervision.outputs()] == [(16, 16, 16), (8, 8, 8)]
    deep = DiceCEObjective(1.0, 1.0, deep_supervision=network.deep_supervision)
    plain = DiceCEObjective(1.0, 1.0)
    batch = {"image": x, "label": label}
    with_ds = deep(network, batch, torch.Generator())
    assert with_ds.loss.item() > plain(network, batch, torch.Generator()).loss.item()  # plus two auxiliary terms
    with_ds.loss.backward()
    assert network.deep_supervision.heads[1].weight.grad.abs().sum() > 0


def test_class_weights_weigh_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8)
    label = torch.randint(0, 3, (2, 1, 8, 8, 8))

    def loss(weights):
        objective = DiceCEObjective(0.0, 1.0, class_weights=weights)
        return float(objective(lambda x: logits, {"image": logits, "label": label}, torch.Generator()).loss)

    assert loss(None) == pytest.approx(loss((1.0, 1.0, 1.0)), rel=1e-6)
    assert loss((1.0, 1.0, 5.0)) != pytest.approx(loss(None), rel=1e-3)


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("recipe") / "hospital", patients=4, studies=1, size=32, seed=0,
                         trials=1, signal_seconds=2.0)


def _config(manifest: Path, *overrides: str) -> FinetuneSegConfig:
    return load_config(TINY, FinetuneSegConfig, [f"data.manifest={manifest}", *FAST, *overrides])


def test_finetune_with_deep_supervision_and_class_weights_end_to_end(hospital, tmp_path):
    cfg = _config(hospital, "train.steps=4", "train.log_every=2", "seg.eval_every=2", "seg.overlay_cases=0",
                  "seg.deep_supervision=true", "seg.class_weights=[0.5,1,1,1,1,1,1,1,1,1]")
    summary = finetune_seg(cfg, tmp_path / "run", quiet=True)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert any(k.startswith("deep_supervision.") for k in best["model"])  # heads saved and reloaded for the test
    assert summary["test_checkpoint"].startswith("best.pt") and 0.0 <= summary["test_dice_mean"] <= 1.0
    assert summary["seconds"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(np.isfinite(r["loss"]) for r in records)


@pytest.mark.parametrize("override, message", [
    ("seg.class_weights=[1,2]", r"seg.class_weights: 2 values given, one per class is needed \(10: background, body"),
    ("seg.crops.ratios=[1,1,1]", r"seg.crops.ratios: 3 values given, one per class is needed \(10"),
])
def test_per_class_settings_of_the_wrong_length_are_refused(hospital, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        finetune_seg(_config(hospital, override), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_recipe_config_errors_name_the_field(hospital):
    with pytest.raises(UserError, match="seg.crops.ratios"):
        _config(hospital, "seg.crops.ratios=[0,0]")
    with pytest.raises(UserError, match="seg.augment.flip_axes"):
        _config(hospital, "seg.augment.flip_axes=[3]")
    with pytest.raises(UserError, match="seg.crops.uniform_fraction"):
        _config(hospital, "seg.crops.uniform_fraction=1.5")
    with pytest.raises(UserError, match="seg.pretrained_parts"):
        _config(hospital, "seg.pretrained_parts=decoder")


def test_affine_context_crops_reach_the_whole_volume():
    """The larger crop the affine resamples is drawn from a volume padded by the margin, so crop centres
    range over the volume as without augmentation (not only its middle)."""
    size = 48
    x = torch.arange(size, dtype=torch.float32).view(1, size, 1, 1).expand(1, size, size, size) / size
    label = torch.ones(1, size, size, size, dtype=torch.uint8)
    affine = AugmentSettings(flip_axes=(), affine_prob=1.0, rotate_deg=10.0, scale=0.1, affine_margin=8,
                             intensity_prob=0.0, noise_prob=0.0)
    for crops in (CropSettings(sampler="uniform"), CropSettings(uniform_fraction=0.0)):
        batches = SegBatches([x.contiguous()], [label], crop=(32, 32, 32), size=8, seed=0, classes=2, crops=crops,
                             augment=affine)
        centres = torch.cat([batches[i]["image"][:, 0, 16, 16, 16] for i in range(20)]) * size
        # a 32^3 crop of a 48^3 volume is centred within [16, 32]
        assert centres.min() < 19 and centres.max() > 29, (crops.sampler, centres.min(), centres.max())
