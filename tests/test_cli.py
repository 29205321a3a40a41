"""The command line: every command has --help; user errors exit 2 with one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.cli import main

REPO = Path(__file__).resolve().parents[1]

COMMANDS = [
    ["synth"], ["manifest", "check"], ["manifest", "build"], ["pretrain", "volume"], ["pretrain", "timeseries"],
    ["finetune", "seg"], ["eval", "timeseries"], ["ground", "train"], ["ground", "infer"], ["bench"], ["demo"],
    ["app"],
]


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """Run `medssl argv` in-process; return (exit code, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    assert "Usage" in out


@pytest.mark.parametrize("command, issue", [(["finetune", "seg"], "#5")])
def test_unbuilt_commands_say_so_and_exit_2(command: list[str], issue: str, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run([*command, "-c", str(REPO / "configs" / f"{command[0]}_{command[1]}.yaml")], capsys)
    assert code == 2
    assert "not implemented yet" in err and issue in err
    assert err.count("\n") == 1


def test_config_errors_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["pretrain", "volume", "-c", str(REPO / "configs" / "pretrain_volume.yaml"),
                        "train.steps=-3"], capsys)
    assert code == 2 and "train.steps" in err and "Traceback" not in err
    code, _, err = run(["pretrain", "volume", "-c", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml: config file not found" in err


def test_console_script_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "medssl", "manifest", "check", str(tmp_path / "none.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "none.json" in proc.stderr
