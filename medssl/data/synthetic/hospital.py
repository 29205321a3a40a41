"""`medssl synth`: the synthetic hospital, the embedded default data of the project (DESIGN section 5).

Layout written by `make_hospital`:

    vol/P001_S1.nii.gz      CT-like image, int16 Hounsfield units, (X, Y, Z) = (size,) * 3, RAS+ affine
    seg/P001_S1.nii.gz      organ labels, uint8, values in ORGANS
    lesion/P001_S1.nii.gz   lesion instances, uint8: 0 background, k = the k-th lesion of the report
    report/P001_S1.txt      free-text report (also in the manifest entry's "report")
    sig/P001_S1_T1.hea/.dat WFDB record per trial: channels ECG (mV) and PPG (NU)
    manifest.json           DESIGN 3.4 schema with patient-independent training/validation/test splits
    pool.json               (with `pool`) the unlabelled pool: images only, a "training" split of its own

Every entry carries `landmarks` ({name: [x, y, z]} world RAS mm of `anatomy.LANDMARKS`, ground truth for
anatomical correspondence) and each finding a `lesion_id` (the same lesion in every study of a patient).

Two sites (`two_site`): the patients of the usual split are scanned at site A (`anatomy.SITES`); as many
patients as the test split holds are added to it, scanned at site B (another scanner and protocol); every
entry says its `site`. A pool (`pool` patients, sites A and B in turn, patients disjoint from all others)
is written beside, images only, for pretraining: a hospital pretrains on every scanner's archive and
labels a handful of scans from one.

Anatomy and rendering: `anatomy`; reports: `reports` (the grammar as data); signals: `signals`.

Determinism: every random draw comes from `streams.stream_rng(seed, stream, patient, ...)`, so patient k
is the same whatever the number of patients requested (for a given size); only the split assignment
depends on the number of patients. Patients are numbered: the split's, then site B's test patients, then
the pool's. Without `two_site` and `pool` the volumes, label maps, masks, reports and signals are those of
the hospital before sites existed, byte for byte.

Overwriting: `out_dir` may be new, empty, or a previous synthetic hospital (its manifest.json is named
"synthetic-hospital"); a previous hospital is replaced as a whole, and only once the new one is
complete. Any other non-empty folder is refused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track

from medssl.atomic import atomic_dir, write_json, write_text
from medssl.data import io
from medssl.data.synthetic.anatomy import SITES, ORGANS, hospital_affine, make_anatomy, render_study, world_grid
from medssl.data.synthetic.writing import check_int_arguments, check_replaceable
from medssl.data.synthetic.reports import write_report
from medssl.data.synthetic.signals import SIGNAL_CHANNELS, SIGNAL_UNITS, condition, make_heart, trial_signals
from medssl.data.synthetic.streams import SPLIT, STUDY, TRIAL, stream_rng
from medssl.errors import UserError

MANIFEST_NAME = "synthetic-hospital"
POOL_NAME = "synthetic-hospital-pool"


@dataclass(frozen=True)
class _Plan:
    seed: int
    studies: int
    size: int
    trials: int
    seconds: float
    fs: float
    width: int   # digits of patient numbers


def _write_patient(root: Path, plan: _Plan, patient: int, patient_condition: int, world: np.ndarray,
                   site: str | None = None, images_only: bool = False) -> list[dict]:
    """Write every study and trial of one patient under root, scanned at `site` (None: site A, not recorded);
    `images_only`: the images alone (a pool). Returns the manifest entries."""
    patient_id = f"P{patient + 1:0{plan.width}d}"
    anatomy = make_anatomy(plan.seed, patient, plan.size)
    heart = make_heart(plan.seed, patient, patient_condition)
    affine = hospital_affine(plan.size)
    entries = []
    for study in range(plan.studies):
        study_id = f"S{study + 1}"
        stem = f"{patient_id}_{study_id}"
        rng = stream_rng(plan.seed, STUDY, patient, study)
        image, labels, mask, findings, landmarks = render_study(anatomy, world, study, rng, SITES[site or "A"])
        io.write_volume(root / "vol" / f"{stem}.nii.gz", image, affine)
        where = {"site": site} if site else {}
        if images_only:
            entries.append({"image": f"vol/{stem}.nii.gz", "patient_id": patient_id, "study_id": study_id, **where,
                            "landmarks": landmarks})
            continue
        report = write_report(study_id, f"S{study}" if study else None, findings, rng)
        io.write_volume(root / "seg" / f"{stem}.nii.gz", labels, affine)
        io.write_volume(root / "lesion" / f"{stem}.nii.gz", mask, affine)
        write_text(root / "report" / f"{stem}.txt", report)
        signals = []
        for trial in range(plan.trials):
            trial_id = f"{study_id}_T{trial + 1}"
            path = root / "sig" / f"{patient_id}_{trial_id}"
            data = trial_signals(heart, stream_rng(plan.seed, TRIAL, patient, study, trial), plan.seconds, plan.fs)
            comments = [f"synthetic hospital patient {patient_id} study {study_id} trial {trial_id}"]
            io.write_wfdb(path, io.Signal(data, plan.fs, SIGNAL_CHANNELS, SIGNAL_UNITS, path, {"comments": comments}))
            signals.append({"path": f"sig/{path.name}", "format": "wfdb", "trial_id": trial_id, "fs": plan.fs})
        entries.append({"image": f"vol/{stem}.nii.gz", "label": f"seg/{stem}.nii.gz",
                        "lesion_mask": f"lesion/{stem}.nii.gz", "report_file": f"report/{stem}.txt",
                        "patient_id": patient_id, "study_id": study_id, **where, "report": report,
                        "condition": patient_condition,
                        "lesions": findings, "signals": signals, "landmarks": landmarks})
    return entries


def _split(conditions: list[int], seed: int) -> dict[str, list[int]]:
    """Patient-independent split, about 60/20/20, at least one patient per split from 3 patients on.

    Patients are shuffled within each condition and interleaved, so every split mixes both conditions."""
    n = len(conditions)
    held_out = max(1, round(0.2 * n)) if n >= 3 else 0
    n_val, n_test = (held_out, held_out) if n >= 3 else (n - 1, 0)
    rng = stream_rng(seed, SPLIT)
    groups = [rng.permutation([k for k in range(n) if conditions[k] == c]).tolist() for c in (0, 1)]
    order = [k for pair in itertools.zip_longest(*groups) for k in pair if k is not None]
    return {"test": sorted(order[:n_test]), "validation": sorted(order[n_test:n_test + n_val]),
            "training": sorted(order[n_test + n_val:])}


def _check_arguments(patients: int, studies: int, size: int, seed: int, trials: int, signal_seconds: float,
                     fs: float, pool: int) -> None:
    check_int_arguments((("patients", patients, 1, None), ("studies", studies, 1, None), ("size", size, 16, 256),
                         ("seed", seed, 0, None), ("trials", trials, 1, None), ("pool", pool, 0, None)))
    if not (isinstance(signal_seconds, (int, float)) and np.isfinite(signal_seconds) and signal_seconds >= 1):
        raise UserError(f"signal_seconds: must be at least 1 second, got {signal_seconds!r}")
    if not (isinstance(fs, (int, float)) and np.isfinite(fs) and fs >= 100):
        raise UserError(f"fs: must be at least 100 Hz (the QRS complex needs it), got {fs!r}")


def make_hospital(out_dir: str | Path, *, patients: int = 8, studies: int = 2, size: int = 64, seed: int = 0,
                  trials: int = 2, signal_seconds: float = 20.0, fs: float = 250.0, two_site: bool = False,
                  pool: int = 0, progress: bool = False) -> Path:
    """Write the synthetic hospital to `out_dir` (see the module docstring) and return its manifest path.

    Volumes are (size,) * 3 voxels over a 400 mm field of view; each study has `trials` ECG/PPG records of
    `signal_seconds` at `fs` Hz. `two_site`: the test split gains as many site-B patients as it has site-A
    ones; `pool`: that many more patients (sites A and B in turn with `two_site`, else site A), images only,
    listed in pool.json. Everything is written into a temporary folder that replaces `out_dir` only
    when complete. `out_dir` must be new, empty or a previous synthetic hospital (which is replaced).
    """
    _check_arguments(patients, studies, size, seed, trials, signal_seconds, fs, pool)
    if two_site and patients < 3:
        raise UserError(f"patients: two sites need at least 3 patients (one per split), got {patients}")
    out = Path(out_dir)
    check_replaceable(out, MANIFEST_NAME, "synthetic hospital")
    conditions = [condition(int(seed), k) for k in range(patients)]
    splits = _split(conditions, int(seed))
    site_b = list(range(patients, patients + len(splits["test"]))) if two_site else []
    pooled = list(range(patients + len(site_b), patients + len(site_b) + pool))
    plan = _Plan(int(seed), int(studies), int(size), int(trials), float(signal_seconds), float(fs),
                 max(3, len(str(patients + len(site_b) + pool))))
    world = world_grid(plan.size)
    first_site = "A" if two_site else None
    with atomic_dir(out) as root:
        entries = [_write_patient(root, plan, k, conditions[k], world, first_site)
                   for k in track(range(patients), description="synthetic hospital", disable=not progress)]
        entries += [_write_patient(root, plan, k, condition(plan.seed, k), world, "B")
                    for k in track(site_b, description="site B test patients", disable=not progress or not site_b)]
        splits["test"] = splits["test"] + site_b
        synthetic = {"seed": plan.seed, "patients": patients, "studies": studies, "size": size,
                     "trials": trials, "signal_seconds": plan.seconds, "fs": plan.fs}
        sites = f", test split at sites A and B ({len(site_b)} site-B patients)" if two_site else ""
        manifest = {
            "name": MANIFEST_NAME,
            "description": f"medssl synthetic hospital: {patients} patients x {studies} CT studies "
                           f"({size}^3 voxels), {trials} ECG/PPG trial(s) per study{sites}",
            "modality": {"0": "CT"},
            "labels": {str(k): name for k, name in ORGANS.items()},
            "synthetic": {**synthetic, **({"two_site": True, "site_b_test_patients": len(site_b)} if two_site else {}),
                          **({"pool": pool} if pool else {})},
            **{name: [entry for k in members for entry in entries[k]] for name, members in splits.items()},
        }
        write_json(root / "manifest.json", manifest)
        if pool:
            pool_entries = [entry for j, k in enumerate(track(pooled, description="unlabelled pool",
                                                              disable=not progress))
                            for entry in _write_patient(root, plan, k, condition(plan.seed, k), world,
                                                        ("A", "B")[j % 2] if two_site else None, images_only=True)]
            write_json(root / "pool.json", {
                "name": POOL_NAME,
                "description": f"unlabelled pool of the synthetic hospital in {out.name}: {pool} patients x "
                               f"{studies} CT studies, images only, patients disjoint from manifest.json's",
                "modality": {"0": "CT"}, "synthetic": {**synthetic, "patients": pool, "pool_of": MANIFEST_NAME},
                "training": pool_entries, "validation": [], "test": []})
    return out / "manifest.json"
