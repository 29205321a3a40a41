"""The shared training loop: learning, logging, run directory, checkpoint/resume, DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from medssl.errors import UserError
from medssl.training.checkpoint import arch_differences, load_checkpoint, load_weights
from medssl.training.loop import Freeze, ParamGroup, warmup_cosine
from medssl.training.monitor import collapse_metrics
from medssl.training.rundir import prepare_run_dir

sys.path.insert(0, str(Path(__file__).parent))
from toy_task import RegressionBatches, make_trainer  # noqa: E402


def test_loss_goes_down_and_run_dir_is_complete(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=30).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert {"loss", "mse", "l1", "lr", "items_per_s", "grad_norm", "embedding_std", "effective_rank"} <= set(records[0])
    assert records[-1]["loss"] < 0.2 * records[0]["loss"]
    assert records[-1]["lr"] < records[5]["lr"]  # cosine decay
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["final_loss"] == pytest.approx(records[-1]["loss"])
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt", kind="toy")
    assert ckpt["step"] == 30 and ckpt["arch"] == {"width": 4} and "torch" in ckpt["versions"]


def test_resume_reproduces_an_uninterrupted_run(tmp_path: Path) -> None:
    make_trainer(tmp_path / "full", steps=8).fit()
    killed = make_trainer(tmp_path / "cut", steps=8)  # checkpoints every 2 steps
    objective = killed.objective

    def dies_in_step_6(model, batch, generator):
        if killed.step == 5:  # step 5 is logged, its checkpoint never written
            raise KeyboardInterrupt
        return objective(model, batch, generator)

    killed.objective = dies_in_step_6
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    assert load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")["step"] == 4
    # the stopped run is marked failed: a fresh run into it is refused, a resume is offered
    assert (tmp_path / "cut" / "FAILED").read_text() == "stopped at step 5: interrupted\n"
    with pytest.raises(UserError, match=r"cut: a failed run \(stopped at step 5: interrupted\); --resume continues"):
        prepare_run_dir(tmp_path / "cut", resume=False)
    prepare_run_dir(tmp_path / "cut", resume=True)
    resumed = make_trainer(tmp_path / "cut", steps=8)
    resumed.resume()
    resumed.fit()
    assert not (tmp_path / "cut" / "FAILED").exists()
    full = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    cut = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in cut] == list(range(1, 9))
    for a, b in zip(full, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-7)
        assert a["lr"] == pytest.approx(b["lr"])


def test_resume_refuses_other_architecture_and_missing_checkpoint(tmp_path: Path) -> None:
    make_trainer(tmp_path, steps=2).fit()
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(UserError) as info:
        make_trainer(tmp_path, steps=4, width=8).resume()
    assert str(info.value).endswith("the checkpoint's architecture differs from the config's: width: 4 in the "
                                    "checkpoint, 8 in the config")
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    with pytest.raises(UserError, match="no checkpoint to resume"):
        prepare_run_dir(tmp_path / "new", resume=True)
    with pytest.raises(UserError, match="not empty"):
        prepare_run_dir(tmp_path, resume=False)


def test_architecture_differences_name_only_the_differing_config_keys_with_both_values() -> None:
    config = {"model": {"width": 16, "name": "basicunet"}, "views": {"feature_stride": 2}}
    stored = {"encoder": {"name": "basicunet", "width": 8, "depth": 4}, "feature_stride": 2, "objectives": ["crop"],
              "tokenizer": "x" * 5000}
    ours = {"encoder": {"name": "basicunet", "width": 16, "depth": 4}, "feature_stride": 4,
            "objectives": ["crop", "voxel"], "tokenizer": "y" * 5000}
    assert arch_differences(stored, ours, config=config) == (
        "model.width: 8 in the checkpoint, 16 in the config; views.feature_stride: 2 in the checkpoint, 4 in the "
        "config; objectives: ['crop'] in the checkpoint, ['crop', 'voxel'] in the config; tokenizer: <a str of 5000 "
        "characters> in the checkpoint, <a str of 5000 characters> in the config")
    assert arch_differences({"width": 4, "depth": 2}, {"width": 8, "depth": 2}, config=config) == (
        "model.width: 4 in the checkpoint, 8 in the config")  # a flat architecture: the config's model section
    assert arch_differences({"a": 1, "b": 2, "c": 3}, {}, limit=2) == (
        "a: 1 in the checkpoint, (absent) in the config; b: 2 in the checkpoint, (absent) in the config; and 1 more "
        "field(s)")


def test_load_weights_reports_and_refuses_partial_loads() -> None:
    source = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).state_dict()
    target = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    with pytest.raises(UserError, match="only 50% of the network"):
        load_weights(target, source, min_fraction=0.9, source="enc.pt")
    report = load_weights(target, {**source, "extra": torch.zeros(1)}, min_fraction=0.5)
    assert report.loaded == ["0.weight", "0.bias"] and report.mismatched == ["1.weight", "1.bias"]
    assert report.unexpected == ["extra"] and report.fraction == 0.5
    assert torch.equal(target[0].weight, source["0.weight"])


def test_corrupt_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(bad)


def test_warmup_cosine_and_collapse_metrics() -> None:
    assert warmup_cosine(0, warmup=4, total=10) == 0.25
    assert warmup_cosine(4, warmup=4, total=10) == 1.0
    assert warmup_cosine(10, warmup=4, total=10) == pytest.approx(0.0)
    healthy = collapse_metrics(torch.randn(256, 16, generator=torch.Generator().manual_seed(0)))
    collapsed = collapse_metrics(torch.ones(256, 16) + 1e-6 * torch.randn(256, 16))
    assert healthy["effective_rank"] > 12 and collapsed["embedding_std"] < 1e-3


def test_ddp_two_gloo_processes_stay_in_sync(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).parent / "toy_task.py"), str(tmp_path)],
                          capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    p0, p1 = (torch.load(tmp_path / f"params_rank{r}.pt") for r in (0, 1))
    assert torch.allclose(p0, p1)  # gradients were averaged across ranks
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))  # only rank 0 writes


def test_param_groups_train_at_their_own_learning_rate(tmp_path: Path) -> None:
    """Adam's first update of a parameter is lr x sign(gradient): each group moves by its own rate."""
    def groups(model: nn.Module) -> list[ParamGroup]:
        return [ParamGroup("first", list(model[0].parameters())),
                ParamGroup("second", list(model[1].parameters()), lr_scale=0.01)]

    trainer = make_trainer(tmp_path, steps=2, groups=groups, warmup_steps=0, weight_decay=0.0, clip_grad=None)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    after_first: list[torch.Tensor] = []
    trainer.after_step = lambda model, step: after_first.extend(
        [p.detach().clone() for p in model.parameters()] if step == 1 else [])
    trainer.fit()
    moved = [(a - b).abs() for a, b in zip(after_first, before)]
    lr = trainer.config.lr
    assert all(torch.allclose(m, torch.full_like(m, lr), rtol=1e-3) for m in moved[:2])
    assert all(torch.allclose(m, torch.full_like(m, lr * 0.01), rtol=1e-3) for m in moved[2:])
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])  # after step 1: cosine at 1/2
    assert record["lr.first"] == pytest.approx(lr / 2) and record["lr.second"] == pytest.approx(lr / 2 * 0.01)
    assert record["lr"] == record["lr.first"]


def test_freeze_keeps_a_module_still_for_n_steps_and_across_resume(tmp_path: Path) -> None:
    def first_layer(model: nn.Module) -> Freeze:
        return Freeze(model[0], steps=3)

    trainer = make_trainer(tmp_path, steps=2, freeze=first_layer)
    start = [p.detach().clone() for p in trainer.model[0].parameters()]
    trainer.fit()
    assert all(torch.equal(p, s) for p, s in zip(trainer.model[0].parameters(), start))  # steps 1-2 frozen
    assert all(p.requires_grad for p in trainer.model.parameters())  # trainable again once fit() ends
    resumed = make_trainer(tmp_path, steps=4, freeze=first_layer)
    resumed.resume()
    after_step_3 = []
    resumed.after_step = lambda model, step: after_step_3.extend(
        [p.detach().clone() for p in model[0].parameters()] if step == 3 else [])
    resumed.fit()
    assert all(torch.equal(p, s) for p, s in zip(after_step_3, start))  # step 3 still frozen after resume
    assert any(not torch.equal(p, s) for p, s in zip(resumed.model[0].parameters(), start))  # step 4 trained


class _CorruptThirdBatch(RegressionBatches):
    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i == 2:
            raise UserError("/data/scan.nii.gz: corrupt file")
        return super().__getitem__(i)


@pytest.mark.parametrize("workers", [0, 1])
def test_a_data_error_is_one_line_in_a_loader_worker_too(tmp_path: Path, workers: int) -> None:
    trainer = make_trainer(tmp_path / "run", steps=4, num_workers=workers)
    trainer.batches = _CorruptThirdBatch(0)
    with pytest.raises(UserError) as err:
        trainer.fit()
    where = " (in a data-loading worker)" if workers else ""
    assert str(err.value) == f"/data/scan.nii.gz: corrupt file{where}"  # no worker traceback in the message
    assert "stopped at step 2" in (tmp_path / "run" / "FAILED").read_text(encoding="utf-8")
