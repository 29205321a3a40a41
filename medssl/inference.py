"""Whole-volume inference shared by every head: sliding windows on the preprocessed grid, results back
on the input's own grid.

`SlidingWindowPredictor` preprocesses a volume with the whole-volume pipeline of its preprocessing
(`medssl.data.volumes.whole_volume_pipeline`: load, orientation, spacing, intensity, padding; no
crop), runs a network over it with `monai.inferers.sliding_window_inference` (ROI = the crop size),
and takes any channel-first result on that grid back to the input's grid, orientation and affine with
`monai.transforms.Invertd` (padding, resampling and reorientation undone, linear interpolation).
Segmentation (softmax -> argmax labels) and grounding (one similarity map per phrase) both go through it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Invertd

from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.volumes import whole_volume_pipeline


class SlidingWindowPredictor:
    """Preprocess, predict with sliding windows, invert to the input grid.

    sw_batch_size: windows per forward pass; overlap: fraction of the ROI shared by neighbouring
    windows; mode: "gaussian" (centre-weighted blending) or "constant".
    """

    def __init__(self, prep: VolumePreprocessing, *, sw_batch_size: int = 4, overlap: float = 0.25,
                 mode: Literal["gaussian", "constant"] = "gaussian", device: torch.device | str = "cpu"):
        self.prep, self.sw_batch_size, self.overlap, self.mode = prep, sw_batch_size, overlap, mode
        self.device = torch.device(device)
        self.pipeline = whole_volume_pipeline(prep)
        # MONAI matches the trace of each transform to the very instance that applied it: preprocess and
        # invert with this predictor's own pipeline
        self.invert = Invertd(keys="pred", transform=self.pipeline, orig_keys="image", nearest_interp=False)

    def preprocess(self, image_path: str | os.PathLike) -> MetaTensor:
        """The whole preprocessed volume (1, D, H, W), carrying its transform trace."""
        return self.pipeline({"image": str(image_path)})["image"]

    @torch.no_grad()
    def windows(self, network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """network over image (1, D, H, W) in ROI-sized windows -> (C, D, H, W) float32 on the CPU."""
        x = torch.as_tensor(image)[None].to(self.device)
        out = sliding_window_inference(x, self.prep.crop_size, self.sw_batch_size, network, overlap=self.overlap,
                                       mode=self.mode)
        return torch.as_tensor(out).float()[0].cpu()

    def probabilities(self, network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        """Softmax over classes of the network's logits: image (1, D, H, W) -> (K, D, H, W)."""
        return torch.softmax(self.windows(network, image), dim=0)

    def to_input_grid(self, values: torch.Tensor, image: MetaTensor) -> np.ndarray:
        """values (C, D, H, W) on `image`'s preprocessed grid -> (C, X, Y, Z) float32 on the input's grid."""
        pred = MetaTensor(values, meta=dict(image.meta), applied_operations=list(image.applied_operations))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            back = torch.as_tensor(self.invert({"pred": pred, "image": image})["pred"]).float().numpy()
        expected = tuple(int(n) for n in image.meta["spatial_shape"])
        if back.shape[1:] != expected:  # a programming error: the trace did not undo every spatial step
            raise RuntimeError(f"{image.meta.get('filename_or_obj')}: inverted result {back.shape[1:]} is not on the "
                               f"input grid {expected}")
        return back

    def labels(self, network: Callable[[torch.Tensor], torch.Tensor], image: MetaTensor) -> np.ndarray:
        """Predicted classes (X, Y, Z) uint8 on the input's grid: argmax of the inverted probabilities."""
        probabilities = self.to_input_grid(self.probabilities(network, image.as_tensor()), image)
        return probabilities.argmax(axis=0).astype(np.uint8)
