"""3D part-whole objectives (Adam-v2's composability and decomposability on the 2x2x2 octants).

Paper: Adam-v2, Taher et al., "Representing Part-Whole Hierarchies in Foundation Models by Learning
Localizability, Composability, and Decomposability from Anatomy via Self-Supervision", arXiv:2404.15672,
eq. (2) (composability) and eq. (3) (decomposability), with an EMA teacher (BYOL, arXiv:2006.07733).

Composability: an MLP maps the 8 concatenated octant embeddings to the whole crop's embedding.
Decomposability: an MLP maps the whole's embedding to its 8 octant embeddings. Targets are the
stop-gradient (EMA teacher) embeddings; the distance is 2 - 2 cos, i.e. the squared error of
L2-normalised vectors, averaged, in float32.

Where the parts come from (`objectives.part_whole.parts`):
- "shared" (default): the student's octant embeddings are the octant cells of the crop's own encoder pass (the
  one every objective shares; a small MLP maps a cell to an embedding), and the teacher embeds the whole crop
  and ONE octant per crop, drawn at random each step, on its own (resized to the crop size) as the target of
  the decomposer's output for that octant: an unbiased draw of the 8-octant mean. One teacher pass over 2
  crops per anchor, no extra student pass: the whole step costs about 1.2x crop contrast alone.
- "isolated" (Adam-v2 as written): every octant is encoded on its own, resized to the crop size, by the student
  (8 more student passes per crop) and by the teacher: the whole step about 4x crop contrast alone.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from medssl.losses.objective import ObjectiveConfig, ObjectiveContext, VolumeObjective, VolumeStep
from medssl.models.ema import EMATeacher, ema_momentum
from medssl.models.heads import grid_pool
from medssl.training.distributed import local_part

N_PARTS = 8


def octants(x: torch.Tensor) -> torch.Tensor:
    """Split crops into their 2x2x2 octants.

    Shape: (B, C, D, H, W) -> (B*8, C, D/2, H/2, W/2).

    Row b*8 + k holds octant k of crop b, with k = 4*iz + 2*iy + ix, where iz, iy, ix in {0, 1}
    pick the first or second half along D, H and W (so k=0 is the low corner, k=7 the high one).
    D, H and W must be even.
    """
    if x.ndim != 5 or any(size % 2 for size in x.shape[2:]):
        raise ValueError(f"octants: expected (B, C, D, H, W) with even D, H, W, got {tuple(x.shape)}")
    b, c, d, h, w = x.shape
    halves = x.reshape(b, c, 2, d // 2, 2, h // 2, 2, w // 2)
    return halves.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b * N_PARTS, c, d // 2, h // 2, w // 2)


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, n_out))


def _distance(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of 2 - 2 cos over the last dimension, in float32. prediction, target: (..., D)."""
    with torch.autocast(device_type=prediction.device.type, enabled=False):
        p = F.normalize(prediction.float(), dim=-1)
        t = F.normalize(target.detach().float(), dim=-1)
        return (2 - 2 * (p * t).sum(dim=-1)).mean()


class PartWhole(nn.Module):
    """Compose (8*D -> D) and decompose (D -> 8*D) MLPs with one hidden layer of `hidden` units
    (default 2*D)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or 2 * dim
        self.dim = dim
        self.compose = _mlp(N_PARTS * dim, hidden, dim)
        self.decompose = _mlp(dim, hidden, N_PARTS * dim)

    def forward(self, parts: torch.Tensor, whole: torch.Tensor, target_parts: torch.Tensor,
                target_whole: torch.Tensor, part_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Shape: parts (B, 8, D) octant embeddings (octants() order); whole, target_whole (B, D); target_parts
        (B, 8, D), or (B, D) the target of octant `part_index` (B,) of each crop alone -> {"compose": scalar,
        "decompose": scalar}. The targets are detached here."""
        b = whole.shape[0]
        expected = {"parts": (b, N_PARTS, self.dim), "whole": (b, self.dim), "target_whole": (b, self.dim),
                    "target_parts": (b, N_PARTS, self.dim) if part_index is None else (b, self.dim)}
        given = {"parts": parts, "target_parts": target_parts, "whole": whole, "target_whole": target_whole}
        for name, shape in expected.items():
            if given[name].shape != shape:
                raise ValueError(f"PartWhole: {name} must be {shape}, got {tuple(given[name].shape)}")
        composed = self.compose(parts.reshape(b, N_PARTS * self.dim))
        decomposed = self.decompose(whole).reshape(b, N_PARTS, self.dim)
        if part_index is not None:
            decomposed = decomposed[torch.arange(b, device=decomposed.device), part_index]
        return {"compose": _distance(composed, target_whole), "decompose": _distance(decomposed, target_parts)}


class PartWholeConfig(ObjectiveConfig):
    """`objectives.part_whole`: the weight applies to each of its two terms (compose, decompose); `parts`: where
    the octant embeddings come from (module docstring)."""

    weight: float = Field(0.5, ge=0.0)
    parts: Literal["shared", "isolated"] = "shared"


class PartWholeObjective(VolumeObjective):
    """{"part_whole.compose", "part_whole.decompose"}: crop a's octant embeddings compose the EMA teacher's
    embedding of a, and a's embedding predicts the teacher's embeddings of its octants, each seen alone and
    resized to the crop size; with `parts` "shared" the student's octants are cells of the shared pass and the
    teacher embeds one random octant per crop (module docstring). The teacher is an EMA copy of the student's
    encoder and projector (`teacher.momentum`, cosine-scheduled to 1)."""

    Config = PartWholeConfig

    def __init__(self, config: PartWholeConfig, context: ObjectiveContext) -> None:
        super().__init__(config, context)
        self.heads = PartWhole(context.proj_dim)
        self.teacher = EMATeacher(context.student())
        if config.parts == "shared":  # an octant cell of the encoder's coarsest map -> an octant embedding
            self.cell_head = _mlp(context.student()["encoder"].embed_dim, 2 * context.proj_dim, context.proj_dim)

    def forward(self, step: VolumeStep) -> dict[str, torch.Tensor]:
        whole = step.batch["a"]
        n, size = whole.shape[0], whole.shape[2:]
        teacher = self.teacher.module
        if self.config.parts == "isolated":
            parts = F.interpolate(octants(whole), size=size, mode="trilinear", align_corners=False)
            _, z_parts = step.embed(parts)
            with torch.no_grad():
                t_whole = teacher["projector"](grid_pool(teacher["encoder"](whole)[-1]))
                t_parts = teacher["projector"](grid_pool(teacher["encoder"](parts)[-1]))
            out = self.heads(z_parts.view(n, N_PARTS, -1), step.view("a"), t_parts.view(n, N_PARTS, -1), t_whole)
        else:  # the octant to see alone: drawn for the global batch, this rank's rows kept
            index = local_part(torch.randint(N_PARTS, (n * step.ctx.world_size,), generator=step.generator,
                                             device=step.generator.device), step.ctx).to(whole.device)
            alone = F.interpolate(octants(whole)[torch.arange(n, device=whole.device) * N_PARTS + index], size=size,
                                  mode="trilinear", align_corners=False)
            with torch.no_grad():  # one encoder pass; the projector's batch statistics per kind, as "isolated"
                pooled = grid_pool(teacher["encoder"](torch.cat([whole, alone]))[-1])
                t_whole, t_part = (teacher["projector"](rows) for rows in pooled.split(n))
            z_parts = self.cell_head(step.octant_cells("a"))
            out = self.heads(z_parts, step.view("a"), t_part, t_whole, part_index=index)
        return {f"part_whole.{k}": v for k, v in out.items()}

    def after_step(self, step: int, context: ObjectiveContext) -> None:
        self.teacher.update(context.student(), ema_momentum(step, context.total_steps, base=context.teacher_momentum))
