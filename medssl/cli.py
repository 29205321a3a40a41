"""The `medssl` command line: parses arguments, loads configs, calls library functions, prints.

No training or data logic lives here. A `UserError` anywhere below becomes a one-line message on
stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from medssl.errors import UserError, one_line

app = typer.Typer(help="medssl: self-supervised pretraining on hospital data (3D volumes, physiological signals) "
                       "and the heads that use it. Every command has --help.", no_args_is_help=True, pretty_exceptions_enable=False,
                  add_completion=False)
manifest_app = typer.Typer(help="Build and check data manifests.", no_args_is_help=True)
pretrain_app = typer.Typer(help="Self-supervised pretraining.", no_args_is_help=True)
finetune_app = typer.Typer(help="Fine-tune downstream heads.", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate pretrained encoders downstream.", no_args_is_help=True)
ground_app = typer.Typer(help="Report grounding: phrases located in the volume.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that print their numbers (speed, memory).", no_args_is_help=True)
for sub, name in ((manifest_app, "manifest"), (pretrain_app, "pretrain"), (finetune_app, "finetune"),
                  (eval_app, "eval"), (ground_app, "ground"), (bench_app, "bench")):
    app.add_typer(sub, name=name)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config file.")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--output", "-o", help="Run directory (default: runs/<task>).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from RUN_DIR/checkpoints/last.pt.")]
PretrainedOpt = Annotated[Optional[Path], typer.Option("--pretrained", help="Pretrained medssl checkpoint.")]
OverridesArg = Annotated[Optional[list[str]], typer.Argument(help="Config overrides: dotted.key=value ...")]


# ---------------------------------------------------------------------------------------- data


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (created; a previous cohort of the same kind is replaced).")],
    patients: Annotated[int, typer.Option(help="Number of patients (subjects).")] = 8,
    studies: Annotated[int, typer.Option(help="Studies (scans) per patient.")] = 2,
    size: Annotated[int, typer.Option(help="Volume edge length in voxels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed; the output is deterministic per seed.")] = 0,
    trials: Annotated[Optional[int], typer.Option(help="hospital: signal recording sessions (trials) per study "
                                                       "[default: 2].")] = None,
    signal_seconds: Annotated[Optional[float], typer.Option(help="hospital: length of each signal trial in seconds "
                                                                 "[default: 20].")] = None,
    cohort: Annotated[str, typer.Option(help="hospital (CT torso, organ labels, lesions, reports, ECG/PPG) or mni152 "
                                             "(brain tissue MR from nilearn's MNI152 template).")] = "hospital",
) -> None:
    """Write a synthetic cohort with its manifest: the hospital or the MNI152 brain-tissue cohort."""
    from medssl.data.synthetic.cohorts import write_cohort

    options = {key: value for key, value in (("trials", trials), ("signal_seconds", signal_seconds)) if value is not None}
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

    manifest, warnings = build_manifest(folder, name=name, modality=modality, val_fraction=val_fraction,
                                        test_fraction=test_fraction, seed=seed)
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    write_manifest(manifest, output)
    counts = ", ".join(f"{split} {len(manifest[split])}" for split in ("training", "validation", "test"))
    typer.echo(f"wrote {output} ({counts})")


# ---------------------------------------------------------------------------------------- training


def load_config(config: Path, schema, overrides: list[str] | None):
    from medssl.config import load_config as load

    return load(config, schema, overrides)


def _print_summary(run_dir: Path, summary: dict) -> None:
    if not summary:  # a non-main rank of a distributed run
        return
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(summary.items()))
    typer.echo(f"run directory: {run_dir}\n{shown}")


@pretrain_app.command("volume")
def pretrain_volume(config: ConfigOpt, output: RunDirOpt = None, resume: ResumeOpt = False,
                    overrides: OverridesArg = None) -> None:
    """Pretrain a 3D encoder on unlabeled volumes (anatomical consistency, multi-level contrast)."""
    from medssl.pretrain.volume import PretrainVolumeConfig
    from medssl.pretrain.volume import pretrain_volume as run

    cfg = load_config(config, PretrainVolumeConfig, overrides)
    run_dir = output or Path("runs/pretrain_volume")
    summary = run(cfg, run_dir, resume=resume)
    _print_summary(run_dir, summary)


@pretrain_app.command("timeseries")
def pretrain_timeseries(config: ConfigOpt, output: RunDirOpt = None, resume: ResumeOpt = False,
                        overrides: OverridesArg = None) -> None:
    """Pretrain a signal encoder with four-level hierarchical contrast (observation, sample, trial, patient)."""
    from medssl.pretrain.timeseries import PretrainTimeseriesConfig
    from medssl.pretrain.timeseries import pretrain_timeseries as run

    cfg = load_config(config, PretrainTimeseriesConfig, overrides)
    run_dir = output or Path("runs/pretrain_timeseries")
    _print_summary(run_dir, run(cfg, run_dir, resume=resume))


@finetune_app.command("seg")
def finetune_seg(config: ConfigOpt, pretrained: PretrainedOpt = None, output: RunDirOpt = None,
                 overrides: OverridesArg = None) -> None:
    """Fine-tune a 3D segmentation network, from scratch or from a pretrained encoder."""
    from medssl.downstream.segmentation import FinetuneSegConfig
    from medssl.downstream.segmentation import finetune_seg as run

    cfg = load_config(config, FinetuneSegConfig, overrides)
    run_dir = output or Path("runs/finetune_seg")
    _print_summary(run_dir, run(cfg, run_dir, pretrained=pretrained))


@eval_app.command("timeseries")
def eval_timeseries(config: ConfigOpt, pretrained: PretrainedOpt = None, output: RunDirOpt = None,
                    overrides: OverridesArg = None) -> None:
    """Classify signals with a linear probe and fine-tuning at label fractions drawn per patient."""
    from medssl.downstream.ts_classification import EvalTimeseriesConfig
    from medssl.downstream.ts_classification import eval_timeseries as run

    cfg = load_config(config, EvalTimeseriesConfig, overrides)
    run(cfg, output or Path("runs/eval_timeseries"), pretrained=pretrained)


@ground_app.command("train")
def ground_train(config: ConfigOpt, pretrained: PretrainedOpt = None, output: RunDirOpt = None,
                 overrides: OverridesArg = None) -> None:
    """Train report grounding: report phrases to 3D attention maps."""
    raise UserError("'medssl ground train' is not implemented yet in this version of medssl")


@ground_app.command("infer")
def ground_infer(
    checkpoint: Annotated[Path, typer.Option(help="Grounding checkpoint.")],
    image: Annotated[Path, typer.Option(help="Input volume.")],
    text: Annotated[str, typer.Option(help="Phrase to locate.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output map (.nii.gz).")],
) -> None:
    """Write the 3D map of one phrase over one volume, in the volume's space."""
    raise UserError("'medssl ground infer' is not implemented yet in this version of medssl")


# ---------------------------------------------------------------------------------------- tools


@bench_app.command("data")
def bench_data(
    patients: Annotated[int, typer.Option(help="Patients in the synthetic hospital.")] = 8,
    size: Annotated[int, typer.Option(help="Volume edge length in voxels.")] = 64,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Data layer speed: synth, manifest check, volume pipeline (cached / not), signal batches."""
    from medssl.bench.data import bench_data as run

    run(patients=patients, size=size, seed=seed)


@bench_app.command("pretrain-volume")
def bench_pretrain_volume(
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest (default: a fresh synthetic hospital).")] = None,
    steps: Annotated[int, typer.Option(help="Timed steps (after one warm-up step).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Anchors per step (4 crops each).")] = 2,
    crop: Annotated[int, typer.Option(help="Crop edge in voxels.")] = 32,
    model: Annotated[str, typer.Option(help="basicunet | segresnet | swinunetr.")] = "basicunet",
) -> None:
    """3D pretraining throughput (crops/s, voxels/s), peak memory, data vs compute time."""
    from medssl.bench.pretrain_volume import bench_pretrain_volume as run

    run(manifest=manifest, steps=steps, batch_size=batch_size, crop=crop, model=model)


@bench_app.command("volume-probe")
def bench_volume_probe(
    seeds: Annotated[list[int], typer.Option("--seed", help="Seeds (repeat the option).")] = [0, 1, 2],
    steps: Annotated[int, typer.Option(help="Pretraining steps per seed.")] = 150,
    batch_size: Annotated[int, typer.Option(help="Anchors per step.")] = 4,
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest (default: a synthetic hospital).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/bench_volume_probe"),
) -> None:
    """Organ probe of the pretrained encoder vs the same encoder at random init, over seeds."""
    from medssl.bench.pretrain_volume import probe_vs_random_init

    probe_vs_random_init(seeds=tuple(seeds), steps=steps, batch_size=batch_size, manifest=manifest, out=output)


@bench_app.command("ts-throughput")
def bench_ts_throughput(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pretraining config.")] = Path(
        "configs/pretrain_timeseries.yaml"),
    steps: Annotated[int, typer.Option(help="Timed steps.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps.")] = 3,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads.")] = None,
    overrides: OverridesArg = None,
) -> None:
    """Signal pretraining step: one pair of views for all levels vs re-encoding per level (ratio)."""
    from medssl.bench.timeseries import throughput
    from medssl.pretrain.timeseries import PretrainTimeseriesConfig

    throughput(load_config(config, PretrainTimeseriesConfig, overrides), steps=steps, warmup=warmup, device=device,
               threads=threads)


@bench_app.command("ts-label-efficiency")
def bench_ts_label_efficiency(
    pretrain_config: Annotated[Path, typer.Option("--pretrain-config", help="Pretraining config.")] = Path(
        "configs/pretrain_timeseries.yaml"),
    eval_config: Annotated[Path, typer.Option("--eval-config", help="Evaluation config.")] = Path(
        "configs/eval_timeseries.yaml"),
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/ts_label_efficiency"),
    seeds: Annotated[list[int], typer.Option("--seed", help="Seeds (repeat the option).")] = [0, 1, 2],
    pretrain_set: Annotated[Optional[list[str]], typer.Option(help="Override for the pretraining config.")] = None,
    eval_set: Annotated[Optional[list[str]], typer.Option(help="Override for the evaluation config.")] = None,
) -> None:
    """Four-level vs two-level (TS2Vec-like) vs scratch at 100/10/1 % labels, over seeds."""
    from medssl.bench.timeseries import label_efficiency
    from medssl.downstream.ts_classification import EvalTimeseriesConfig
    from medssl.pretrain.timeseries import PretrainTimeseriesConfig

    label_efficiency(load_config(pretrain_config, PretrainTimeseriesConfig, pretrain_set),
                     load_config(eval_config, EvalTimeseriesConfig, eval_set), output, seeds=tuple(seeds))


@bench_app.command("label-efficiency")
def bench_label_efficiency(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/label_efficiency"),
    cohorts: Annotated[list[str], typer.Option("--cohort", help="hospital and/or mni152 (repeat).")] = [
        "hospital", "mni152"],
    counts: Annotated[list[int], typer.Option("--count", help="Labelled training volumes (repeat).")] = [1, 2, 4, 8],
    seeds: Annotated[list[int], typer.Option("--seed", help="Seeds (repeat).")] = [0, 1, 2],
    steps: Annotated[Optional[int], typer.Option(help="Fine-tuning steps (default: the config's).")] = None,
    pretrain_steps: Annotated[Optional[int], typer.Option(help="Pretraining steps (default: the config's).")] = None,
) -> None:
    """Segmentation Dice vs number of labelled volumes, from scratch and pretrained, same budget; CSV + PNG."""
    from medssl.bench.label_efficiency import label_efficiency

    label_efficiency(output, cohorts=tuple(cohorts), counts=tuple(counts), seeds=tuple(seeds), steps=steps,
                     pretrain_steps=pretrain_steps)


@bench_app.command("seg-inference")
def bench_seg_inference(
    size: Annotated[int, typer.Option(help="Volume edge in voxels.")] = 64,
    volumes: Annotated[int, typer.Option(help="Timed volumes.")] = 5,
) -> None:
    """Sliding-window inference speed (volumes/s) and peak memory of the fine-tuning network."""
    from medssl.bench.label_efficiency import inference_speed

    inference_speed(size=size, volumes=volumes)


@app.command()
def demo(output: Annotated[Path, typer.Option("--output", "-o", help="Demo output folder.")] = Path("demo_out"),
         ) -> None:
    """Run the main job end to end on the embedded default data and print a summary."""
    from medssl.demo import run_demo

    run_demo(output)


@app.command("app")
def app_command(
    run_dir: Annotated[Optional[Path], typer.Argument(help="Run directory with attention maps.")] = None,
    port: Annotated[int, typer.Option(help="Port of the Streamlit server.")] = 8501,
) -> None:
    """Open the attention-map viewer (Streamlit) on a run directory."""
    raise UserError("'medssl app' is not implemented yet in this version of medssl")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 2 with a one-line message on user errors."""
    try:
        app(args=argv, prog_name="medssl")
    except UserError as err:
        message = one_line(err)
        typer.echo(f"error: {message}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
