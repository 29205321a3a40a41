"""The `medssl` command line: parses arguments, loads configs, calls library functions, prints.

No training or data logic lives here. A `UserError` anywhere below becomes a one-line message on
stderr and exit code 2, without a traceback.

Start-up stays light (`medssl --help`, `config list`, a refused option: well under a second): this module
and `medssl/bench/cli.py` import only the standard library, typer and medssl's light modules (`cli_options`,
`config`, `errors`, `atomic`, `threads`: no torch, numpy or data library) at module level. Each command imports what
it runs inside its body, and reads its config first with
`load_config(path, "module:Schema", overrides)`, which imports the schema's module (and torch) only once the
file and the overrides have been read. `tests/test_cli.py` checks that no command's --help imports torch.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

try:  # typer >= 0.22 vendors click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on click
    import click.exceptions as click_errors

from medssl.atomic import unwritable
from medssl.bench.cli import bench_app
from medssl.cli_options import ConfigOpt, OverridesArg, PretrainedOpt, ResumeOpt, RunDirOpt
from medssl.config import load_config
from medssl.errors import UserError, one_line
from medssl.threads import pin_figure_threads, request_threads

app = typer.Typer(help="medssl: self-supervised pretraining on hospital data (3D volumes, physiological signals) "
                       "and the heads that use it. Every command has --help.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
manifest_app = typer.Typer(help="Build and check data manifests.", no_args_is_help=True)
pretrain_app = typer.Typer(help="Self-supervised pretraining.", no_args_is_help=True)
finetune_app = typer.Typer(help="Fine-tune downstream heads.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate pretrained encoders downstream.", no_args_is_help=True)
ground_app = typer.Typer(help="Report grounding: phrases located in the volume.", no_args_is_help=True)
config_app = typer.Typer(help="The configs shipped with medssl (`-c NAME` uses one).", no_args_is_help=True)
for sub, name in ((manifest_app, "manifest"), (pretrain_app, "pretrain"), (finetune_app, "finetune"),
                  (eval_app, "eval"), (ground_app, "ground"), (bench_app, "bench"), (config_app, "config")):
    app.add_typer(sub, name=name)



@app.callback()
def _threads(threads: Annotated[Optional[int], typer.Option(
        min=1, help="torch CPU threads (default: OMP_NUM_THREADS when set, else the cores the load average leaves "
                    "free, so that two jobs on one machine do not slow each other 3-20x). The demo and the benches "
                    "that print figures compute with 1 thread whatever this says, so that their figures "
                    "reproduce.")] = None) -> None:
    request_threads(threads)  # given to torch when a command imports it

# ---------------------------------------------------------------------------------------- data


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created; a previous cohort of the same kind is "
                                             "replaced).")],
    patients: Annotated[int, typer.Option(min=1, help="Number of patients (subjects).")] = 8,
    studies: Annotated[int, typer.Option(min=1, help="Studies (scans) per patient.")] = 2,
    size: Annotated[int, typer.Option(min=16, max=256, help="Volume edge length in voxels.")] = 64,
    seed: Annotated[int, typer.Option(min=0, help="Random seed; the output is deterministic per seed.")] = 0,
    trials: Annotated[Optional[int], typer.Option(min=1, help="hospital: signal recording sessions (trials) per "
                                                              "study [default: 2].")] = None,
    signal_seconds: Annotated[Optional[float], typer.Option(min=1.0, help="hospital: length of each signal trial "
                                                                          "in seconds [default: 20].")] = None,
    cohort: Annotated[str, typer.Option(help="hospital (CT torso, organ labels, lesions, reports, ECG/PPG) or mni152 "
                                             "(brain tissue MR from nilearn's MNI152 template).")] = "hospital",
    two_site: Annotated[Optional[bool], typer.Option("--two-site", help="hospital: add as many test patients "
                                                     "scanned at site B (contrast phase, low dose, soft kernel) as "
                                                     "the test split has at site A.")] = None,
    pool: Annotated[Optional[int], typer.Option(min=0, help="hospital: an unlabelled pool of N more patients "
                                                "(sites A and B in turn with --two-site), images only, in "
                                                "OUT/pool.json.")] = None,
) -> None:
    """Write a synthetic cohort with its manifest: the hospital or the MNI152 brain-tissue cohort."""
    from medssl.data.synthetic.cohorts import write_cohort

    options = {key: value for key, value in (("trials", trials), ("signal_seconds", signal_seconds),
                                             ("two_site", two_site), ("pool", pool)) if value is not None}
    manifest = write_cohort(cohort, out, patients=patients, studies=studies, size=size, seed=seed, progress=True,
                            **options)
    typer.echo(f"wrote {manifest}")


@manifest_app.command("check")
def manifest_check(
    manifest: Annotated[Path, typer.Argument(help="Manifest JSON file.")],
    min_signal_seconds: Annotated[float, typer.Option(help="Shortest acceptable signal in seconds.")] = 0.0,
) -> None:
    """Open every file of a manifest and report every problem found (exit 2 if any)."""
    from medssl.data.manifest_check import check_manifest

    problems = check_manifest(manifest, min_signal_seconds=min_signal_seconds, progress=True)
    if problems:
        for problem in problems:
            typer.echo(f"error: {problem}", err=True)
        raise UserError(f"{manifest}: {len(problems)} problem(s) found")
    typer.echo(f"{manifest}: ok")


@manifest_app.command("build")
def manifest_build(
    folder: Annotated[Path, typer.Argument(help="Folder of volumes, label maps, reports and signal records.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Manifest file to write.")],
    name: Annotated[Optional[str], typer.Option(help="Dataset name (default: the folder name).")] = None,
    modality: Annotated[str, typer.Option(help="Modality of the volumes (CT or MR).")] = "CT",
    val_fraction: Annotated[float, typer.Option(help="Fraction of patients for validation.")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Fraction of patients for test.")] = 0.2,
    seed: Annotated[int, typer.Option(help="Seed of the patient split.")] = 0,
) -> None:
    """Scan a folder into a manifest, pairing files by name, with patient-independent splits."""
    from medssl.data.manifest import write_manifest
    from medssl.data.manifest_build import build_manifest

    if output.is_dir():
        raise UserError(f"{output}: is a folder; -o names the manifest file to write (e.g. {output / 'manifest.json'})")
    manifest, warnings = build_manifest(folder, name=name, modality=modality, val_fraction=val_fraction,
                                        test_fraction=test_fraction, seed=seed)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    write_manifest(manifest, output)
    counts = ", ".join(f"{split} {len(manifest[split])}" for split in ("training", "validation", "test"))
    typer.echo(f"wrote {output} ({counts})")


@app.command("preprocess")
def preprocess_command(
    config: ConfigOpt, overrides: OverridesArg = None,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help=(
        "Processes preprocessing scans in parallel (default: the machine's cores)."))] = None,
) -> None:
    """Write the preprocessed store named by the config's data.store for every volume of its manifest (resumable:
    run it again after a stop, or after the manifest changed, and it does only what is missing)."""
    from medssl.data.store import PreprocessConfig, preprocess_data
    from medssl.threads import available_cores

    data = load_config(config, PreprocessConfig, overrides).data
    summary = preprocess_data(data, workers=workers or available_cores())
    typer.echo(f"store {summary['store']}: {summary['scans']} scans ({summary['written']} written, "
               f"{summary['kept']} already there)")


# ---------------------------------------------------------------------------------------- training


def _print_summary(run_dir: Path, summary: dict) -> None:
    """The run's summary as a two-column table (every value of summary.json but its warnings, which were
    printed as they arose)."""
    if not summary:  # a non-main rank of a distributed run
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{run_dir / 'summary.json'}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", overflow="fold")
    for key in sorted(k for k in summary if k != "warnings"):
        value = summary[key]
        table.add_row(key, f"{value:.4g}" if isinstance(value, float) else str(value))
    Console().print(table)
    typer.echo(f"run directory: {run_dir}")


@pretrain_app.command("volume")
def pretrain_volume_command(config: ConfigOpt, output: RunDirOpt = None, resume: ResumeOpt = False,
                            overrides: OverridesArg = None) -> None:
    """Pretrain a 3D encoder on unlabeled volumes (anatomical consistency, multi-level contrast)."""
    cfg = load_config(config, "medssl.pretrain.volume:PretrainVolumeConfig", overrides)
    from medssl.pretrain.volume import pretrain_volume

    run_dir = output or Path("runs/pretrain_volume")
    _print_summary(run_dir, pretrain_volume(cfg, run_dir, resume=resume))


@pretrain_app.command("timeseries")
def pretrain_timeseries_command(config: ConfigOpt, output: RunDirOpt = None, resume: ResumeOpt = False,
                                overrides: OverridesArg = None) -> None:
    """Pretrain a signal encoder with four-level hierarchical contrast (observation, sample, trial, patient)."""
    cfg = load_config(config, "medssl.pretrain.timeseries:PretrainTimeseriesConfig", overrides)
    from medssl.pretrain.timeseries import pretrain_timeseries

    run_dir = output or Path("runs/pretrain_timeseries")
    _print_summary(run_dir, pretrain_timeseries(cfg, run_dir, resume=resume))


@finetune_app.command("seg")
def finetune_seg_command(config: ConfigOpt, pretrained: PretrainedOpt = None, output: RunDirOpt = None,
                         resume: ResumeOpt = False, overrides: OverridesArg = None) -> None:
    """Fine-tune a 3D segmentation network, from scratch or from a pretrained encoder."""
    cfg = load_config(config, "medssl.downstream.segmentation.config:FinetuneSegConfig", overrides)
    from medssl.downstream.segmentation.task import finetune_seg

    run_dir = output or Path("runs/finetune_seg")
    _print_summary(run_dir, finetune_seg(cfg, run_dir, pretrained=pretrained, resume=resume))


_NO_EVAL_RESUME = ("no --resume: an evaluation is short (the probes take seconds; each fine-tuning is train.steps "
                   "steps, 100 in the shipped config); rerun it into a new or empty -o folder")


@eval_app.command("timeseries", help="Classify signals with a linear probe and fine-tuning at label fractions drawn "
                                     f"per patient.\n\nIt has {_NO_EVAL_RESUME}.")
def eval_timeseries_command(config: ConfigOpt, pretrained: PretrainedOpt = None, output: RunDirOpt = None,
                            overrides: OverridesArg = None,
                            resume: Annotated[bool, typer.Option("--resume", hidden=True)] = False) -> None:
    if resume:
        raise UserError(f"eval timeseries has {_NO_EVAL_RESUME}")
    cfg = load_config(config, "medssl.downstream.ts_classification:EvalTimeseriesConfig", overrides)
    from medssl.downstream.ts_classification import eval_timeseries

    eval_timeseries(cfg, output or Path("runs/eval_timeseries"), pretrained=pretrained)


@ground_app.command("train")
def ground_train_command(
    config: ConfigOpt, pretrained: PretrainedOpt = None, output: RunDirOpt = None, resume: ResumeOpt = False,
    organs: Annotated[Optional[Path], typer.Option(
        "--organs", help="Organ head: a 'finetune seg' run folder or checkpoint of the manifest's labels (default: "
                         "fine-tune one into RUN/organs from --pretrained).")] = None,
    overrides: OverridesArg = None,
) -> None:
    """Train report grounding: the organ head (where) and a finding scorer from reports (what); writes
    grounding.pt, its calibration and evaluation."""
    cfg = load_config(config, "medssl.downstream.grounding.config:GroundingConfig", overrides)
    from medssl.downstream.grounding.task import ground_train

    run_dir = output or Path("runs/grounding")
    _print_summary(run_dir, ground_train(cfg, run_dir, pretrained=pretrained, organs=organs, resume=resume))


@ground_app.command("infer")
def ground_infer_command(
    checkpoint: Annotated[Path, typer.Option(help="Grounding model (RUN/grounding.pt).")],
    image: Annotated[Path, typer.Option(help="Input volume: NIfTI, NRRD/MHA or a DICOM series folder.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (new or empty): maps and "
                                                                 "results.json.")],
    text: Annotated[Optional[str], typer.Option(help="One phrase to ground.")] = None,
    report: Annotated[Optional[Path], typer.Option(help="A report (UTF-8 text): every statement of its "
                                                        "findings.")] = None,
    modality: Annotated[Optional[str], typer.Option(help="The volume's modality, CT or MR (default: the "
                                                         "checkpoint's; another one is refused).")] = None,
) -> None:
    """Ground a phrase or a whole report in one volume: a 3D map per groundable phrase, in the volume's space."""
    from medssl.downstream.grounding.infer import Grounder, read_report, write_results
    from medssl.text.query import check_phrase

    if (text is None) == (report is None):
        raise UserError("give exactly one of --text PHRASE or --report FILE")
    if modality is not None and modality.upper() not in ("CT", "MR"):
        raise UserError(f"--modality: {modality!r} is not one of CT, MR")
    phrases = [check_phrase(text, '--text')] if text is not None else read_report(report)
    grounder = Grounder.load(checkpoint)
    if text is not None:  # a bad phrase is refused before the volume is read
        grounder.check_query(grounder.query(text))
    grounded = grounder.prepare(image, modality=modality)
    results = grounder.ground(grounded, phrases, strict=text is not None)
    for note in grounded.warnings + [w for r in results for w in r.warnings]:
        typer.echo(f"warning: {note}", err=True)
    listing = write_results(grounder, grounded, results, output)
    for row in listing:
        where = f"peak {tuple(round(v, 1) for v in row['peak_mm'])} mm -> {row['map']}" if row["groundable"] else (
            f"not groundable: {row['reason']}")
        typer.echo(f"{row['phrase']!r}: score {row['score']:.3f}, {where}")
    typer.echo(f"wrote {output}")


# ---------------------------------------------------------------------------------------- tools


@app.command("match")
def match_command(
    encoder: Annotated[str, typer.Option(help="Encoder checkpoint (RUN/encoder.pt, network.pt or a pretraining "
                                              "checkpoint), or 'none' for the geometric baseline.")],
    source: Annotated[Path, typer.Option("--from", help="Scan the point is in.")],
    target: Annotated[Path, typer.Option("--to", help="Scan to find it in.")],
    point: Annotated[tuple[float, float, float], typer.Option(help="The point: X Y Z in RAS mm.")],
    baseline: Annotated[str, typer.Option(help="With --encoder none: registration (affine) or body_box.")] = (
        "registration"),
    prior: Annotated[Optional[str], typer.Option(help="With an encoder: search only within --radius of this "
                                                      "geometric matcher's answer (registration or body_box).")] = None,
    radius: Annotated[float, typer.Option(min=1.0, help="Search radius (mm) around the prior.")] = 30.0,
) -> None:
    """Where a point of one scan lies in another (anatomical correspondence); prints JSON."""
    import json

    from medssl.correspondence import build_correspondence, match_point

    for name, value in (("--baseline", baseline), ("--prior", prior)):
        if value is not None and value not in ("registration", "body_box"):
            raise UserError(f"{name}: {value!r} is not one of registration, body_box")
    correspondence = build_correspondence(encoder, geometric=baseline, prior=prior, radius_mm=radius)
    matched, score = match_point(correspondence, source, target, point)
    typer.echo(json.dumps({"from": str(source), "to": str(target), "point_from_mm": list(point),
                           "point_mm": [round(v, 2) for v in matched], "score": score, "method": correspondence.name,
                           "encoder": encoder}))


@app.command("demo")
def demo_command(output: Annotated[Path, typer.Option("--output", "-o", help="Demo output folder.")] = Path("demo_out"),
         ) -> None:
    """Run the main job end to end on the embedded default data and print a summary. It computes with one thread,
    so that its figures are the same on every machine (--threads does not change them)."""
    pin_figure_threads()  # its figures reproduce whatever --threads or the machine say
    from medssl.demo import run_demo

    run_demo(output)


@app.command("app")
def app_command(
    run_dir: Annotated[Optional[list[Path]], typer.Argument(
        help="Grounding run directories (with grounding.pt) or 'medssl ground infer' outputs (results.json + maps).",
    )] = None,
    port: Annotated[int, typer.Option(help="Port of the Streamlit server.")] = 8501,
    data_root: Annotated[Optional[list[Path]], typer.Option(
        "--data-root", help="More folders the app may read (volumes, manifests, runs).")] = None,
    address: Annotated[str, typer.Option(help="Address to listen on (default: this machine only).")] = "127.0.0.1",
) -> None:
    """Open the attention-map viewer (Streamlit): the run directories' cases, reports and maps in the browser. It
    reads files only under the run directories, the --data-root folders and the folders those runs name (a grounding
    run's manifest folder, a ground infer output's image folder)."""
    import subprocess

    from medssl.app.session import check_folders, streamlit_command

    runs, roots = run_dir or [], data_root or []
    check_folders(runs, roots)
    command = streamlit_command(runs, roots, port=port, address=address)
    typer.echo(f"medssl app: http://{address}:{port} (Ctrl-C stops it)", err=True)
    code = subprocess.call(command)
    if code not in (0, -2, 130):
        raise UserError(f"the app's Streamlit server stopped with exit code {code}")


# ---------------------------------------------------------------------------------------- configs


@config_app.command("list")
def config_list() -> None:
    """The shipped configs, each with its first comment line (the command it is for)."""
    from medssl.config import SHIPPED_CONFIGS, shipped_configs

    for name in shipped_configs():
        first = (SHIPPED_CONFIGS / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[:1]
        typer.echo(f"{name:32s} {first[0].lstrip('# ') if first and first[0].startswith('#') else ''}")


@config_app.command("show")
def config_show(name: Annotated[str, typer.Argument(help="A shipped config's name (`medssl config list`).")]) -> None:
    """Print a shipped config (with its comments) to start from: `medssl config show grounding > my.yaml`."""
    from medssl.config import SHIPPED_CONFIGS, resolve_config

    path = resolve_config(name)
    if path.resolve().parent != SHIPPED_CONFIGS:
        raise UserError(f"{name}: not the name of a shipped config (`medssl config list`)")
    typer.echo(path.read_text(encoding="utf-8"), nl=False)


def tolerant_output() -> None:
    """On a terminal that cannot show a character (C locale without UTF-8 mode: ASCII), print '?' for it
    instead of failing with UnicodeEncodeError after the work is done (the '±' of the bench tables)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 2 with a one-line message on user errors."""
    tolerant_output()
    try:
        code = app(args=argv, prog_name="medssl", standalone_mode=False)
        if isinstance(code, int) and code:  # --help and no-args help return their exit code
            sys.exit(code)
    except click_errors.NoArgsIsHelpError as err:  # `medssl manifest`: its help
        err.show()
        sys.exit(err.exit_code)
    except click_errors.UsageError as err:  # a bad option value, a missing argument: one line, not a box
        command = f" (see {err.ctx.command_path} --help)" if err.ctx is not None else ""
        typer.echo(f"error: {one_line(err.format_message())}{command}", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except UserError as err:
        message = one_line(err)
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)
    except OSError as err:  # a write outside medssl.atomic (a run folder, TensorBoard) that the file system refused
        refused = unwritable(err, err.filename) if err.filename else None
        if refused is None:
            raise
        typer.echo(f"error: {one_line(refused)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        if "torch.distributed" in sys.modules:  # a training command ran (torchrun: leave the process group)
            from medssl.training.distributed import shutdown_distributed

            shutdown_distributed()


if __name__ == "__main__":
    main()
