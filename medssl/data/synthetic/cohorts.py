"""The generated cohorts by name.

`COHORTS` maps a name to its writer; `write_cohort(name, out, ...)` is what `medssl synth --cohort` and
the benchmarks call. Adding a cohort: a writer module in this package and one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from medssl.data.synthetic.hospital import make_hospital
from medssl.data.synthetic.mni152 import make_mni_cohort
from medssl.errors import UserError


@dataclass(frozen=True)
class Cohort:
    """A cohort writer: `write(out, patients=, studies=, size=, seed=, progress=, **options) -> manifest path`;
    `options` names the extra keyword arguments it accepts (e.g. the hospital's signal settings)."""

    write: Callable[..., Path]
    description: str
    options: tuple[str, ...] = ()


def _hospital(out: Path, *, patients: int, studies: int, size: int, seed: int, progress: bool, **options) -> Path:
    return make_hospital(out, patients=patients, studies=studies, size=size, seed=seed, progress=progress, **options)


def _mni152(out: Path, *, patients: int, studies: int, size: int, seed: int, progress: bool) -> Path:
    return make_mni_cohort(out, subjects=patients, studies=studies, size=size, seed=seed, progress=progress)


COHORTS: dict[str, Cohort] = {
    "hospital": Cohort(_hospital, "CT torsos with organ labels, lesions, reports and ECG/PPG",
                       options=("trials", "signal_seconds", "fs", "two_site", "pool")),
    "mni152": Cohort(_mni152, "brain-tissue MR subjects made from nilearn's MNI152 template"),
}


def write_cohort(name: str, out: str | Path, *, patients: int, studies: int, size: int, seed: int = 0,
                 progress: bool = False, **options: object) -> Path:
    """Write cohort `name` to `out`; returns its manifest. Unknown names and options are UserErrors."""
    if name not in COHORTS:
        raise UserError(f"--cohort: {name!r} is not one of {', '.join(COHORTS)}")
    cohort = COHORTS[name]
    unknown = sorted(set(options) - set(cohort.options))
    if unknown:
        raise UserError(f"--{unknown[0].replace('_', '-')}: the {name} cohort has no such setting")
    return cohort.write(Path(out), patients=patients, studies=studies, size=size, seed=seed, progress=progress,
                        **options)
