"""A real-anatomy brain tissue cohort made from the MNI152 template that ships with nilearn.

`make_mni_cohort` writes a cohort that pretraining and fine-tuning read like any other::

    vol/M001_S1.nii.gz   T1-weighted MR-like image, float32, (size,) * 3 voxels, RAS+ affine in MNI mm
    seg/M001_S1.nii.gz   tissue labels, uint8: 0 background, 1 CSF / other brain, 2 grey matter, 3 white matter
    dataset.json         decathlon-style labels and modality (MR)
    manifest.json        DESIGN 3.4 schema (`build_manifest`), patient-independent training/validation/test
                         splits (about 60/20/20 by subject, at least one subject per split from 3 subjects on)

Source: nilearn's MNI152 2009 template at 2 mm (`load_mni152_template`, `load_mni152_gm_template`,
`load_mni152_wm_template`, `load_mni152_brain_mask`; bundled, no download): a skull-stripped T1
(99 x 117 x 95 voxels) with grey- and white-matter probability maps and a brain mask. Tissue
probabilities: background = 1 - mask, CSF/other = mask x (1 - GM - WM) clipped to [0, 1], grey
matter = mask x GM, white matter = mask x WM; the label is their argmax.

Resolution: each volume is a cube of FOV_MM = 192 mm centred on the brain mask's centre (MNI
(0, -17, 5) mm; the brain spans 146 x 180 x 156 mm), sampled with `size` voxels per axis: 4 mm voxels
at the default size 48 (3 mm at 64) so that CPU training stays cheap. The template is Gaussian
pre-filtered against aliasing (sigma = (factor - 1) / 2 template voxels, factor = voxel size / 2 mm,
as skimage's rescale does) before it is sampled.

Subjects: subject k draws a pose (rotation up to ROTATION_DEG about each axis, isotropic scale in
SCALE_RANGE with a few % anisotropy, shift up to SHIFT_MM) and a smooth random deformation (white noise
Gaussian-filtered with DEFORM_SMOOTH_MM, each component scaled to DEFORM_MM std). One coordinate map
per scan (`map_coordinates`, linear) samples the T1 and the tissue probabilities together, so image
and labels are deformed alike and stay aligned. Each study (scan) of a subject adds a small pose
jitter and its own acquisition: a multiplicative smooth bias field (exp of a smooth field with 5-20 %
std), a gamma change of the contrast, a gain and Rician noise (2-5 % of the gain). So studies of one
subject share their anatomy (scan-rescan pairs for patient-level pretraining objectives).

Determinism: every draw comes from `numpy_generator(seed, stream, subject[, study])`, so subject k
is the same whatever the number of subjects; only the split depends on it. Writing is atomic: the
cohort replaces `out_dir` only when complete, and `out_dir` must be new, empty or a previous MNI cohort.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from medssl.atomic import atomic_dir, write_json
from medssl.data import io
from medssl.data.synthetic.writing import check_int_arguments, check_replaceable
from medssl.data.manifest import write_manifest
from medssl.data.manifest_build import build_manifest
from medssl.seeding import numpy_generator

MANIFEST_NAME = "mni152-tissue"
TISSUES: dict[int, str] = {0: "background", 1: "csf_other", 2: "grey_matter", 3: "white_matter"}
TEMPLATE_MM = 2.0
FOV_MM = 192.0
ROTATION_DEG = 6.0
SCALE_RANGE = (0.9, 1.05)
ANISOTROPY = 0.03
SHIFT_MM = 4.0
DEFORM_MM = 3.0
DEFORM_SMOOTH_MM = 24.0
STUDY_ROTATION_DEG = 2.0
STUDY_SHIFT_MM = 2.0
BIAS_SMOOTH_MM = 48.0
_SUBJECT, _STUDY, _SPLIT = 1, 2, 3  # random streams


@dataclass(frozen=True)
class _Template:
    """The template on its 2 mm grid: T1 (X, Y, Z) in [0, 1] and tissue probabilities (4, X, Y, Z)."""

    t1: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray  # voxel -> MNI mm
    centre: np.ndarray  # (3,) MNI mm, centre of the brain mask's bounding box


@functools.lru_cache(maxsize=4)
def load_template(spacing: float) -> _Template:
    """nilearn's MNI152 2 mm template, pre-filtered for sampling at `spacing` mm (cached)."""
    from nilearn import datasets

    def array(loader) -> np.ndarray:
        return np.asarray(loader(resolution=2).dataobj, dtype=np.float32)

    t1_img = datasets.load_mni152_template(resolution=2)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32).clip(0, None)
    gm, wm = array(datasets.load_mni152_gm_template), array(datasets.load_mni152_wm_template)
    mask = array(datasets.load_mni152_brain_mask) > 0
    inside = mask.astype(np.float32)
    tissue = np.stack([1.0 - inside, inside * np.clip(1.0 - gm - wm, 0.0, 1.0), inside * gm, inside * wm])
    sigma = max(0.0, (spacing / TEMPLATE_MM - 1.0) / 2.0)
    if sigma > 0:
        t1 = gaussian_filter(t1, sigma)
        tissue = np.stack([gaussian_filter(p, sigma) for p in tissue])
    corners = np.argwhere(mask)
    middle = (corners.min(axis=0) + corners.max(axis=0)) / 2.0
    centre = t1_img.affine[:3, :3] @ middle + t1_img.affine[:3, 3]
    return _Template(t1, tissue.astype(np.float32), t1_img.affine.astype(np.float64), centre)


def cohort_affine(size: int, centre: np.ndarray) -> np.ndarray:
    """(4, 4) RAS+ affine of a `size`^3 grid of FOV_MM / size mm voxels centred on `centre` (MNI mm)."""
    spacing = FOV_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = centre - spacing * (size - 1) / 2.0
    return affine


def _smooth_field(rng: np.random.Generator, size: int, sigma_mm: float, std: float, channels: int) -> np.ndarray:
    """(channels, size, size, size) smooth random field, each channel scaled to standard deviation `std`."""
    sigma = sigma_mm / (FOV_MM / size)
    fields = np.stack([gaussian_filter(rng.standard_normal((size,) * 3), sigma, mode="wrap")
                       for _ in range(channels)])
    return fields * (std / fields.reshape(channels, -1).std(axis=1).clip(1e-12))[:, None, None, None]


def _pose(rng: np.random.Generator, rotation_deg: float, shift_mm: float, scale: tuple[float, float] | None
          ) -> tuple[np.ndarray, np.ndarray]:
    """(3, 3) linear map (template -> subject) and (3,) shift in mm."""
    matrix = Rotation.from_euler("xyz", rng.uniform(-rotation_deg, rotation_deg, 3), degrees=True).as_matrix()
    if scale is not None:
        matrix = matrix @ np.diag(rng.uniform(*scale) * (1.0 + rng.uniform(-ANISOTROPY, ANISOTROPY, 3)))
    return matrix, rng.uniform(-shift_mm, shift_mm, 3)


def _sample(template: _Template, size: int, poses: list[tuple[np.ndarray, np.ndarray]],
            displacement: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """T1 (X, Y, Z) and labels (X, Y, Z) of one scan.

    Target voxel -> world x -> template point c + M^-1 (x - c - t) (poses applied in order, inverted in
    reverse) + displacement(x) -> template voxel; T1 and probabilities are sampled with the same map.
    """
    affine = cohort_affine(size, template.centre)
    grid = np.indices((size,) * 3, dtype=np.float64).reshape(3, -1)
    point = affine[:3, :3] @ grid + affine[:3, 3:]
    centre = template.centre[:, None]
    for matrix, shift in reversed(poses):
        point = centre + np.linalg.solve(matrix, point - centre - shift[:, None])
    point += displacement.reshape(3, -1)
    voxel = np.linalg.solve(template.affine[:3, :3], point - template.affine[:3, 3:])
    shape = (size,) * 3
    t1 = map_coordinates(template.t1, voxel, order=1, cval=0.0).reshape(shape)
    probs = np.stack([map_coordinates(p, voxel, order=1, cval=1.0 if c == 0 else 0.0)
                      for c, p in enumerate(template.tissue)])
    return t1.astype(np.float32), probs.argmax(axis=0).reshape(shape).astype(np.uint8)


def _acquire(t1: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """MR-like image of a scan: gamma, smooth bias field, gain and Rician noise -> float32 (X, Y, Z)."""
    bias = np.exp(_smooth_field(rng, size, BIAS_SMOOTH_MM, rng.uniform(0.05, 0.2), 1)[0])
    gain = rng.uniform(700.0, 1300.0)
    signal = gain * bias * t1 ** rng.uniform(0.8, 1.25)
    sigma = gain * rng.uniform(0.02, 0.05)
    real = signal + rng.normal(0.0, sigma, signal.shape)
    imaginary = rng.normal(0.0, sigma, signal.shape)
    return np.sqrt(real**2 + imaginary**2).astype(np.float32)


def _write_subject(root: Path, template: _Template, subject: int, studies: int, size: int, seed: int,
                   width: int) -> None:
    rng = numpy_generator(seed, _SUBJECT, subject)
    anatomy = _pose(rng, ROTATION_DEG, SHIFT_MM, SCALE_RANGE)
    displacement = _smooth_field(rng, size, DEFORM_SMOOTH_MM, DEFORM_MM, 3)
    affine = cohort_affine(size, template.centre)
    for study in range(studies):
        scan = numpy_generator(seed, _STUDY, subject, study)
        jitter = _pose(scan, STUDY_ROTATION_DEG, STUDY_SHIFT_MM, None)
        t1, labels = _sample(template, size, [anatomy, jitter], displacement)
        stem = f"M{subject + 1:0{width}d}_S{study + 1}"
        io.write_volume(root / "vol" / f"{stem}.nii.gz", _acquire(t1, scan, size), affine)
        io.write_volume(root / "seg" / f"{stem}.nii.gz", labels, affine)


def _check_arguments(subjects: int, studies: int, size: int, seed: int) -> None:
    check_int_arguments((("subjects", subjects, 1, None), ("studies", studies, 1, None), ("size", size, 16, 128),
                         ("seed", seed, 0, None)))


def make_mni_cohort(out_dir: str | Path, *, subjects: int = 12, studies: int = 1, size: int = 48, seed: int = 0,
                    progress: bool = False) -> Path:
    """Write the MNI152 tissue cohort (module docstring) to `out_dir`; returns the manifest path.

    `subjects` x `studies` volumes of `size`^3 voxels (FOV_MM / size mm). Deterministic per `seed`.
    """
    _check_arguments(subjects, studies, size, seed)
    out = Path(out_dir)
    check_replaceable(out, MANIFEST_NAME, "MNI cohort")
    template = load_template(FOV_MM / size)
    width = max(3, len(str(subjects)))
    with atomic_dir(out) as root:
        for subject in track(range(subjects), description="MNI152 cohort", disable=not progress):
            _write_subject(root, template, subject, int(studies), int(size), int(seed), width)
        write_json(root / "dataset.json", {"name": MANIFEST_NAME, "modality": {"0": "MR"},
                                           "labels": {str(k): v for k, v in TISSUES.items()}})
        manifest, warnings = build_manifest(root, name=MANIFEST_NAME, modality="MR",
                                            seed=int(numpy_generator(seed, _SPLIT).integers(2**31)))
        if warnings:
            raise RuntimeError(f"MNI cohort: unexpected manifest warnings: {warnings}")
        manifest["description"] = (f"MNI152 2009 tissue cohort (nilearn template): {subjects} subjects x {studies} "
                                   f"MR studies, {size}^3 voxels of {FOV_MM / size:.3g} mm")
        manifest["mni_cohort"] = {"seed": int(seed), "subjects": int(subjects), "studies": int(studies),
                                  "size": int(size), "spacing_mm": FOV_MM / size}
        write_manifest(manifest, root / "manifest.json")
    return out / "manifest.json"
