"""The shared training loop: AdamW, warm-up + cosine, accumulation, AMP, clipping, logging,
checkpoint/resume and DDP. Volume and signal pretraining (and the heads) all train through it.

A task hands the loop three things:
- `model`: the `nn.Module` that holds every trained parameter;
- `batches`: a map-style dataset whose item `i` is the whole micro-batch number `i`, drawn from
  generators seeded by (seed, i, rank). Batch `i` is the same whether the run was interrupted or
  not, which is what makes `--resume` reproduce an uninterrupted run;
- `objective(model, batch, generator) -> StepOutput`: the total loss, every named term, and
  optionally embeddings for the collapse monitor. Its randomness comes from `generator`, seeded by
  (seed, i, rank), or by (seed, i) on every rank with `generator_per_rank=False`: for objectives that
  draw for the global batch (every rank's rows) and keep their own, so that N processes reproduce one.

Optionally `param_groups` (`ParamGroup`s: a learning-rate scale and weight decay on or off per group;
default: weights with decay, biases and norm weights without) and `freeze` (`Freeze`: a module whose
parameters get no gradient for the first N optimiser steps). Every group's learning rate is logged
in metrics.jsonl as `lr.<group>`; `lr` is the first group's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from medssl.config import TrainConfig
from medssl.errors import UserError, one_line, without_worker_traceback
from medssl.seeding import torch_generator
from medssl.training.checkpoint import arch_differences, load_checkpoint, load_weights, save_checkpoint
from medssl.training.distributed import DistContext, mean_across_ranks
from medssl.training.monitor import collapse_metrics
from medssl.training.rundir import RunDir


@dataclass
class StepOutput:
    """What an objective returns for one micro-batch."""

    loss: torch.Tensor  # scalar, the total (weighted) loss
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # scalar terms, logged by name
    items: int = 0  # samples in the micro-batch, for throughput
    embeddings: torch.Tensor | None = None  # (N, D), for the collapse monitor


Objective = Callable[[nn.Module, Any, torch.Generator], StepOutput]
Evaluate = Callable[[nn.Module, int], dict[str, float]]
AfterStep = Callable[[nn.Module, int], None]


@dataclass
class Checkpointing:
    """What goes into every checkpoint besides the weights (../shared/DESIGN.md 3.3)."""

    kind: str  # e.g. "pretrain-volume"
    arch: dict[str, Any]
    preprocessing: dict[str, Any]
    config: dict[str, Any]


@dataclass
class ParamGroup:
    """Parameters that train at `lr_scale` x `train.lr` (times the schedule), with `train.weight_decay`
    or without weight decay."""

    name: str
    params: list[nn.Parameter]
    lr_scale: float = 1.0
    weight_decay: bool = True


@dataclass
class Freeze:
    """`module`'s parameters get no gradient (so AdamW leaves them untouched, weight decay included)
    for the first `steps` optimiser steps, also across --resume."""

    module: nn.Module
    steps: int

    def apply(self, step: int) -> None:
        """Set requires_grad for the state after `step` completed steps."""
        self.module.requires_grad_(step >= self.steps)


def default_param_groups(model: nn.Module) -> list[ParamGroup]:
    """The trainable parameters: weights (ndim > 1) with weight decay, biases and norm weights without."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [ParamGroup("decay", [p for p in trainable if p.ndim > 1]),
            ParamGroup("no_decay", [p for p in trainable if p.ndim <= 1], weight_decay=False)]


def warmup_cosine(step: int, *, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """Runs `config.steps` optimiser steps of `objective` on `batches`, writing to `run_dir`."""

    def __init__(self, model: nn.Module, objective: Objective, batches: Dataset, *, config: TrainConfig,
                 run_dir: RunDir, checkpointing: Checkpointing, ctx: DistContext = DistContext(),
                 evaluate: Evaluate | None = None, eval_every: int = 0, best_metric: str | None = None,
                 after_step: AfterStep | None = None, find_unused_parameters: bool = False,
                 param_groups: list[ParamGroup] | None = None, freeze: Freeze | None = None,
                 generator_per_rank: bool = True):
        self.config = config
        self.ctx = ctx
        self.run_dir = run_dir
        self.checkpointing = checkpointing
        self.objective = objective
        self.batches = batches
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.best_metric = best_metric
        self.best_value = -math.inf
        self.after_step = after_step  # e.g. an EMA teacher update, called with (model, completed steps)
        self.model = model.to(ctx.device)
        self.freeze = freeze
        self.generator_per_rank = generator_per_rank
        # find_unused_parameters: for models with blocks no active objective reaches (SwinUNETR's side blocks)
        # and for frozen parameters (no gradient while frozen)
        self.trained = (DistributedDataParallel(self.model, device_ids=[ctx.device.index] if ctx.device.type == "cuda"
                                                else None,
                                                find_unused_parameters=find_unused_parameters or freeze is not None)
                        if ctx.distributed else self.model)
        groups = param_groups if param_groups is not None else default_param_groups(self.model)
        self.group_names = [group.name for group in groups]
        self.optimizer = torch.optim.AdamW(
            [{"params": group.params, "lr": config.lr * group.lr_scale,
              "weight_decay": config.weight_decay if group.weight_decay else 0.0} for group in groups], lr=config.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: warmup_cosine(s, warmup=config.warmup_steps, total=config.steps))
        self.step = 0

    # ------------------------------------------------------------------ checkpoint / resume

    def save(self, path) -> None:
        if not self.ctx.is_main:
            return
        save_checkpoint(path, kind=self.checkpointing.kind, step=self.step, model=self.model.state_dict(),
                        arch=self.checkpointing.arch, preprocessing=self.checkpointing.preprocessing,
                        config=self.checkpointing.config,
                        state={"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                               "torch_rng": torch.get_rng_state(), "best_value": self.best_value})

    def resume(self) -> None:
        """Load `last.pt`: weights, optimiser, schedule, RNG; the metrics log is cut back to its step."""
        path = self.run_dir.last_checkpoint
        payload = load_checkpoint(path, kind=self.checkpointing.kind)
        if payload["arch"] != self.checkpointing.arch:
            raise UserError(f"{path}: the checkpoint's architecture differs from the config's: " + arch_differences(
                payload["arch"], self.checkpointing.arch, config=self.checkpointing.config))
        report = load_weights(self.model, payload["model"], min_fraction=1.0, source=str(path))
        if report.unexpected:
            raise UserError(f"{path}: checkpoint has weights the model lacks: {', '.join(report.unexpected[:5])}")
        if payload["step"] >= self.config.steps:
            raise UserError(f"{path}: checkpoint is at step {payload['step']}, train.steps is {self.config.steps}: "
                            "nothing to resume (raise train.steps)")
        state = payload["state"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        self.best_value = state["best_value"]
        self.step = payload["step"]
        self.run_dir.truncate_metrics(self.step)

    # ------------------------------------------------------------------ the loop

    def fit(self, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train to `config.steps`; write and return summary.json: `steps`, the last logged metrics as
        `final_*`, `best_<metric>` when a best metric is tracked, plus `extra_summary`. A run that stops on
        an error or an interrupt is marked failed in its folder (`FAILED`, naming the step and the reason)
        until a resumed run completes."""
        try:
            summary = self._fit(extra_summary)
        except BaseException as err:
            reason = "interrupted" if isinstance(err, KeyboardInterrupt) else f"{type(err).__name__}: {one_line(err)}"
            self.run_dir.mark_failed(f"stopped at step {self.step}: {reason}")
            raise
        self.run_dir.clear_failed()
        return summary

    def _fit(self, extra_summary: dict[str, Any] | None) -> dict[str, Any]:
        cfg = self.config
        accum = cfg.grad_accum
        loader = DataLoader(self.batches, batch_size=None, sampler=range(self.step * accum, cfg.steps * accum),
                            num_workers=cfg.num_workers, pin_memory=self.ctx.device.type == "cuda",
                            persistent_workers=cfg.num_workers > 0, prefetch_factor=2 if cfg.num_workers else None)
        micro_batches = iter(loader)
        use_amp = cfg.amp and self.ctx.device.type == "cuda"
        window: dict[str, float] = {}
        window_steps, items, data_time, compute_time = 0, 0, 0.0, 0.0
        last: dict[str, float] = {}
        bar = tqdm(total=cfg.steps, initial=self.step, desc=self.checkpointing.kind, disable=not self.ctx.is_main,
                   dynamic_ncols=True)
        self.trained.train()
        if self.freeze is not None:
            self.freeze.apply(self.step)
        while self.step < cfg.steps:
            for micro in range(accum):
                tick = time.perf_counter()
                try:
                    batch = _to_device(next(micro_batches), self.ctx.device)
                except UserError as err:
                    raise without_worker_traceback(err) from None
                tock = time.perf_counter()
                generator = torch_generator(cfg.seed, self.step * accum + micro,
                                            self.ctx.rank if self.generator_per_rank else 0, device=self.ctx.device)
                with torch.autocast(device_type=self.ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
                    out = self.objective(self.trained, batch, generator)
                if not torch.isfinite(out.loss):
                    terms = ", ".join(f"{k}={float(v):.4g}" for k, v in out.terms.items())
                    raise UserError(f"train: non-finite loss at step {self.step + 1} ({terms}); "
                                    "lower train.lr or check the data for NaNs")
                (out.loss / accum).backward()
                data_time += tock - tick
                compute_time += time.perf_counter() - tock
                items += out.items
                for key, value in {"loss": out.loss, **out.terms}.items():
                    window[key] = window.get(key, 0.0) + float(value.detach()) / accum
            tick = time.perf_counter()
            if cfg.clip_grad is not None:
                grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_grad))
                window["grad_norm"] = window.get("grad_norm", 0.0) + grad_norm
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            if self.freeze is not None:
                self.freeze.apply(self.step)
            if self.after_step is not None:
                self.after_step(self.model, self.step)
            compute_time += time.perf_counter() - tick
            window_steps += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                metrics = {k: v / window_steps for k, v in window.items()}
                metrics = mean_across_ranks(metrics, self.ctx)
                rates = self.scheduler.get_last_lr()
                metrics["lr"] = rates[0]
                metrics.update({f"lr.{name}": rate for name, rate in zip(self.group_names, rates)})
                metrics["items_per_s"] = items * self.ctx.world_size / max(data_time + compute_time, 1e-9)
                metrics["data_time_fraction"] = data_time / max(data_time + compute_time, 1e-9)
                if out.embeddings is not None:
                    metrics.update(collapse_metrics(out.embeddings))
                metrics.update(self._maybe_evaluate(force=self.step == cfg.steps))
                self.run_dir.log(self.step, metrics)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                last = metrics
                window, window_steps, items, data_time, compute_time = {}, 0, 0, 0.0, 0.0
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps:
                self.save(self.run_dir.last_checkpoint)
        bar.close()
        if self.freeze is not None:
            self.freeze.module.requires_grad_(True)
        summary = {"steps": self.step, **{f"final_{k}": v for k, v in last.items()}, **(extra_summary or {})}
        if self.best_metric:
            summary[f"best_{self.best_metric}"] = self.best_value
        self.run_dir.write_summary(summary)
        self.run_dir.close()
        return summary

    def _maybe_evaluate(self, *, force: bool) -> dict[str, float]:
        if self.evaluate is None or not self.eval_every or not (force or self.step % self.eval_every == 0):
            return {}
        self.model.eval()
        with torch.no_grad():
            metrics = self.evaluate(self.model, self.step) if self.ctx.is_main else {}
        self.trained.train()
        if self.best_metric and self.best_metric in metrics and metrics[self.best_metric] > self.best_value:
            self.best_value = metrics[self.best_metric]
            self.save(self.run_dir.best_checkpoint)
        return metrics


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
