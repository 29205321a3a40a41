"""The demo's lanes: steps in two worker processes, each after the steps it needs, output to its log, errors raised."""

import time
from pathlib import Path

import pytest

from medssl.demo import Step, run_steps
from medssl.errors import UserError


def _timed(seconds: float, value: int) -> dict:
    print(f"working on {value}")
    start = time.time()
    time.sleep(seconds)
    return {"value": value, "start": start, "end": time.time()}


def _broken() -> dict:
    raise UserError("hospital/manifest.json: no test study with a lesion to ground")


def test_steps_run_in_two_lanes_after_what_they_need(tmp_path: Path) -> None:
    steps = [Step("slow", "the slow one", _timed, (1.5, 1)), Step("quick", "the quick one", _timed, (0.1, 2)),
             Step("later", "needs the slow one", _timed, (0.1, 3), ("slow",))]
    results = run_steps(steps, 2, tmp_path / "logs")
    assert [results[k]["value"] for k in ("slow", "quick", "later")] == [1, 2, 3]
    assert results["quick"]["start"] < results["slow"]["end"]  # two lanes at once
    assert results["later"]["start"] >= results["slow"]["end"]  # after what it needs, although a lane was free
    assert all(results[k]["seconds"] > 0 for k in results)
    assert (tmp_path / "logs" / "quick.log").read_text(encoding="utf-8") == "working on 2\n"
    alone = run_steps(steps[1:2], 1, tmp_path / "unused")
    assert alone["quick"]["value"] == 2 and not (tmp_path / "unused").exists()


def test_a_failing_step_raises_its_error_and_a_step_that_cannot_run_is_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no test study with a lesion to ground"):
        run_steps([Step("bad", "fails", _broken), Step("fine", "works", _timed, (0.1, 1))], 2, tmp_path / "logs")
    with pytest.raises(ValueError, match="never run"):
        run_steps([Step("orphan", "waits for nothing that exists", _timed, (0.1, 1), ("missing",))], 2, tmp_path)
