"""The command line: every command has --help; user errors exit 2 with one line, no traceback."""

from __future__ import annotations

import json
import os
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
    ["app"], ["bench", "data"], ["bench", "pretrain-volume"], ["bench", "volume-probe"], ["bench", "ts-throughput"],
    ["bench", "ts-label-efficiency"], ["bench", "label-efficiency"], ["bench", "seg-inference"],
    ["config", "list"], ["config", "show"], ["bench", "grounding"], ["bench", "grounding-speed"],
    ["bench", "threads"], ["bench", "app"], ["preprocess"], ["match"], ["bench", "correspondence"],
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


def test_app_without_a_folder_says_what_to_give_and_exits_2(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["app"], capsys)
    assert code == 2
    assert "give a run directory (medssl app RUN_DIR) or a data folder (--data-root DIR)" in err
    assert err.count("\n") == 1


def test_config_errors_exit_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(["pretrain", "volume", "-c", str(REPO / "configs" / "pretrain_volume.yaml"),
                        "train.steps=-3"], capsys)
    assert code == 2 and "train.steps" in err and "Traceback" not in err
    code, _, err = run(["pretrain", "volume", "-c", str(tmp_path / "missing.yaml")], capsys)
    assert code == 2 and "missing.yaml: config file not found" in err


def test_shipped_configs_are_found_by_name_from_any_folder(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(["config", "show", "grounding"], capsys)
    assert code == 0 and out == (REPO / "medssl" / "configs" / "grounding.yaml").read_text(encoding="utf-8")
    code, out, _ = run(["config", "list"], capsys)
    assert code == 0 and "pretrain_volume_tiny" in out
    for name in ("pretrain_volume_tiny", "configs/pretrain_volume_tiny.yaml"):  # resolved, then the manifest
        code, _, err = run(["pretrain", "volume", "-c", name, "data.manifest=m.json"], capsys)
        assert code == 2 and err == f"error: {tmp_path / 'm.json'}: no such manifest file\n"
    code, _, err = run(["pretrain", "volume", "-c", "pretrain_volme"], capsys)
    assert code == 2 and "pretrain_volme: config file not found, and not the name of a shipped config (" in err
    assert not list(tmp_path.iterdir())


def test_console_script_exits_2_without_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "medssl", "manifest", "check", str(tmp_path / "none.json")],
                          capture_output=True, encoding="utf-8", errors="replace", cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "none.json" in proc.stderr


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "hospital"
    main_ok = subprocess.run([sys.executable, "-m", "medssl", "synth", str(out), "--patients", "6", "--size", "48",
                              "--seed", "3"], capture_output=True, encoding="utf-8", errors="replace")
    assert main_ok.returncode == 0, main_ok.stderr
    return out


def test_synth_then_check_exits_0_and_volumes_open_in_nibabel(hospital: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(["manifest", "check", str(hospital / "manifest.json")], capsys)
    assert code == 0 and out.strip().endswith(": ok")
    manifest = json.loads((hospital / "manifest.json").read_text())
    patients = {e["patient_id"] for split in ("training", "validation", "test") for e in manifest[split]}
    assert len(patients) == 6
    entry = manifest["training"][0]
    image, label = nib.load(hospital / entry["image"]), nib.load(hospital / entry["label"])
    assert image.shape == label.shape == (48, 48, 48)
    assert np.allclose(image.affine, label.affine) and np.allclose(np.diag(image.affine)[:3], 400 / 48)
    assert set(np.unique(np.asarray(label.dataobj))) == set(range(10))


def test_check_names_missing_corrupt_and_leaking_patient(hospital: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    manifest = json.loads((hospital / "manifest.json").read_text())
    for split in ("training", "validation", "test"):
        for entry in manifest[split]:
            for key in ("image", "label", "lesion_mask"):
                entry[key] = str(hospital / entry[key])
            for ref in entry["signals"]:
                ref["path"] = str(hospital / ref["path"])
    corrupt = tmp_path / "corrupt.nii.gz"
    data = Path(manifest["training"][1]["image"]).read_bytes()
    corrupt.write_bytes(data[: len(data) // 2])
    manifest["training"][0]["image"] = str(tmp_path / "missing.nii.gz")
    manifest["training"][1]["image"] = str(corrupt)
    leaked = manifest["test"][0]["patient_id"]
    manifest["training"][2]["patient_id"] = leaked
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(manifest))
    code, _, err = run(["manifest", "check", str(bad)], capsys)
    assert code == 2
    assert "missing.nii.gz" in err and "corrupt.nii.gz" in err and leaked in err
    assert "Traceback" not in err


def test_manifest_build_cli_roundtrip(hospital: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "built.json"
    code, stdout, _ = run(["manifest", "build", str(hospital), "-o", str(out), "--seed", "1"], capsys)
    assert code == 0 and "wrote" in stdout
    code, _, _ = run(["manifest", "check", str(out)], capsys)
    assert code == 0


def test_threads_default_respects_omp_and_leaves_busy_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from medssl import threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(None) is None and threads.choose_threads(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert threads.choose_threads(None) == 1  # one core busy with another job
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert threads.choose_threads(None) == 2
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert threads.choose_threads(None) == 1


def test_thread_benchmark_runs_every_setting_as_concurrent_jobs(tmp_path: Path) -> None:
    from medssl.bench.threads import SETTINGS, thread_benchmark

    rows = thread_benchmark(tmp_path, steps=2)
    assert [(r["setting"], r["jobs"]) for r in rows] == [(name, jobs) for name, jobs, _ in SETTINGS]
    assert all(r["items_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "threads.json").read_text())["rows"] == rows


@pytest.mark.parametrize("tolerant", [False, True])
def test_tables_print_on_an_ascii_terminal(tolerant: bool) -> None:
    """C locale without UTF-8 mode: stdout is ASCII; the CLI prints '?' for the bench tables' '±'."""
    code = ("from medssl.cli import tolerant_output\n" + ("tolerant_output()\n" if tolerant else "") +
            "from medssl.bench.report import print_table\nprint_table('dice', ['seeds'], [['80.1 \\u00b1 2.0']])")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONIOENCODING", "PYTHONUTF8")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**env, "LC_ALL": "C",
                            "PYTHONUTF8": "0"}, timeout=120)
    if tolerant:
        assert result.returncode == 0 and b"80.1 ? 2.0" in result.stdout, result.stderr
    else:  # what the CLI's call prevents
        assert result.returncode != 0 and b"UnicodeEncodeError" in result.stderr


_LIGHT_COMMANDS = """
import json, os, sys
import typer
from medssl.cli import app, main

def paths(command, prefix):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, [*prefix, name])

argvs = [[*p, "--help"] for p in paths(typer.main.get_command(app), [])] + json.loads(sys.argv[1])
codes = []
for argv in argvs:
    try:
        main(argv)
        codes.append(0)
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({"commands": len(argvs), "codes": codes, "env": "OMP_NUM_THREADS" in os.environ,
                  "heavy": [m for m in ("torch", "monai", "scipy", "SimpleITK", "wfdb") if m in sys.modules]}))
"""


def test_commands_that_do_not_train_do_not_import_torch(tmp_path: Path) -> None:
    """Start-up stays light: every command's --help, `config list/show` and refused input (a bad option, a
    missing config, a malformed override) import neither torch nor the data libraries, and put no thread count in
    the environment (it would reach child processes such as the app's Streamlit server)."""
    refused = [["synth", str(tmp_path / "x"), "--patients", "0"], ["pretrain", "volume", "-c", "missing.yaml"],
               ["finetune", "seg", "-c", "finetune_seg", "train.steps"], ["bench", "seg-inference", "--size", "0"],
               ["--threads", "2", "config", "list"], ["config", "show", "pretrain_volume"]]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the default thread choice runs too
    done = subprocess.run([sys.executable, "-c", _LIGHT_COMMANDS, json.dumps(refused)], capture_output=True,
                          encoding="utf-8", env=env, cwd=tmp_path, timeout=300)
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["commands"] >= len(COMMANDS) + len(refused), result
    assert result["codes"][-len(refused):] == [2, 2, 2, 2, 0, 0], done.stderr[-2000:]
    assert result["heavy"] == [] and not result["env"], result


@pytest.mark.parametrize("threads", [1, 2])
def test_the_thread_option_reaches_torch_when_a_command_imports_it(threads: int) -> None:
    code = ("import sys\nfrom medssl.cli import main\nmain(['--threads', sys.argv[1], 'config', 'list'])\n"
            "assert 'torch' not in sys.modules\nimport torch.nn\nprint(torch.get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "3"}  # --threads wins over the environment
    done = subprocess.run([sys.executable, "-c", code, str(threads)], capture_output=True, encoding="utf-8",
                          env=env, timeout=300)
    assert done.stdout.split()[-1] == str(threads), done.stderr[-2000:]


def test_threads_are_set_at_once_when_torch_is_already_imported() -> None:
    import torch

    from medssl import threads

    before = torch.get_num_threads()
    try:
        threads.set_torch_threads(2)
        assert torch.get_num_threads() == 2 and not any(
            isinstance(f, threads._SetThreadsOnImport) for f in sys.meta_path)
        threads.pin_figure_threads()
        assert torch.get_num_threads() == threads.FIGURE_THREADS == 1
    finally:
        torch.set_num_threads(before)
