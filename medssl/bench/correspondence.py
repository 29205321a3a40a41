"""`medssl bench correspondence`: is the same anatomy found across scans?

On the held-out patients of a manifest whose entries carry ground-truth `landmarks` ({name: [x, y, z]} RAS
mm, as `medssl synth` writes them), every method maps points of one scan into another
(`medssl.correspondence`) and is scored against the truth:
- across patients: each landmark of a patient's first study -> the same landmark in another patient's first
  study (every ordered pair of patients, or `pairs` of them drawn with `seed`): error in mm;
- across studies: each landmark of a patient's first study -> its second study: error in mm;
- lesion tracking: each lesion's centre in the first study (its `centre_mm`) -> the second study: a hit when
  the matched point's voxel belongs to the same lesion (`lesion_id`) in the follow-up's lesion mask.
Methods: the pretrained encoder, the same architecture at random initialisation (the control: the test
means something only if it is clearly worse), affine registration (SimpleITK, the baseline) and body-box
coordinates; and each encoder again with its search restricted to `radius_mm` around the affine answer.

Outputs in `out_dir`: correspondence_matches.csv (one row per matched point), correspondence.csv (the
summary per method), correspondence.md, correspondence.json, correspondence.png (error distributions) and
correspondence_example.png (one landmark matched between two patients by every method). Each method's matches
are kept in `matches_<method>.csv`, so a rerun skips the methods already done.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medssl.atomic import atomic_path, write_json, write_text
from medssl.bench.report import csv_text, print_table
from medssl.errors import UserError

BASELINE = "registration"


def _entries(manifest: Path, splits: Sequence[str]) -> list[dict[str, Any]]:
    """The splits' entries with absolute paths; UserError when none carries landmarks."""
    data = json.loads(Path(manifest).read_text(encoding="utf-8"))
    entries = [dict(e) for split in splits for e in data.get(split, [])]
    named = "' + '".join(splits)
    if not entries:
        raise UserError(f"{manifest}: the '{named}' split is empty")
    if not any(e.get("landmarks") for e in entries):
        raise UserError(f"{manifest}: no entry of the '{named}' split has 'landmarks' ({{name: [x, y, z]}} in RAS mm, "
                        "as `medssl synth` writes them); correspondence needs ground-truth landmarks")
    for e in entries:
        for key in ("image", "lesion_mask"):
            if e.get(key):
                e[key] = str(Path(manifest).parent / e[key])
    return entries


def _field_of_view(path: str, cache: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(inverse affine (4, 4), shape (3,)) of a scan, read once."""
    if path not in cache:
        from medssl.data import io

        volume = io.read_volume(path)
        cache[path] = np.linalg.inv(volume.affine), np.asarray(volume.array.shape)
    return cache[path]


def _inside(path: str, points: Sequence[Sequence[float]], cache: dict) -> np.ndarray:
    """(N,) bool: the RAS mm points lie within the scan's field of view."""
    inverse, shape = _field_of_view(path, cache)
    voxels = np.asarray(points, float) @ inverse[:3, :3].T + inverse[:3, 3]
    return np.all((voxels >= -0.5) & (voxels <= shape - 0.5), axis=1)


def _keep_inside(task: dict[str, Any], cache: dict) -> dict[str, Any]:
    """The task without the points that lie outside the source or (their truth) outside the target scan's
    field of view (a landmark at the edge of the anatomy can leave a 400 mm field); `outside` counts them."""
    keep = _inside(task["a"]["image"], task["points"], cache) & _inside(task["b"]["image"], task["truth"], cache)
    listed = ("names", "points", "truth", "labels")
    return {**task, **{k: [v for v, ok in zip(task[k], keep) if ok] for k in listed if k in task},
            "outside": int((~keep).sum())}


def tasks(entries: list[dict[str, Any]], *, pairs: int | None, seed: int) -> list[dict[str, Any]]:
    """The point sets to match: across patients (first studies, ordered pairs), across studies (first ->
    second study) and lesions (first-study centres of lesions the second study shows too); points outside
    either scan's field of view are left out and counted (`outside`)."""
    by_patient: dict[str, list[dict]] = {}
    for e in entries:
        by_patient.setdefault(e["patient_id"], []).append(e)
    for studies in by_patient.values():
        studies.sort(key=lambda e: e.get("study_id") or "")
    first = [studies[0] for studies in by_patient.values() if studies[0].get("landmarks")]
    ordered = [(a, b) for a in first for b in first if a is not b]
    if pairs is not None and pairs < len(ordered):
        keep = np.random.default_rng(seed).choice(len(ordered), pairs, replace=False)
        ordered = [ordered[k] for k in sorted(keep)]
    out = []
    for a, b in ordered:
        names = [n for n in a["landmarks"] if n in b["landmarks"]]
        out.append({"kind": "across patients", "a": a, "b": b, "names": names,
                    "points": [a["landmarks"][n] for n in names], "truth": [b["landmarks"][n] for n in names]})
    for studies in by_patient.values():
        if len(studies) < 2:
            continue
        a, b = studies[0], studies[1]
        if a.get("landmarks") and b.get("landmarks"):
            names = [n for n in a["landmarks"] if n in b["landmarks"]]
            out.append({"kind": "across studies", "a": a, "b": b, "names": names,
                        "points": [a["landmarks"][n] for n in names], "truth": [b["landmarks"][n] for n in names]})
        later = {lesion["lesion_id"]: lesion for lesion in b.get("lesions") or [] if "lesion_id" in lesion}
        tracked = [lesion for lesion in a.get("lesions") or [] if lesion.get("lesion_id") in later]
        if tracked and b.get("lesion_mask"):
            out.append({"kind": "lesions", "a": a, "b": b,
                        "names": [f"lesion {lesion['lesion_id']} ({lesion['organ']})" for lesion in tracked],
                        "points": [lesion["centre_mm"] for lesion in tracked],
                        "truth": [later[lesion["lesion_id"]]["centre_mm"] for lesion in tracked],
                        "labels": [later[lesion["lesion_id"]]["label"] for lesion in tracked]})
    cache: dict = {}
    return [task for task in (_keep_inside(t, cache) for t in out) if task["names"]]


def _lesion_hits(mask_path: str, points_mm: np.ndarray, labels: Sequence[int]) -> list[bool]:
    """Whether each point's nearest voxel of the lesion mask holds the given lesion label."""
    from medssl.data import io

    mask = io.read_volume(mask_path, label=True)
    voxels = np.rint(np.asarray(points_mm) @ np.linalg.inv(mask.affine)[:3, :3].T
                     + np.linalg.inv(mask.affine)[:3, 3]).astype(int)
    inside = np.all((voxels >= 0) & (voxels < mask.array.shape), axis=1)
    return [bool(ok and mask.array[tuple(v)] == label) for v, ok, label in zip(voxels, inside, labels)]


def run_method(name: str, correspondence, work: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Match every task's points with one `medssl.correspondence.Correspondence`; one row per point."""
    rows = []
    for task in work:
        tick = time.perf_counter()
        predicted, scores = correspondence.match(task["a"]["image"], task["b"]["image"], np.asarray(task["points"]))
        seconds = (time.perf_counter() - tick) / len(predicted)
        errors = np.linalg.norm(predicted - np.asarray(task["truth"]), axis=1)
        hits = (_lesion_hits(task["b"]["lesion_mask"], predicted, task["labels"]) if task["kind"] == "lesions"
                else [None] * len(errors))
        for k, point in enumerate(task["names"]):
            rows.append({"method": name, "kind": task["kind"], "a": Path(task["a"]["image"]).name,
                         "b": Path(task["b"]["image"]).name, "site_a": task["a"].get("site", ""),
                         "site_b": task["b"].get("site", ""), "point": point, "error_mm": float(errors[k]),
                         "score": float(scores[k]), "hit": hits[k], "seconds": seconds,
                         **{f"predicted_{c}": float(v) for c, v in zip("xyz", predicted[k])},
                         **{f"truth_{c}": float(v) for c, v in zip("xyz", task["truth"][k])}})
    return rows


def outside_counts(work: list[dict[str, Any]]) -> dict[str, int]:
    """Per kind of task, the points left out because they lie outside a scan's field of view."""
    counts: dict[str, int] = {}
    for task in work:
        counts[task["kind"]] = counts.get(task["kind"], 0) + task.get("outside", 0)
    return counts


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per method: median / mean / 90th percentile landmark error across patients and across studies, the share
    within 10 mm, the lesion hit rate and the ratio of its median error across patients to the baseline's."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    out = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        row: dict[str, Any] = {"method": method}
        for kind, key in (("across patients", "patients"), ("across studies", "studies")):
            errors = np.array([r["error_mm"] for r in mine if r["kind"] == kind])
            if len(errors):
                row.update({f"{key}_median_mm": float(np.median(errors)), f"{key}_mean_mm": float(errors.mean()),
                            f"{key}_p90_mm": float(np.percentile(errors, 90)),
                            f"{key}_within_10mm": float((errors <= 10).mean()), f"{key}_points": len(errors)})
        lesions = [r for r in mine if r["kind"] == "lesions"]
        if lesions:
            row.update({"lesion_hit_rate": float(np.mean([r["hit"] for r in lesions])), "lesions": len(lesions),
                        "lesion_median_mm": float(np.median([r["error_mm"] for r in lesions]))})
        row["seconds_per_point"] = float(np.mean([r["seconds"] for r in mine]))
        out.append(row)
    baseline = next((r for r in out if r["method"] == BASELINE), None)
    for row in out:
        if baseline and "patients_median_mm" in row and "patients_median_mm" in baseline:
            row["patients_median_vs_registration"] = row["patients_median_mm"] / baseline["patients_median_mm"]
    return out


def markdown(summary: list[dict[str, Any]], rows: list[dict[str, Any]], outside: dict[str, int] | None = None) -> str:
    """The summary table, the points left out, and the median error per landmark across patients, as markdown."""
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    lines = ["| method | across patients: median (mean, p90) mm | within 10 mm | median / registration's | "
             "across studies: median (p90) mm | lesions hit | lesion centre median mm |",
             "|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['method']} | {cell(r, 'patients_median_mm', '.1f')} ({cell(r, 'patients_mean_mm', '.1f')}, "
                     f"{cell(r, 'patients_p90_mm', '.1f')}) | {cell(r, 'patients_within_10mm', '.2f')} | "
                     f"{cell(r, 'patients_median_vs_registration', '.2f')} | {cell(r, 'studies_median_mm', '.1f')} "
                     f"({cell(r, 'studies_p90_mm', '.1f')}) | {cell(r, 'lesion_hit_rate', '.2f')} of "
                     f"{r.get('lesions', 0)} | {cell(r, 'lesion_median_mm', '.1f')} |")
    if outside and any(outside.values()):
        lines += ["", "Left out, outside a scan's field of view: " + ", ".join(
            f"{count} point(s) {kind}" for kind, count in outside.items() if count) + "."]
    methods = [r["method"] for r in summary]
    landmarks = list(dict.fromkeys(r["point"] for r in rows if r["kind"] == "across patients"))
    if landmarks:
        lines += ["", "Median error across patients per landmark (mm):", "",
                  "| landmark | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
        for name in landmarks:
            values = [np.median([r["error_mm"] for r in rows if r["method"] == m and r["point"] == name
                                 and r["kind"] == "across patients"] or [math.nan]) for m in methods]
            lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |")
    return "\n".join(lines) + "\n"


def _read_csv(path: Path) -> list[dict[str, Any]]:
    def value(key: str, text: str) -> Any:
        if key in ("error_mm", "score", "seconds") or key.startswith(("predicted_", "truth_")):
            return float(text) if text not in ("", "nan") else math.nan
        if key == "hit":
            return None if text == "" else text == "True"
        return text

    with open(path, encoding="utf-8", newline="") as handle:
        return [{k: value(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _figures(out: Path, rows: list[dict[str, Any]], example: dict[str, Any] | None, scans) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    kinds = [k for k in ("across patients", "across studies", "lesions") if any(r["kind"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.6 * len(kinds), 3.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        data = [[r["error_mm"] for r in rows if r["method"] == m and r["kind"] == kind] for m in methods]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(methods) + 1), [m.replace(" + ", "\n+ ") for m in methods], fontsize=6,
                      rotation=30)
        ax.axhline(10, color="grey", lw=0.8, ls="--")
        ax.set_ylabel("error (mm)")
        ax.set_title(f"{kind} (synthetic hospital)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    with atomic_path(out / "correspondence.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    if example is None:
        return
    a, b = scans(example["a"]), scans(example["b"])
    source = np.asarray(example["point"], float)
    truth = np.asarray(example["truth"], float)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.4))
    for ax, scan, point, title in ((axes[0], a, source, f"A: {Path(example['a']).name}"),
                                   (axes[1], b, truth, f"B: {Path(example['b']).name}")):
        voxel = scan.to_voxels(point[None])[0]
        j = int(np.clip(round(voxel[1]), 0, scan.image.shape[2] - 1))   # the coronal plane through the point
        ax.imshow(scan.image[0, :, j, :].numpy().T, cmap="gray", origin="lower")
        ax.set_title(f"{title}, coronal", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        if scan is a:
            ax.plot(voxel[0], voxel[2], "o", ms=9, mfc="none", mec="yellow", mew=2, label=example["name"])
        else:
            ax.plot(voxel[0], voxel[2], "o", ms=9, mfc="none", mec="lime", mew=2, label="truth")
            for (method, predicted), marker in zip(example["predicted"].items(), "x+sd^v"):
                v = scan.to_voxels(np.asarray(predicted)[None])[0]
                ax.plot(v[0], v[2], marker, ms=8, mew=2,
                        label=f"{method}: {np.linalg.norm(np.asarray(predicted) - truth):.0f} mm")
        ax.legend(fontsize=6, loc="lower left")
    fig.suptitle("one landmark matched between two held-out patients (synthetic hospital; x right, up superior)",
                 fontsize=9)
    fig.tight_layout()
    with atomic_path(out / "correspondence_example.png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def correspondence_benchmark(out_dir: str | Path, *, manifest: Path, encoder: Path, splits: Sequence[str] = ("test",),
                             pairs: int | None = None, seed: int = 0, radius_mm: float = 30.0,
                             example_landmark: str = "kidney_left_upper_pole", quiet: bool = False
                             ) -> list[dict[str, Any]]:
    """Run the benchmark (module docstring) on the patients of `splits` (patients the encoder never saw: a
    pretraining on a pool leaves every split of the labelled cohort held out) and return the summary rows."""
    from medssl.correspondence import Correspondence, EmbeddingMatcher, GeometricMatcher

    out = Path(out_dir)
    entries = _entries(manifest, splits)
    work = tasks(entries, pairs=pairs, seed=seed)
    if not work:
        raise UserError(f"{manifest}: the '{' + '.join(splits)}' split has no two patients or studies with landmarks "
                        "to match")
    pretrained = EmbeddingMatcher.from_checkpoint(encoder, name="pretrained encoder")
    arch = type(pretrained.encoder).__name__
    random = EmbeddingMatcher.random(pretrained.encoder.cfg, pretrained.prep, seed=seed, name="random encoder")
    registration = GeometricMatcher("registration")   # one fit per pair of scans, shared by three methods
    methods = {"pretrained encoder": Correspondence(pretrained), "random encoder": Correspondence(random),
               BASELINE: Correspondence(registration, prep=pretrained.prep),
               "body_box": Correspondence(GeometricMatcher("body_box"), prep=pretrained.prep),
               f"pretrained encoder + {BASELINE} prior": Correspondence(pretrained, prior=registration,
                                                                          radius_mm=radius_mm),
               f"random encoder + {BASELINE} prior": Correspondence(random, prior=registration, radius_mm=radius_mm)}
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, correspondence in methods.items():
        cached = out / f"matches_{name.replace(' ', '_').replace('+', 'plus')}.csv"
        if cached.is_file():
            rows += _read_csv(cached)
            continue
        mine = run_method(name, correspondence, work)
        write_text(cached, csv_text(mine))
        rows += mine
    summary = summarise(rows)
    example = next((t for t in work if t["kind"] == "across patients" and example_landmark in t["names"]), None)
    shown = None
    if example is not None:
        k = example["names"].index(example_landmark)
        predicted = {name: [r[f"predicted_{c}"] for c in "xyz"] for name in methods for r in rows
                     if r["method"] == name and r["kind"] == "across patients" and r["point"] == example_landmark
                     and r["a"] == Path(example["a"]["image"]).name and r["b"] == Path(example["b"]["image"]).name}
        shown = {"a": example["a"]["image"], "b": example["b"]["image"], "name": example_landmark,
                 "point": example["points"][k], "truth": example["truth"][k], "predicted": predicted}
    write_text(out / "correspondence_matches.csv", csv_text(rows))
    write_text(out / "correspondence.csv", csv_text(summary))
    write_text(out / "correspondence.md", markdown(summary, rows, outside_counts(work)))
    _figures(out, rows, shown, methods["pretrained encoder"].scan)
    write_json(out / "correspondence.json", {
        "settings": {"manifest": str(manifest), "encoder": str(encoder), "architecture": arch, "splits": list(splits),
                     "pairs": pairs, "seed": seed, "radius_mm": radius_mm},
        "summary": summary, "outside_field_of_view": outside_counts(work), "example": shown})
    if not quiet:
        print_table(f"correspondence on the {' + '.join(splits)} split(s) of {manifest} (errors in mm)",
                    ["method", "across patients median", "p90", "vs registration", "across studies median",
                     "lesions hit"],
                    [[r["method"], r.get("patients_median_mm", "-"), r.get("patients_p90_mm", "-"),
                      r.get("patients_median_vs_registration", "-"), r.get("studies_median_mm", "-"),
                      r.get("lesion_hit_rate", "-")] for r in summary])
        left = outside_counts(work)
        if any(left.values()):
            print("left out, outside a scan's field of view: " + ", ".join(f"{n} point(s) {k}" for k, n in left.items()
                                                                            if n))
        print(f"wrote {out / 'correspondence.md'}, {out / 'correspondence.png'}, {out / 'correspondence_example.png'}")
    return summary
