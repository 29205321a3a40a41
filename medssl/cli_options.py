"""Option and argument types shared by the `medssl` command line and its `bench` sub-app."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help=(
    "YAML config file, or the name of a shipped config (`medssl config list`; `medssl config show NAME` prints "
    "one to start from)."))]
RunDirOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (default: runs/<task>).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", metavar="",  # a flag: no <bool> in the help
                                         help="Continue from RUN_DIR/checkpoints/last.pt.")]
PretrainedOpt = Annotated[Optional[Path], typer.Option("--pretrained", help="Pretrained medssl checkpoint.")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help=(
    "Config overrides: dotted.key=value ... (the keys are those of the -c config: `medssl config show NAME`; "
    "e.g. train.steps=20 data.crop_size=[32,32,32]). Threads: `medssl --threads N ...` or OMP_NUM_THREADS."))]
