"""torch.distributed set-up for torchrun: one process per device, gloo on CPU, NCCL on GPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from medssl.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistContext:
    """Initialise the process group when torchrun set WORLD_SIZE > 1; pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def wait_for_all(ctx: DistContext) -> None:
    """A barrier: every rank waits here until all arrive (nothing without a process group)."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def main_first(fn: Callable[[], T], ctx: DistContext) -> T:
    """`fn()` on rank 0 first, then on every other node's first process, then on the remaining ranks (e.g.
    building an on-disk store that later ranks open); a UserError on any rank is raised on every rank."""
    if not ctx.distributed:
        return fn()
    turn_of_mine = 0 if ctx.rank == 0 else 1 if ctx.local_rank == 0 else 2
    result = None
    for turn in range(3):
        error = None
        if turn == turn_of_mine:
            try:
                result = fn()
            except UserError as err:
                error = str(err)
        raise_on_every_rank(error, ctx)
    return result  # type: ignore[return-value]


def raise_on_every_rank(error: str | None, ctx: DistContext) -> None:
    """A barrier that shares failures: every rank passes its UserError message (None: none), and the first one
    found is raised as a UserError on every rank, so no rank waits forever for one that failed."""
    if not ctx.distributed:
        if error:
            raise UserError(error)
        return
    errors: list[str | None] = [None] * ctx.world_size
    dist.all_gather_object(errors, error)
    first = next((message for message in errors if message), None)
    if first:
        raise UserError(first)


def mean_across_ranks(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Average scalar metrics over all ranks (identity when not distributed)."""
    if not ctx.distributed or not values:
        return values
    keys = sorted(values)
    tensor = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return dict(zip(keys, (tensor / ctx.world_size).tolist()))


def _all_gather(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return tuple(parts)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's rows (lightly's
    `gather_distributed` does the same): a loss on the gathered rows trains every rank's encoder."""

    @staticmethod
    def forward(_ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _all_gather(x)

    @staticmethod
    def backward(_ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def gather_rows(x: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Every rank's rows, rank-major: (N, ...) on each of the W ranks -> (W*N, ...), the same on every rank.

    The gradient reaches the local rows (from every rank's loss) when x requires it; N must be equal on
    all ranks. Identity when not distributed."""
    if not ctx.distributed:
        return x
    return torch.cat(_GatherWithGrad.apply(x) if x.requires_grad else _all_gather(x))


def local_rows(n_local: int, rank: int) -> slice:
    """Rank `rank`'s rows in a rank-major global batch of `n_local` rows per rank."""
    return slice(rank * n_local, (rank + 1) * n_local)


def local_part(x: torch.Tensor, ctx: DistContext, groups: int = 1) -> torch.Tensor:
    """This rank's rows of something drawn for the global batch: x (groups * W * n, ...), group-major then
    rank-major (e.g. the two views of every rank's windows) -> (groups * n, ...). A view in one process."""
    return x.reshape(groups, ctx.world_size, -1, *x.shape[1:])[:, ctx.rank].reshape(-1, *x.shape[1:])


def rank_seed(seed: int, ctx: DistContext) -> int:
    """The data seed of this rank where each rank draws its own batches (seed + 1000 x rank; rank 0: seed)."""
    return seed + 1000 * ctx.rank
