"""`medssl bench NAME`: benchmarks that print their numbers (speed, memory, label efficiency).

Imports as `medssl/cli.py` does (its docstring): module level only the standard library, typer and medssl's
light modules; each command imports what it runs in its body. The benches whose figures the README prints
(learning effects: probes, Dice, AUROC, pointing game) call `pin_figure_threads()` first, so that their
numbers do not depend on the thread count; the speed benches run with the threads they are given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from medssl.cli_options import OverridesArg
from medssl.config import load_config
from medssl.errors import UserError
from medssl.threads import pin_figure_threads

bench_app = typer.Typer(help="Benchmarks that print their numbers (speed, memory, label efficiency).",
                        no_args_is_help=True)


@bench_app.command("data")
def data_command(
    entries: Annotated[str, typer.Option(help="Manifest sizes (entries) for the scale stage, comma-separated.")]
        = "1000,10000,50000",
    cohorts: Annotated[str, typer.Option(help="Cohort sizes (distinct 64^3 volumes) for the cohort stage.")] = "24,288",
    steps: Annotated[int, typer.Option(min=1, help="Training steps of each pretrain volume run.")] = 3,
    workers: Annotated[int, typer.Option(min=0, help="DataLoader workers of each run.")] = 2,
    stages: Annotated[str, typer.Option(help="Stages to run: scale, cohort, crops, preprocess.")]
        = "scale,cohort,crops,preprocess",
    seed: Annotated[int, typer.Option(min=0, help="Random seed.")] = 0,
) -> None:
    """The data path at hospital scale: memory and time to the first step against manifest and cohort size,
    crops/s of the data path for 96^3 crops from real-size CTs, preprocessing seconds per real-size CT."""
    from medssl.bench.data import STAGES, bench_data

    chosen = tuple(s.strip() for s in stages.split(",") if s.strip())
    unknown = sorted(set(chosen) - set(STAGES))
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
    try:
        sizes = tuple(int(n) for n in entries.split(",")), tuple(int(n) for n in cohorts.split(","))
    except ValueError:
        raise UserError(f"--entries / --cohorts: comma-separated whole numbers expected, got {entries!r}, "
                        f"{cohorts!r}") from None
    bench_data(entries=sizes[0], cohorts=sizes[1], steps=steps, workers=workers, stages=chosen, seed=seed)


@bench_app.command("pretrain-volume")
def pretrain_volume_command(
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest (default: a fresh synthetic hospital).")] = None,
    steps: Annotated[int, typer.Option(min=1, help="Timed steps (after one warm-up step).")] = 10,
    batch_size: Annotated[int, typer.Option(min=2, help="Anchors per step (4 crops each; batch norm needs 2).")] = 2,
    crop: Annotated[int, typer.Option(min=16, help="Crop edge in voxels.")] = 32,
    model: Annotated[str, typer.Option(help="basicunet | segresnet | swinunetr.")] = "basicunet",
    against: Annotated[Optional[list[str]], typer.Option(help="Also time these objective sets, interleaved, and "
                                                              "print the step-time ratios (repeat): crop-only, "
                                                              "no-part-whole, part-whole-isolated.")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds (medians, each round's ratio).")] = 1,
) -> None:
    """3D pretraining throughput (crops/s, voxels/s), peak memory, data vs compute time; with --against, the
    shipped objectives' step time against other objective sets (e.g. crop contrast alone)."""
    unknown = [name for name in against or [] if name not in ("crop-only", "no-part-whole", "part-whole-isolated")]
    if unknown:
        raise UserError(f"--against: {', '.join(unknown)}; give crop-only, no-part-whole or part-whole-isolated")
    from medssl.bench.pretrain_volume import bench_pretrain_volume

    bench_pretrain_volume(manifest=manifest, steps=steps, batch_size=batch_size, crop=crop, model=model,
                          against=tuple(dict.fromkeys(against or [])), rounds=rounds)


@bench_app.command("volume-probe")
def volume_probe_command(
    seeds: Annotated[list[int], typer.Option("--seed", min=0, help="Seeds (repeat the option).")] = [0, 1, 2],
    steps: Annotated[int, typer.Option(min=1, help="Pretraining steps per seed.")] = 150,
    batch_size: Annotated[int, typer.Option(min=2, help="Anchors per step (batch norm needs 2).")] = 4,
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest (default: a synthetic hospital).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/bench_volume_probe"),
    overrides: Annotated[Optional[list[str]], typer.Option("--set", help="Pretraining config override, dotted "
                                                           "key=value (repeat), e.g. objectives.part_whole.parts="
                                                           "isolated.")] = None,
) -> None:
    """Organ probe of the pretrained encoder vs the same encoder at random init, over seeds."""
    from medssl.config import parse_overrides
    from medssl.data.manifest import require_manifest_file

    parse_overrides(overrides or [])  # a malformed one is refused before any work
    require_manifest_file(manifest)
    pin_figure_threads()
    from medssl.bench.pretrain_volume import probe_vs_random_init

    probe_vs_random_init(seeds=tuple(seeds), steps=steps, batch_size=batch_size, manifest=manifest, out=output,
                         overrides=tuple(overrides or ()))


@bench_app.command("ts-throughput")
def ts_throughput_command(
    config: Annotated[Path, typer.Option("--config", "-c", help="Pretraining config.")] = Path(
        "configs/pretrain_timeseries.yaml"),
    steps: Annotated[int, typer.Option(min=1, help="Timed steps.")] = 20,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up steps.")] = 3,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda when present).")] = None,
    threads: Annotated[Optional[int], typer.Option(min=1, help="torch CPU threads.")] = None,
    against: Annotated[list[str], typer.Option(help="What ours is compared with (repeat): per-level (re-encoding "
                                                    "per level) and/or comet (COMET's reference fit, --comet); none: "
                                                    "ours alone.")] = ["per-level"],
    comet: Annotated[Optional[Path], typer.Option(help="A checkout of github.com/DL4mHealth/COMET (its reference "
                                                       "code; not part of medssl).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Interleaved rounds (medians and each round's ratio).")] = 1,
    overrides: OverridesArg = None,
) -> None:
    """Signal pretraining step: ours (one pair of views for all levels) vs re-encoding per level and/or COMET's
    reference code (ratios), and our step part by part (encoder, each level, backward)."""
    if device is not None and device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise UserError(f"--device: {device!r} is not cpu, cuda or cuda:N")
    unknown = [name for name in against if name not in ("per-level", "comet", "none")]
    if unknown or not against or ("none" in against and len(set(against)) > 1):
        raise UserError(f"--against: {', '.join(unknown or against)}; give per-level and/or comet, or none alone")
    cfg = load_config(config, "medssl.pretrain.timeseries:PretrainTimeseriesConfig", overrides)
    from medssl.bench.timeseries import throughput

    throughput(cfg, steps=steps, warmup=warmup, device=device, threads=threads, rounds=rounds, comet=comet,
               against=tuple(dict.fromkeys(name.replace("-", "_") for name in against if name != "none")))


@bench_app.command("ts-label-efficiency")
def ts_label_efficiency_command(
    pretrain_config: Annotated[Path, typer.Option("--pretrain-config", help="Pretraining config.")] = Path(
        "configs/pretrain_timeseries.yaml"),
    eval_config: Annotated[Path, typer.Option("--eval-config", help="Evaluation config.")] = Path(
        "configs/eval_timeseries.yaml"),
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("runs/ts_label_efficiency"),
    seeds: Annotated[list[int], typer.Option("--seed", min=0, help="Seeds (repeat the option).")] = [0, 1, 2],
    pretrain_set: Annotated[Optional[list[str]], typer.Option(help="Override for the pretraining config.")] = None,
    eval_set: Annotated[Optional[list[str]], typer.Option(help="Override for the evaluation config.")] = None,
) -> None:
    """Four-level vs two-level (TS2Vec-like) vs scratch at 100/10/1 % labels, over seeds."""
    pretrain = load_config(pretrain_config, "medssl.pretrain.timeseries:PretrainTimeseriesConfig", pretrain_set)
    evaluation = load_config(eval_config, "medssl.downstream.ts_classification:EvalTimeseriesConfig", eval_set)
    pin_figure_threads()
    from medssl.bench.timeseries import label_efficiency

    label_efficiency(pretrain, evaluation, output, seeds=tuple(seeds))


@bench_app.command("label-efficiency")
def label_efficiency_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (rerun to resume).")] = Path(
        "runs/label_efficiency"),
    cohorts: Annotated[list[str], typer.Option("--cohort", help="two_site, hospital and/or mni152 (repeat).")] = [
        "two_site"],
    counts: Annotated[list[int], typer.Option("--count", min=1, help="Labelled training volumes (repeat).")] = [
        1, 2, 4],
    seeds: Annotated[list[int], typer.Option("--seed", min=0, help="Seeds (repeat).")] = [0, 1, 2, 3, 4],
    inits: Annotated[list[str], typer.Option("--init", help="scratch, encoder, network, encoder_nopool and/or "
                                                            "network_nopool (repeat).")] = [
        "scratch", "encoder", "network"],
    steps: Annotated[Optional[int], typer.Option(min=1, help="Fine-tuning steps (default: the config's).")] = None,
    pretrain_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Steps of both pretrainings (default: each config's).")] = None,
    finetune_config: Annotated[Path, typer.Option(help="Fine-tuning config.")] = Path("configs/finetune_seg.yaml"),
    encoder_config: Annotated[Path, typer.Option(help="Pretraining config of the 'encoder' init.")] = Path(
        "configs/pretrain_volume.yaml"),
    network_config: Annotated[Path, typer.Option(help="Pretraining config of the 'network' init.")] = Path(
        "configs/pretrain_volume_mae.yaml"),
    finetune_set: Annotated[Optional[list[str]], typer.Option(help="Fine-tuning config override (repeat).")] = None,
    pretrain_set: Annotated[Optional[list[str]], typer.Option(help="Override for both pretrainings (repeat).")] = None,
    pretrained_from: Annotated[Optional[Path], typer.Option(
        help="Reuse the cohorts and pretrained checkpoints of this earlier output folder.")] = None,
    scratch_from: Annotated[Optional[Path], typer.Option(
        help="Reuse (copy) the cohorts and finished scratch runs of this earlier output folder.")] = None,
    tune: Annotated[bool, typer.Option("--tune/--no-tune", help="Choose each init's lr and warm-up (and a "
                                       "pretrained init's decay toward its weights) on validation first.")] = True,
    tune_lrs: Annotated[list[float], typer.Option("--tune-lr", help="Learning rates tried (repeat).")] = [
        5e-4, 2e-3, 8e-3, 2e-2, 5e-2],
    tune_warmups: Annotated[list[int], typer.Option("--tune-warmup", help="Warm-up steps tried (repeat).")] = [
        10, 200],
    tune_decays: Annotated[list[float], typer.Option("--tune-decay", help="seg.decay_to_pretrained values tried "
                                                     "for pretrained inits, besides 0 (repeat).")] = [1.0, 10.0],
    tune_count: Annotated[int, typer.Option(help="Labelled volumes of the tuning runs.")] = 2,
    tune_seed: Annotated[int, typer.Option(help="Seed of the tuning runs.")] = 0,
) -> None:
    """Segmentation Dice vs number of labelled volumes: scratch, pretrained encoder, pretrained whole network;
    hyper-parameters chosen per init on validation; same budget, crops and seeds; per test site; paired
    differences with Holm-corrected intervals; CSV, markdown, PNG. Resumes where it stopped."""
    pin_figure_threads()
    from medssl.bench.label_efficiency import Tuning, label_efficiency

    tuning = Tuning(tuple(tune_lrs), tuple(tune_warmups), tuple(tune_decays), tune_count, tune_seed) if tune else None
    label_efficiency(output, cohorts=tuple(cohorts), counts=tuple(counts), seeds=tuple(seeds), inits=tuple(inits),
                     steps=steps, pretrain_steps=pretrain_steps, finetune_config=finetune_config,
                     pretrain_configs={"encoder": encoder_config, "network": network_config},
                     overrides=tuple(finetune_set or ()), pretrain_overrides=tuple(pretrain_set or ()),
                     pretrained_from=pretrained_from, scratch_from=scratch_from, tuning=tuning)


@bench_app.command("correspondence")
def correspondence_command(
    manifest: Annotated[Path, typer.Option(help="Manifest whose entries carry ground-truth landmarks.")],
    encoder: Annotated[Path, typer.Option(help="Pretrained encoder (RUN/encoder.pt).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (rerun to resume).")] = Path(
        "runs/bench_correspondence"),
    splits: Annotated[list[str], typer.Option("--split", help="Split(s) of patients the encoder never saw "
                                                             "(repeat).")] = ["test"],
    pairs: Annotated[Optional[int], typer.Option(min=1, help="Patient pairs drawn (default: every ordered pair).")] = (
        None),
    seed: Annotated[int, typer.Option(min=0, help="Seed of the pair draw and of the random encoder.")] = 0,
    radius: Annotated[float, typer.Option(min=1.0, help="Search radius (mm) around the affine prior.")] = 30.0,
) -> None:
    """Landmark error across held-out patients and studies, lesion tracking: pretrained vs random encoder vs
    affine registration and body box."""
    from medssl.data.manifest import require_manifest_file

    require_manifest_file(manifest)
    for split in splits:
        if split not in ("training", "validation", "test"):
            raise UserError(f"--split: {split!r} is not one of training, validation, test")
    pin_figure_threads()
    from medssl.bench.correspondence import correspondence_benchmark

    correspondence_benchmark(output, manifest=manifest, encoder=encoder, splits=tuple(splits), pairs=pairs, seed=seed,
                             radius_mm=radius)


@bench_app.command("seg-inference")
def seg_inference_command(
    size: Annotated[int, typer.Option(min=16, max=512, help="Volume edge in voxels.")] = 64,
    volumes: Annotated[int, typer.Option(min=1, help="Timed volumes.")] = 5,
) -> None:
    """Sliding-window inference speed (volumes/s) and peak memory of the fine-tuning network."""
    from medssl.bench.label_efficiency import inference_speed

    inference_speed(size=size, volumes=volumes)


@bench_app.command("grounding")
def grounding_command(
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (resumable).")] = Path(
        "runs/bench_grounding"),
    seeds: Annotated[list[int], typer.Option("--seed", min=0, help="Seeds (repeat).")] = [0, 1, 2],
    variants: Annotated[Optional[list[str]], typer.Option("--variant", help="ours, random_init, untrained, "
                                                          "oracle_organs, oracle_untrained, atlas (repeat; default: "
                                                          "all, all but random_init with --run).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest (default: a 60-patient hospital).")] = None,
    pretrained: Annotated[Optional[Path], typer.Option(help="Pretrained encoder (default: pretrain one).")] = None,
    pretrain_steps: Annotated[int, typer.Option(min=1, help="Pretraining steps when no encoder is given.")] = 400,
    config: Annotated[Path, typer.Option("--config", "-c", help="Grounding config.")] = Path("configs/grounding.yaml"),
    run: Annotated[Optional[Path], typer.Option(help="A finished 'ground train' run: the baselines with its organ "
                                                     "head, on its manifest and seed (nothing trained).")] = None,
    overrides: OverridesArg = None,
) -> None:
    """Report grounding: ours vs a random-init encoder and the where / what baselines, same seeds; README table."""
    pin_figure_threads()
    from medssl.bench.grounding import grounding_benchmark

    grounding_benchmark(output, seeds=tuple(seeds), manifest=manifest, pretrained=pretrained,
                        pretrain_steps=pretrain_steps, variants=tuple(variants) if variants else None, config=config,
                        overrides=tuple(overrides or ()), run=run)


@bench_app.command("threads")
def threads_command(
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Folder for threads.json.")] = None,
    steps: Annotated[int, typer.Option(min=2, help="Pretraining steps per job.")] = 40,
    manifest: Annotated[Optional[Path], typer.Option(help="Manifest (default: a small synthetic hospital).")] = None,
) -> None:
    """Training speed alone and as two concurrent jobs under four thread settings (incl. medssl's default)."""
    from medssl.bench.threads import thread_benchmark

    thread_benchmark(output, steps=steps, manifest=manifest)


@bench_app.command("grounding-speed")
def grounding_speed_command(
    checkpoint: Annotated[Path, typer.Option(help="Grounding model (RUN/grounding.pt).")],
    image: Annotated[Path, typer.Option(help="Volume.")],
    report: Annotated[Path, typer.Option(help="Report whose statements are grounded together.")],
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats (the best is reported).")] = 3,
) -> None:
    """Seconds to ground one phrase in one volume, and phrases/s for a whole report (one image pass)."""
    from medssl.bench.grounding import grounding_speed

    grounding_speed(checkpoint, image, report, repeats=repeats)



@bench_app.command("app")
def app_command(
    size: Annotated[tuple[int, int, int], typer.Option(help="Synthetic CT's voxels (X Y Z).")] = (512, 512, 300),
    window: Annotated[str, typer.Option(help="Browser window, WIDTHxHEIGHT in CSS pixels.")] = "1366x768",
    repeats: Annotated[int, typer.Option(help="Repeats of each interaction (clicks: a third, at least 3).")] = 30,
    reloads: Annotated[int, typer.Option(help="Reloads timed after the first open.")] = 3,
    work: Annotated[Optional[Path], typer.Option(help="Keep the synthetic case here (reused when its size matches; "
                                                      "default: a temporary folder, removed).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Also write the figures as JSON.")] = None,
) -> None:
    """The clinician app's aims in headless Chromium: the main image's size at the window, wheel / zoom / pan /
    W/L response in the browser, click to Python's statistics, opening a synthetic 512 x 512 x 300 CT with a map."""
    from medssl.bench.app import bench_app, check_options

    check_options(size, window, repeats, reloads)
    bench_app(size=size, window=window, repeats=repeats, reloads=reloads, work=work, output=output)
