"""The organ head: the segmentation network of `medssl finetune seg` (fine-tuned from the pretrained encoder
on a few labelled volumes) answers "where is the organ" for grounding, and its decoder's last map gives the
finding scorer its voxel features.

`OrganHead.load(path)` reads a finetune-seg checkpoint (kind "finetune-seg", or a run folder: its best.pt,
else last.pt) or the organ head stored inside a grounding model; `OrganHead.from_state` rebuilds it from
what a grounding checkpoint stores (`state()`).

`OrganHead.run(image)`: image (1, D, H, W) preprocessed as the head was trained -> `OrganOutput` with the
class probabilities (K, D, H, W) and the decoder features at stride 1 (C, D, H, W): the input of the
network's output layer, captured by a forward pre-hook, blended over sliding windows like the logits.

`train_organ_head` fine-tunes one with `medssl.downstream.segmentation.task.finetune_seg` into a run folder
of its own (config, metrics, checkpoints, test Dice), from the manifest's labelled training volumes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medssl.data.preprocessing import VolumePreprocessing
from medssl.errors import UserError
from medssl.inference import SlidingWindowPredictor
from medssl.models.volume_encoders import BACKBONES, VolumeEncoderConfig, build_segmentation_network
from medssl.training.checkpoint import Kind, load_checkpoint, load_weights


@dataclass
class OrganOutput:
    """probabilities (K, D, H, W) float32 (softmax over the head's classes), features (C, D, H, W) float32
    (the decoder's last map), both on the head's preprocessed grid."""

    probabilities: torch.Tensor
    features: torch.Tensor

    @property
    def labels(self) -> np.ndarray:
        """(D, H, W) int: the most probable class of every voxel."""
        return self.probabilities.argmax(dim=0).numpy()


class _WithFeatures(nn.Module):
    """network(x) -> cat(logits, the output layer's input) along channels."""

    def __init__(self, network: nn.Module, output_layer: str):
        super().__init__()
        self.network = network
        self._features: torch.Tensor | None = None
        network.get_submodule(output_layer).register_forward_pre_hook(self._keep)

    def _keep(self, module: nn.Module, inputs: tuple) -> None:
        self._features = inputs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        return torch.cat([logits, self._features], dim=1)


class OrganHead:
    """A segmentation network with its classes (value -> label name), preprocessing and source path."""

    def __init__(self, network: nn.Module, arch: VolumeEncoderConfig, classes: dict[int, str],
                 prep: VolumePreprocessing, source: str, *, sw_batch_size: int = 4, device: torch.device | None = None):
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.network, self.arch, self.classes, self.prep, self.source = network.eval(), arch, classes, prep, source
        self.sw_batch_size = sw_batch_size
        self._wrapped = _WithFeatures(self.network, BACKBONES[arch.name].output_parts[0]).to(self.device)

    @property
    def feature_channels(self) -> int:
        """C: channels of the decoder's last map (the output layer's input)."""
        layer = self.network.get_submodule(BACKBONES[self.arch.name].output_parts[0])
        return int(layer.in_channels if hasattr(layer, "in_channels") else layer.conv.in_channels)

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> OrganHead:
        """From a finetune-seg checkpoint, or a finetune-seg run folder (its best.pt, else last.pt)."""
        path = Path(path)
        if path.is_dir():
            found = [path / "checkpoints" / name for name in ("best.pt", "last.pt")
                     if (path / "checkpoints" / name).is_file()]
            if not found:
                raise UserError(f"{path}: not a finetune-seg run folder (no checkpoints/best.pt or last.pt)")
            path = found[0]
        payload = load_checkpoint(path, kind=Kind.FINETUNE_SEG)
        return cls.from_state({"arch": payload["arch"], "model": payload["model"],
                               "preprocessing": payload["preprocessing"]}, str(path), **options)

    @classmethod
    def from_state(cls, state: dict[str, Any], source: str, **options: Any) -> OrganHead:
        """From `state()` (or a finetune-seg checkpoint's arch, model and preprocessing)."""
        try:
            arch = VolumeEncoderConfig.model_validate(state["arch"]["model"])
            classes = {int(k): str(v) for k, v in state["arch"]["classes"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source}: not an organ head (its architecture does not read: {type(err).__name__})") \
                from None
        network = build_segmentation_network(arch, len(classes))
        weights = {k: v for k, v in state["model"].items() if not k.startswith("deep_supervision.")}
        load_weights(network, weights, min_fraction=1.0, source=source)
        prep = VolumePreprocessing.from_dict(state["preprocessing"], where=source)
        return cls(network, arch, classes, prep, source, **options)

    def state(self) -> dict[str, Any]:
        """What a grounding checkpoint stores to rebuild the head (`from_state`)."""
        return {"arch": {"model": self.arch.model_dump(mode="json"),
                         "classes": {str(k): v for k, v in self.classes.items()}},
                "model": copy.deepcopy(self.network.state_dict()), "preprocessing": self.prep.to_dict()}

    @property
    def organs(self) -> tuple[str, ...]:
        """The label names, background first."""
        return tuple(self.classes[k] for k in sorted(self.classes))

    @torch.no_grad()
    def run(self, image: torch.Tensor) -> OrganOutput:
        """image (1, D, H, W) on the head's preprocessing -> probabilities and decoder features."""
        predictor = SlidingWindowPredictor(self.prep, sw_batch_size=self.sw_batch_size, device=self.device)
        out = predictor.windows(self._wrapped, image)
        k = len(self.classes)
        return OrganOutput(torch.softmax(out[:k], dim=0), out[k:])


def check_label_set(head: OrganHead, labels: dict[int, str] | None, source: str) -> None:
    """A UserError when an organ head's classes differ from the manifest's labels."""
    if labels is None:
        return
    theirs = {int(k): v for k, v in labels.items()}
    if theirs != head.classes:
        differ = sorted(set(theirs.items()) ^ set(head.classes.items()))[:4]
        raise UserError(f"{head.source}: an organ head of another label set than {source} "
                        f"(differing: {', '.join(f'{k}={v}' for k, v in differ)})")
