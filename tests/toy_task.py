"""A tiny regression task that trains through the shared loop (used by the trainer tests and the
2-process DDP test run under torchrun)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from medssl.config import TrainConfig
from medssl.seeding import torch_generator
from medssl.training.distributed import init_distributed, shutdown_distributed
from medssl.training.loop import Checkpointing, StepOutput, Trainer
from medssl.training.rundir import RunDir

TRUE_W = torch.tensor([[1.5, -2.0, 0.5, 3.0]])


class RegressionBatches(Dataset):
    """Micro-batch i: 8 inputs (8, 4) and targets (8, 1), drawn from (seed, i, rank)."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = seed, rank

    def __len__(self) -> int:
        return 10**9

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch_generator(self.seed, i, self.rank)
        x = torch.randn(8, 4, generator=g)
        return {"x": x, "y": x @ TRUE_W.T + 0.01 * torch.randn(8, 1, generator=g)}


def objective(model: nn.Module, batch: dict, generator: torch.Generator) -> StepOutput:
    noise = 0.01 * torch.randn(batch["x"].shape, generator=generator, device=batch["x"].device)
    pred = model(batch["x"] + noise)
    mse = ((pred - batch["y"]) ** 2).mean()
    l1 = (pred - batch["y"]).abs().mean()
    return StepOutput(loss=mse + 0.1 * l1, terms={"mse": mse, "l1": l1}, items=len(pred), embeddings=batch["x"])


def make_trainer(run: Path, steps: int, *, width: int = 4, seed: int = 0, ctx=None, groups=None, freeze=None,
                 **train) -> Trainer:
    """The toy trainer; `groups(model)` / `freeze(model)` give its param groups / Freeze; `train` overrides
    TrainConfig fields."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, width), nn.Linear(width, 1))
    config = TrainConfig(**{"steps": steps, "batch_size": 8, "seed": seed, "lr": 0.05, "warmup_steps": 2,
                            "log_every": 1, "checkpoint_every": 2, **train})
    kwargs = {} if ctx is None else {"ctx": ctx}
    if groups is not None:
        kwargs["param_groups"] = groups(model)
    if freeze is not None:
        kwargs["freeze"] = freeze(model)
    return Trainer(model, objective, RegressionBatches(seed, 0 if ctx is None else ctx.rank), config=config,
                   run_dir=RunDir(run, enabled=ctx is None or ctx.is_main),
                   checkpointing=Checkpointing(kind="toy", arch={"width": width}, preprocessing={}, config={}),
                   **kwargs)


if __name__ == "__main__":  # torchrun --nproc_per_node 2 tests/toy_task.py RUN_DIR
    ctx = init_distributed()
    trainer = make_trainer(Path(sys.argv[1]), steps=6, ctx=ctx)
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    torch.save(flat, Path(sys.argv[1]) / f"params_rank{ctx.rank}.pt")
    shutdown_distributed()
