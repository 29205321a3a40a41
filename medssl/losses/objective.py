"""What a volume pretraining objective is: a config with a `weight`, and a module that turns one step's
shared encoder outputs into named loss terms.

`VolumePretrainModel` runs the encoder ONCE over all crops of a micro-batch and hands every active
objective a `VolumeStep`: the batch, the projected crop embeddings of the four views and, on first
request, the dense projected feature maps (so a dense head is computed only when an objective asks
for it, and in the order the objectives ask). An objective returns `{term name: scalar}`; a term is
named after its objective, or "<objective>.<part>" when it has several (each gets the weight).

Adding an objective: write its module (the loss as a function of tensors, its `ObjectiveConfig`
subclass, its `VolumeObjective` subclass) and add one entry to `medssl.losses.registry.VOLUME_OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import NonNegativeFloat, PositiveFloat
from torch import nn

from medssl.config import StrictModel
from medssl.training.distributed import DistContext, gather_rows

VIEWS = ("a", "b", "c", "d")


class ObjectiveConfig(StrictModel):
    """An objective's config section; weight 0 switches it off."""

    weight: NonNegativeFloat = 1.0


class ContrastConfig(ObjectiveConfig):
    """An InfoNCE objective's section: temperature and the decoupled (DCL) option."""

    tau: PositiveFloat = 0.2
    decoupled: bool = False


@dataclass
class ObjectiveContext:
    """What an objective may need to build itself: the projection width, the student modules it may copy
    (an EMA teacher), the teacher's base momentum and the number of training steps."""

    proj_dim: int
    student: Callable[[], nn.Module]  # -> nn.ModuleDict(encoder=..., projector=...), the live student modules
    teacher_momentum: float
    total_steps: int
    in_channels: int = 1  # channels of the crops


@dataclass
class VolumeStep:
    """One micro-batch after the shared encoder pass.

    batch: the `VolumePretrainBatches` item (crops "a".."d" (n, 1, S, S, S), ids, points, region maps);
    z: (4n, proj_dim) projected crop embeddings of a, b, c, d (in that order);
    coarse: (4n, C, d, h, w) the coarsest encoder map of the shared pass (None without it);
    embed: crops (N, 1, S, S, S) -> (feature maps, (N, proj_dim)), the student's encoder + projector;
    z is None when no active objective uses the shared encoder pass (`uses_encoder_pass`);
    network: crops (N, C, S, S, S) -> (N, C_out, S, S, S), the whole segmentation network (encoder and
    decoder), present when an active objective `needs_network`;
    generator: the step's seeded generator (on the model's device), for an objective's random draws; the same
    on every rank, so an objective draws for the global batch and keeps its rows (`ctx`);
    ctx: where this process stands under torchrun. A contrastive objective contrasts the global batch:
    `gather` its embeddings and IDs first (the same on every rank, whatever the local data), then compute
    the same loss on every rank; DDP's gradient average is then the global loss's gradient.
    """

    batch: dict[str, torch.Tensor]
    z: torch.Tensor | None
    embed: Callable[[torch.Tensor], tuple[list[torch.Tensor], torch.Tensor]]
    dense_maps: Callable[[], torch.Tensor]
    network: Callable[[torch.Tensor], torch.Tensor] | None = None
    generator: torch.Generator | None = None
    ctx: DistContext = field(default_factory=DistContext)
    coarse: torch.Tensor | None = None
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def anchors(self) -> int:
        return self.batch["a"].shape[0]

    def view(self, name: str) -> torch.Tensor:
        """(n, proj_dim) crop embeddings of view `name` ("a".."d")."""
        return self.z.split(self.anchors)[VIEWS.index(name)]

    def octant_cells(self, name: str) -> torch.Tensor:
        """(n, 8, C) the coarsest map of view `name` averaged over each octant of the crop, in
        `medssl.losses.part_whole.octants` order (the cells the crop embedding's `grid_pool` flattens)."""
        cells = torch.nn.functional.adaptive_avg_pool3d(self.coarse.split(self.anchors)[VIEWS.index(name)], 2)
        return cells.flatten(2).transpose(1, 2)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of x (n, ...) -> (world_size * n, ...), rank-major (identity in one process)."""
        return gather_rows(x, self.ctx)

    def dense(self, name: str) -> torch.Tensor:
        """(n, proj_dim, d, h, w) dense projected features of view `name` (computed once per step)."""
        if self._dense is None:
            self._dense = self.dense_maps()
        return self._dense.split(self.anchors)[VIEWS.index(name)]


class VolumeObjective(nn.Module):
    """Base of the registered objectives: `forward(step) -> {term: scalar}`.

    needs_dense: the model then builds the dense 1x1x1 projection head of the feature map at
    `views.feature_stride`. needs_network: the model holds the whole segmentation network (encoder and
    decoder, exported as `network.pt`) and passes it in `VolumeStep.network`. uses_encoder_pass (default
    True): the objective reads the shared encoder pass over the four views (`view`, `dense`, `embed`); when
    no active objective does, that pass and the projector are skipped. `after_step(step, total)` runs after
    every optimiser step (e.g. an EMA update).
    """

    Config: ClassVar[type[ObjectiveConfig]]
    needs_dense: ClassVar[bool] = False
    needs_network: ClassVar[bool] = False
    uses_encoder_pass: ClassVar[bool] = True

    def __init__(self, config: ObjectiveConfig, context: ObjectiveContext) -> None:
        super().__init__()
        self.config = config

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, step: int, context: ObjectiveContext) -> None:
        """Called after optimiser step `step` (1-based)."""
