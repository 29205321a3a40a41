"""The synthetic hospital: CT-like torso volumes, organ labels, lesions, reports, ECG/PPG and a manifest.

`make_hospital` writes the embedded default data of the project (DESIGN section 5):

    vol/P001_S1.nii.gz      CT-like image, int16 Hounsfield units, (X, Y, Z) = (size,) * 3, RAS+ affine
    seg/P001_S1.nii.gz      organ labels, uint8, values in ORGANS
    lesion/P001_S1.nii.gz   lesion instances, uint8: 0 background, k = the k-th lesion of the report
    report/P001_S1.txt      free-text report (also in the manifest entry's "report")
    sig/P001_S1_T1.hea/.dat WFDB record per trial: channels ECG (mV) and PPG (NU)
    manifest.json           DESIGN 3.4 schema with patient-independent training/validation/test splits

Geometry: the field of view is 400 mm along each axis, voxels are 400/size mm isotropic and the world
origin is the volume centre. RAS+: +x is the patient's left, +y anterior, +z superior.

Anatomy: every organ is an analytic shape (an ellipsoid or an elliptic cylinder, some cut by a plane)
in a canonical body frame. A patient draws organ centres, sizes and tilts around that template, a
global scale, rotation and shift, and a smooth random deformation (a sum of random low-frequency
sine waves, i.e. random Fourier features of a smooth Gaussian field). A study of the patient adds a
small pose change and a breathing displacement around the diaphragm. Labels are evaluated exactly at
every voxel's canonical position; the patient's textures (soft-tissue grain, lung vessels, visceral
fat and bowel gas) are fields in the canonical frame resampled with one `map_coordinates` call each,
so they move with the anatomy. Then blur (scanner resolution) and white noise are added.

Lesions belong to the patient: each has an organ, a kind, a canonical centre, a diameter, a growth
factor per study and the study where it first appears (mostly the first). So the same lesion is seen
in every study from its onset on, slightly larger each time (cysts barely grow). Diameters are at
least 2 voxels so every lesion is visible at any size; a lesion whose mask ends up empty is left out
of that study (its mask, metadata and report alike). A lesion's "location" within its organ
(upper/lower, anterior/posterior, medial/lateral, or "central") compares the mask's centroid with the
organ's centroid in world coordinates, in units of the organ's spread along each axis.

Signals: each patient has a heart rate, a P-QRS-T morphology (sums of Gaussians per beat), heart-rate
variability, a pulse transit time and a PPG pulse shape; each trial shifts the heart rate and draws
its own gain, noise, baseline wander and mains interference. Condition 1 (patient-level, half of the
patients: one of each consecutive pair P001/P002, P003/P004, ...) has atrial-fibrillation-like
irregular RR intervals with fibrillatory waves instead of P waves, and/or ST depression with a wider QRS.

Determinism: every random draw comes from `np.random.SeedSequence(seed, spawn_key=(stream, patient, ...))`,
so patient k is the same whatever the number of patients requested (for a given size); only the
split assignment depends on the number of patients.

Overwriting: `out_dir` may be new, empty, or a previous synthetic hospital (its manifest.json is named
"synthetic-hospital"); a previous hospital is replaced as a whole, and only once the new one is
complete. Any other non-empty folder is refused.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.progress import track
from scipy.ndimage import gaussian_filter, gaussian_filter1d, map_coordinates
from scipy.spatial.transform import Rotation

from medssl.atomic import atomic_dir, write_json, write_text
from medssl.data import io
from medssl.data.cohort import check_int_arguments, check_replaceable
from medssl.errors import UserError

ORGANS: dict[int, str] = {0: "background", 1: "body", 2: "lung_left", 3: "lung_right", 4: "heart", 5: "liver",
                          6: "spleen", 7: "kidney_left", 8: "kidney_right", 9: "spine"}
ORGAN_TEXT: dict[str, str] = {"lung_left": "left lung", "lung_right": "right lung", "heart": "heart",
                              "liver": "liver", "spleen": "spleen", "kidney_left": "left kidney",
                              "kidney_right": "right kidney", "spine": "spine"}
LESION_KINDS: dict[str, tuple[str, ...]] = {
    "liver": ("hypodense lesion", "hyperdense lesion", "cyst"),
    "spleen": ("hypodense lesion", "cyst"),
    "kidney_left": ("cyst", "hypodense lesion", "hyperdense lesion"),
    "kidney_right": ("cyst", "hypodense lesion", "hyperdense lesion"),
    "lung_left": ("nodule", "ground-glass nodule"),
    "lung_right": ("nodule", "ground-glass nodule"),
}
SIGNAL_CHANNELS = ["ECG", "PPG"]
SIGNAL_UNITS = ["mV", "NU"]
MANIFEST_NAME = "synthetic-hospital"
FIELD_OF_VIEW_MM = 400.0

_BODY, _LUNG_L, _LUNG_R, _HEART, _LIVER, _SPLEEN, _KIDNEY_L, _KIDNEY_R, _SPINE = range(1, 10)
_AORTA, _RIB, _TABLE = 10, 11, 12   # tissues without their own label (body, body, background)
_TISSUE_LABEL = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 1, 0], dtype=np.uint8)
_TISSUE_HU = np.array([-1000, 45, -860, -860, 40, 60, 50, 32, 32, 420, 42, 450, 150], dtype=np.float32)
_TEXTURE_HU = np.array([0, 12, 25, 25, 8, 9, 8, 10, 10, 70, 5, 60, 10], dtype=np.float32)
_FAT_HU, _GAS_HU, _DISC_HU, _VESSEL_HU = -100.0, -900.0, 85.0, 600.0
_INF = np.inf

# canonical anatomy, in paint order: (tissue, centre mm, semi-axes mm, tilt xyz degrees, cut (normal, offset))
# a cut keeps the points whose normalised local coordinates u satisfy normal . u > offset
_TEMPLATE = (
    (_BODY, (0, 0, 0), (165, 115, _INF), (0, 0, 0), None),
    (_AORTA, (15, -52, 0), (12, 12, _INF), (0, 0, 0), None),
    (_LUNG_L, (72, -5, 85), (55, 80, 110), (0, 0, 0), ((0, 0, 1), -0.8)),
    (_LUNG_R, (-72, -5, 88), (58, 80, 108), (0, 0, 0), ((0, 0, 1), -0.8)),
    (_LIVER, (-50, 10, -32), (85, 80, 68), (0, 0, 10), ((-0.5, 0, 1), -0.8)),
    (_SPLEEN, (88, -42, -2), (30, 55, 45), (0, 0, -35), None),
    (_KIDNEY_L, (62, -60, -72), (26, 22, 52), (0, -12, 0), None),
    (_KIDNEY_R, (-62, -60, -82), (26, 22, 52), (0, 12, 0), None),
    (_HEART, (18, 35, 38), (58, 46, 55), (0, 0, 30), None),
    (_SPINE, (0, -82, 0), (20, 17, _INF), (0, 0, 0), None),
    (_SPINE, (0, -110, 0), (7, 16, _INF), (0, 0, 0), None),
)
_LESION_ORGANS = (_LIVER, _LUNG_L, _LUNG_R, _KIDNEY_L, _KIDNEY_R, _SPLEEN)
_LESION_ORGAN_P = (0.35, 0.125, 0.125, 0.125, 0.125, 0.15)
_LESION_DIAMETER_MM = {_LIVER: (10, 40), _SPLEEN: (8, 30), _KIDNEY_L: (8, 30), _KIDNEY_R: (8, 30),
                       _LUNG_L: (6, 25), _LUNG_R: (6, 25)}
_LESION_EDGE_MM = {"cyst": 1.5, "hypodense lesion": 5.0, "hyperdense lesion": 4.0, "nodule": 3.0,
                   "ground-glass nodule": 6.0}
_LESION_TEXTURE_HU = {"cyst": 2.0, "ground-glass nodule": 30.0}
_TEXTURE_SIGMA_MM = (5.0, 6.0, 6.0, 9.0)   # grain, vessel field a, vessel field b, fat/gas field

# report: organ groups in report order (a pair gets one plural sentence when both are normal)
_REPORT_GROUPS = (("lungs", (_LUNG_L, _LUNG_R)), ("heart", (_HEART,)), ("liver", (_LIVER,)),
                  ("spleen", (_SPLEEN,)), ("kidneys", (_KIDNEY_L, _KIDNEY_R)), ("spine", (_SPINE,)))
_FINDING_PHRASES = (
    "{a_num} {size} mm {kind} in the {where}.",
    "{where}: {kind} measuring {size} mm.",
    "there is {a_num} {size} mm {kind} in the {where}.",
    "{kind} of {size} mm in the {where}.",
    "{a_kind} {kind} measuring {size} mm is seen in the {where}.",
    "the {organ} shows {a_num} {size} mm {kind} in its {loc} part.",
)
_NORMAL_ONE = ("No focal abnormality of the {organ}.", "The {organ} is unremarkable.",
               "{organ}: no focal lesion.", "The {organ} appears normal.")
_NORMAL_PAIR = ("The {organ} are unremarkable.", "No focal abnormality of the {organ}.", "{organ}: no focal lesion.")
_NORMAL_EXTRA = {"lungs": ("The lungs are clear.",), "left lung": ("The left lung is clear.",),
                 "right lung": ("The right lung is clear.",), "heart": ("The heart is normal in size.",)}

# ECG beat template, one row per Gaussian wave: offset from the R peak (s), amplitude (mV), width (s)
_P, _Q, _R, _S, _ST, _T1, _T2 = range(7)
_ECG_WAVES = np.array([[-0.17, 0.12, 0.022], [-0.035, -0.10, 0.009], [0.0, 1.10, 0.011], [0.035, -0.28, 0.010],
                       [0.14, 0.0, 0.045], [0.25, 0.24, 0.050], [0.30, 0.12, 0.035]])
_QRS = [_Q, _R, _S]
# PPG pulse: systolic peak and diastolic wave, offsets from the pulse arrival (s), amplitude (NU), width (s)
_PPG_WAVES = np.array([[0.10, 1.0, 0.07], [0.30, 0.45, 0.09]])

# random streams (first spawn key)
_ANATOMY, _LESIONS, _HEART_STREAM, _STUDY, _TRIAL, _CONDITION, _SPLIT = range(7)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


# ----------------------------------------------------------------------------------------------- geometry


def hospital_affine(size: int) -> np.ndarray:
    """(4, 4) RAS+ affine of a size^3 volume: FIELD_OF_VIEW_MM / size isotropic, centred on the origin."""
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2 * spacing
    return affine


def _world_grid(size: int) -> np.ndarray:
    """World positions (mm) of every voxel centre: (3, size**3) float32 in C order of (X, Y, Z)."""
    axis = hospital_affine(size)[0, 3] + np.arange(size) * FIELD_OF_VIEW_MM / size
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1).astype(np.float32)


def _rotation(degrees: Sequence[float] | np.ndarray) -> np.ndarray:
    """(3, 3) float32 rotation from x, y, z Euler angles in degrees."""
    return Rotation.from_euler("xyz", degrees, degrees=True).as_matrix().astype(np.float32)


@dataclass(frozen=True)
class _Shape:
    """An ellipsoid (an infinite axis makes an elliptic cylinder), optionally cut by a plane."""

    centre: np.ndarray     # (3,) mm
    axes: np.ndarray       # (3,) semi-axes mm
    rotation: np.ndarray   # (3, 3) local -> canonical
    cut: tuple[np.ndarray, float] | None = None

    def local(self, q: np.ndarray) -> np.ndarray:
        """Normalised local coordinates (3, M) of canonical points q (3, M): inside is |u| <= 1."""
        to_local = self.rotation.T / self.axes[:, None]   # an infinite axis gives a zero row
        return to_local @ q - (to_local @ self.centre)[:, None]

    def inside(self, q: np.ndarray) -> np.ndarray:
        """(M,) bool."""
        u = self.local(q)
        mask = np.einsum("im,im->m", u, u) <= 1.0
        if self.cut is not None:
            mask &= self.cut[0] @ u > self.cut[1]
        return mask


@dataclass(frozen=True)
class _Lesion:
    organ: int
    kind: str
    centre: np.ndarray   # (3,) canonical mm
    diameter_mm: float   # at onset, world mm
    growth: float        # diameter factor per study
    onset: int           # first study (0-based) that shows it
    hu: float
    edge_mm: float


@dataclass(frozen=True)
class _Anatomy:
    """One patient: canonical organ shapes, pose, deformation, intensities, textures and lesions."""

    shapes: tuple[tuple[int, _Shape], ...]
    scale: np.ndarray        # (3,) canonical -> patient
    rotation: np.ndarray     # (3, 3)
    shift: np.ndarray        # (3,) mm
    wave_vectors: np.ndarray  # (K, 3) rad/mm, smooth deformation
    wave_phases: np.ndarray  # (K,)
    wave_amps: np.ndarray    # (K, 3) mm
    fat_radius: float        # subcutaneous fat starts at this normalised body radius
    rib_phase: float
    vertebra_mm: float
    hu: np.ndarray           # (13,) tissue base HU
    texture: np.ndarray      # (4, N, N, N) canonical fields, unit variance
    lesions: tuple[_Lesion, ...]


@dataclass(frozen=True)
class _Pose:
    rotation: np.ndarray
    shift: np.ndarray
    breath_mm: float


def _make_anatomy(seed: int, patient: int, size: int) -> _Anatomy:
    rng = _rng(seed, _ANATOMY, patient)
    shapes = []
    for tissue, centre, axes, tilt, cut in _TEMPLATE:
        jitter = np.array([2.0, 3.0, 0.0]) if tissue in (_BODY, _SPINE, _AORTA) else np.full(3, 5.0)
        shapes.append((tissue, _Shape(
            np.asarray(centre, np.float32) + (rng.normal(0, 1, 3) * jitter).astype(np.float32),
            (np.asarray(axes, np.float32) * np.exp(rng.normal(0, 0.08, 3))).astype(np.float32),
            _rotation(np.asarray(tilt) + rng.normal(0, 4, 3) * (tissue != _BODY)),
            None if cut is None else (np.asarray(cut[0], np.float32), cut[1]))))
    k = 6
    directions = rng.normal(size=(k, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    hu = _TISSUE_HU + rng.normal(0, 5, _TISSUE_HU.shape).astype(np.float32)
    hu[[0, _TABLE]] = _TISSUE_HU[[0, _TABLE]]
    anatomy = _Anatomy(
        shapes=tuple(shapes),
        scale=(np.exp(rng.normal(0, 0.06)) * np.exp(rng.normal(0, 0.03, 3))).astype(np.float32),
        rotation=_rotation(rng.normal(0, [2, 2, 4])), shift=rng.normal(0, [8, 6, 10]).astype(np.float32),
        wave_vectors=(directions * 2 * np.pi / rng.uniform(150, 350, (k, 1))).astype(np.float32),
        wave_phases=rng.uniform(0, 2 * np.pi, k).astype(np.float32),
        wave_amps=rng.normal(0, 3, (k, 3)).astype(np.float32),
        fat_radius=float(rng.uniform(0.84, 0.92)), rib_phase=float(rng.uniform(0, 1)),
        vertebra_mm=float(rng.uniform(26, 32)), hu=hu, texture=_textures(rng, size), lesions=())
    return _with_lesions(anatomy, _rng(seed, _LESIONS, patient), FIELD_OF_VIEW_MM / size)


def _textures(rng: np.random.Generator, size: int) -> np.ndarray:
    """(4, N, N, N) float32 smooth noise fields with unit variance, in the canonical frame."""
    spacing = FIELD_OF_VIEW_MM / size
    fields = []
    for sigma_mm in _TEXTURE_SIGMA_MM:
        field = gaussian_filter(rng.standard_normal((size,) * 3, dtype=np.float32), sigma_mm / spacing,
                                mode="wrap")
        fields.append(field / field.std())
    return np.stack(fields)


def _with_lesions(anatomy: _Anatomy, rng: np.random.Generator, spacing: float) -> _Anatomy:
    """Add 0-3 lesions, each centred well inside its organ (rejection sampling in the canonical frame)."""
    lesions = []
    scale = float(anatomy.scale.mean())
    for _ in range(rng.choice(4, p=[0.2, 0.35, 0.3, 0.15])):
        organ = int(rng.choice(_LESION_ORGANS, p=_LESION_ORGAN_P))
        kind = str(rng.choice(LESION_KINDS[ORGANS[organ]]))
        low, high = _LESION_DIAMETER_MM[organ]
        diameter = max(float(rng.uniform(low, high)), 2 * spacing)
        centre = _interior_point(anatomy, organ, diameter / 2 / scale, rng)
        organ_hu = float(anatomy.hu[organ])
        hu = {"hypodense lesion": organ_hu - rng.uniform(25, 45), "hyperdense lesion": organ_hu + rng.uniform(30, 60),
              "cyst": rng.uniform(0, 12), "nodule": rng.uniform(-10, 50),
              "ground-glass nodule": rng.uniform(-650, -450)}[kind]
        growth = rng.uniform(1.0, 1.03) if kind == "cyst" else rng.uniform(1.0, 1.15)
        onset = 0 if rng.random() < 0.75 else 1
        if centre is not None:
            lesions.append(_Lesion(organ, kind, centre, diameter, float(growth), onset, float(hu),
                                   _LESION_EDGE_MM[kind]))
    return dataclasses.replace(anatomy, lesions=tuple(lesions))


def _interior_point(anatomy: _Anatomy, organ: int, radius: float, rng: np.random.Generator) -> np.ndarray | None:
    """A canonical point whose ball of `radius` mm (checked at 7 points) lies in `organ`, or None."""
    shape = next(s for t, s in anatomy.shapes if t == organ)
    offsets = np.concatenate([np.zeros((1, 3)), radius * np.eye(3), -radius * np.eye(3)]).T.astype(np.float32)
    for _ in range(30):
        u = rng.normal(size=3)
        u *= 0.6 * rng.random() ** (1 / 3) / np.linalg.norm(u)
        centre = shape.centre + shape.rotation @ (shape.axes * u).astype(np.float32)
        if np.all(_tissues(anatomy, centre[:, None] + offsets) == organ):
            return centre
    return None


def _tissues(anatomy: _Anatomy, q: np.ndarray) -> np.ndarray:
    """Tissue class (M,) uint8 of canonical points q (3, M); organs are clipped to the body."""
    tissue = np.zeros(q.shape[1], np.uint8)
    body = anatomy.shapes[0][1]
    inside_body = body.inside(q)
    tissue[inside_body] = _BODY
    u = body.local(q)
    radius = np.hypot(u[0], u[1])
    rib_cycle = ((q[2] + 0.3 * q[1]) / 28.0 + anatomy.rib_phase) % 1.0
    ribs = ((radius > anatomy.fat_radius - 0.08) & (radius < anatomy.fat_radius - 0.03) & (q[2] > -60)
            & (rib_cycle < 0.35) & (np.abs(q[0]) > 20))
    tissue[ribs & inside_body] = _RIB
    for label, shape in anatomy.shapes[1:]:
        tissue[shape.inside(q) & inside_body] = label
    return tissue


# ----------------------------------------------------------------------------------------------- one study


def _canonical(anatomy: _Anatomy, pose: _Pose, world: np.ndarray) -> np.ndarray:
    """Canonical positions (3, M) of world points (3, M): study pose, breathing, deformation, patient pose."""
    s = pose.rotation.T @ (world - pose.shift[:, None])
    s[2] += pose.breath_mm * np.exp(-(s[2] / 90.0) ** 2)
    s += anatomy.wave_amps.T @ np.sin(anatomy.wave_vectors @ s + anatomy.wave_phases[:, None])
    return (anatomy.rotation.T @ (s - anatomy.shift[:, None])) / anatomy.scale[:, None]


def _texture(anatomy: _Anatomy, channel: int, q: np.ndarray) -> np.ndarray:
    """Texture field `channel` (M,) at canonical points q (3, M), trilinear."""
    size = anatomy.texture.shape[1]
    index = (q - hospital_affine(size)[0, 3]) / (FIELD_OF_VIEW_MM / size)
    return map_coordinates(anatomy.texture[channel], index, order=1, mode="mirror", prefilter=False)


def _intensities(anatomy: _Anatomy, tissue: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU (M,) float32 and the grain texture (M,) (0 in air) from tissue classes and canonical positions (3, M)."""
    grain = np.zeros(tissue.shape, np.float32)
    solid = tissue > 0
    grain[solid] = _texture(anatomy, 0, q[:, solid])
    hu = anatomy.hu[tissue] + _TEXTURE_HU[tissue] * grain
    body = tissue == _BODY
    pattern = _texture(anatomy, 3, q[:, body])   # visceral fat and bowel gas
    u = anatomy.shapes[0][1].local(q[:, body])
    radius = np.hypot(u[0], u[1])
    subcutaneous = 1 / (1 + np.exp(-(radius - anatomy.fat_radius) / 0.02))
    abdomen = 1 / (1 + np.exp(q[2, body] / 20.0))
    fat = np.clip(subcutaneous + 0.9 * abdomen * (pattern > 1.0), 0, 1)
    hu[body] = (1 - fat) * hu[body] + fat * (_FAT_HU + 10 * grain[body])
    gas = (abdomen > 0.5) & (pattern < -2.2) & (radius < anatomy.fat_radius - 0.1)
    hu[body] = np.where(gas, _GAS_HU + 40 * grain[body], hu[body])
    lungs = (tissue == _LUNG_L) | (tissue == _LUNG_R)
    vessels = _texture(anatomy, 1, q[:, lungs]) ** 2 + _texture(anatomy, 2, q[:, lungs]) ** 2
    hu[lungs] += _VESSEL_HU * np.exp(-vessels / (2 * 0.25 ** 2))
    spine = tissue == _SPINE
    hu[spine] = np.where((q[2, spine] / anatomy.vertebra_mm) % 1.0 < 0.22, _DISC_HU, hu[spine])
    return hu, grain


def _paint_lesions(anatomy: _Anatomy, study: int, hu: np.ndarray, tissue: np.ndarray, q: np.ndarray,
                   grain: np.ndarray) -> tuple[np.ndarray, list[tuple[_Lesion, float]]]:
    """Blend the lesions visible in `study` into hu (M,) in place.

    Returns the instance mask (M,) uint8 (k = k-th lesion in report order; lesions left without a voxel
    are dropped and the rest renumbered) and the (lesion, diameter mm in this study) pairs it shows.
    """
    visible = sorted((lesion for lesion in anatomy.lesions if lesion.onset <= study),
                     key=lambda lesion: _report_rank(lesion.organ))
    mask = np.zeros(hu.shape, np.uint8)
    diameters = []
    scale = float(anatomy.scale.mean())
    for k, lesion in enumerate(visible, start=1):
        diameters.append(lesion.diameter_mm * lesion.growth ** (study - lesion.onset))
        distance = np.linalg.norm(q - lesion.centre[:, None], axis=0) * scale
        weight = np.clip(0.5 + (diameters[-1] / 2 - distance) / lesion.edge_mm, 0, 1) * (tissue == lesion.organ)
        texture_hu = _LESION_TEXTURE_HU.get(lesion.kind, 8.0)
        hu[:] = (1 - weight) * hu + weight * (lesion.hu + texture_hu * grain)
        mask[weight >= 0.5] = k
    present = np.bincount(mask, minlength=len(visible) + 1)[1:] > 0
    renumber = np.zeros(len(visible) + 1, np.uint8)
    renumber[1:][present] = np.arange(1, present.sum() + 1)
    return renumber[mask], [(lesion, d) for lesion, d, keep in zip(visible, diameters, present) if keep]


def _report_rank(organ: int) -> int:
    return next(i for i, (_, organs) in enumerate(_REPORT_GROUPS) if organ in organs)


def _render_study(anatomy: _Anatomy, world: np.ndarray, study: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """One CT study: image (N, N, N) int16 HU, labels (N, N, N) uint8, lesion mask (N, N, N) uint8 and the
    findings (one dict per lesion label: label, organ, kind, location, size_mm, centre_mm)."""
    shape = (anatomy.texture.shape[1],) * 3
    pose = _Pose(_rotation(rng.normal(0, 1.5, 3)), rng.normal(0, 4, 3).astype(np.float32),
                 float(rng.uniform(-10, 10)))
    q = _canonical(anatomy, pose, world)
    tissue = _tissues(anatomy, q)
    table = (np.abs(world[0]) < 180) & (world[1] > -175) & (world[1] < -150)
    tissue[table & (tissue == 0)] = _TABLE
    hu, grain = _intensities(anatomy, tissue, q)
    mask, lesions = _paint_lesions(anatomy, study, hu, tissue, q, grain)
    noise_hu = rng.uniform(6, 12)
    image = gaussian_filter(hu.reshape(shape), 0.5) + noise_hu * rng.standard_normal(shape, dtype=np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    labels = _TISSUE_LABEL[tissue]
    midline = float(world[0, labels == _SPINE].mean())
    findings = [{"label": k, "organ": ORGANS[lesion.organ], "kind": lesion.kind,
                 "location": _location(world[:, mask == k], world[:, labels == lesion.organ], midline),
                 "size_mm": int(round(diameter)),
                 "centre_mm": [round(float(c), 1) for c in world[:, mask == k].mean(axis=1)]}
                for k, (lesion, diameter) in enumerate(lesions, start=1)]
    return image, labels.reshape(shape), mask.reshape(shape), findings


def _location(lesion: np.ndarray, organ: np.ndarray, midline: float) -> str:
    """Where a lesion (3, K world points) lies in its organ (3, M): up to two of upper/lower,
    anterior/posterior, medial/lateral (away from / towards the body midline x = `midline` mm), each
    an offset of the centroids above 0.35 organ standard deviations; "central" when none is."""
    centre = organ.mean(axis=1)
    offset = (lesion.mean(axis=1) - centre) / (organ.std(axis=1) + 1e-6)
    lateral = np.sign(centre[0] - midline) * offset[0]
    candidates = [(abs(offset[2]), 0, "upper" if offset[2] > 0 else "lower"),
                  (abs(offset[1]), 1, "anterior" if offset[1] > 0 else "posterior"),
                  (abs(lateral), 2, "lateral" if lateral > 0 else "medial")]
    strongest = sorted((c for c in candidates if c[0] > 0.35), reverse=True)[:2]
    return " ".join(word for _, _, word in sorted(strongest, key=lambda c: c[1])) or "central"


# ----------------------------------------------------------------------------------------------- reports


def _article(word: str) -> str:
    """'a' or 'an' before `word` (a number is read aloud: an 8, an 11, an 18, an 80)."""
    if word.isdigit():
        return "an" if word.startswith("8") or word in ("11", "18") else "a"
    return "an" if word[0].lower() in "aeiou" else "a"


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:]


def _finding_sentence(finding: dict, rng: np.random.Generator) -> str:
    organ = ORGAN_TEXT[finding["organ"]]
    size = str(finding["size_mm"])
    template = _FINDING_PHRASES[rng.integers(len(_FINDING_PHRASES))]
    return _sentence(template.format(a_num=_article(size), a_kind=_article(finding["kind"]), size=size,
                                     kind=finding["kind"], where=f"{finding['location']} {organ}",
                                     organ=organ, loc=finding["location"]))


def _normal_sentence(organ: str, plural: bool, rng: np.random.Generator) -> str:
    options = (_NORMAL_PAIR if plural else _NORMAL_ONE) + _NORMAL_EXTRA.get(organ, ())
    return _sentence(options[rng.integers(len(options))].format(organ=organ))


def _report(study_id: str, prior: str | None, findings: list[dict], rng: np.random.Generator) -> str:
    """Free-text report; adds each finding's sentence to it as finding["sentence"]."""
    lines = []
    for group, organs in _REPORT_GROUPS:
        names = [ORGANS[organ] for organ in organs]
        for finding in findings:
            if finding["organ"] in names:
                finding["sentence"] = _finding_sentence(finding, rng)
                lines.append(finding["sentence"])
        normal = [name for name in names if all(f["organ"] != name for f in findings)]
        if len(normal) == 2:
            lines.append(_normal_sentence(group, True, rng))
        elif normal:
            lines.append(_normal_sentence(ORGAN_TEXT[normal[0]], False, rng))
    count = len(findings)
    impression = (f"{('One', 'Two', 'Three')[count - 1]} focal lesion{'s' * (count > 1)}, see findings."
                  if count else "No focal lesion.")
    header = f"CT chest and abdomen, study {study_id}." + (f" Comparison: {prior}." if prior else "")
    return f"{header}\nFindings: {' '.join(lines)}\nImpression: {impression}\n"


# ----------------------------------------------------------------------------------------------- signals


@dataclass(frozen=True)
class _Heart:
    """A patient's cardiac profile."""

    rate_bpm: float
    ecg_waves: np.ndarray   # (7, 3) offset s, amplitude mV, width s
    ppg_waves: np.ndarray   # (2, 3) offset s, amplitude NU, width s
    transit_s: float        # R peak -> pulse arrival
    resp_hz: float
    rsa: float              # respiratory sinus arrhythmia, fraction of RR
    irregularity: float     # > 0: AF-like iid log-normal RR intervals (sd of log RR)
    f_wave_mv: float        # fibrillatory wave amplitude (AF only)
    ectopic_rate: float     # premature beats per beat


def _condition(seed: int, patient: int) -> int:
    """Patient-level condition: exactly one patient of each pair (0, 1), (2, 3), ... has condition 1."""
    first_is_ill = _rng(seed, _CONDITION, patient // 2).random() < 0.5
    return int((patient % 2 == 0) == first_is_ill)


def _make_heart(seed: int, patient: int, condition: int) -> _Heart:
    rng = _rng(seed, _HEART_STREAM, patient)
    ecg = _ECG_WAVES.copy()
    ecg[:, 0] += rng.normal(0, 0.008, 7)
    ecg[_R, 0] = 0.0
    ecg[:, 1] *= np.exp(rng.normal(0, 0.25, 7))
    ecg[_R, 1] = np.clip(ecg[_R, 1], 0.7, 1.8)
    ecg[[_T1, _T2], 1] *= min(1.0, 0.45 * ecg[_R, 1] / ecg[[_T1, _T2], 1].sum())   # the R wave dominates
    ecg[:, 2] *= np.exp(rng.normal(0, 0.12, 7))
    ppg = _PPG_WAVES.copy()
    ppg[:, 0] += rng.normal(0, 0.015, 2)
    ppg[1, 1] *= np.exp(rng.normal(0, 0.3))
    ppg[:, 2] *= np.exp(rng.normal(0, 0.15, 2))
    af_draw, ischemia_draw, irregularity, f_wave, st_mv, widening = (
        rng.random(), rng.random(), rng.uniform(0.08, 0.16), rng.uniform(0.02, 0.05), rng.uniform(0.04, 0.12),
        rng.uniform(1.2, 1.5))
    af = bool(condition) and af_draw < 0.6
    if af:
        ecg[_P, 1] *= 0.1
    if condition and (not af or ischemia_draw < 0.4):
        ecg[_ST, 1] = -st_mv
        ecg[_QRS, 2] *= widening
        ecg[[_Q, _S], 0] *= widening
    return _Heart(rate_bpm=float(rng.uniform(55, 95)), ecg_waves=ecg, ppg_waves=ppg,
                  transit_s=float(rng.uniform(0.18, 0.28)), resp_hz=float(rng.uniform(0.2, 0.33)),
                  rsa=float(rng.uniform(0.02, 0.07)), irregularity=irregularity if af else 0.0,
                  f_wave_mv=f_wave if af else 0.0, ectopic_rate=float(rng.uniform(0, 0.02)))


def _beats(heart: _Heart, rr_mean: float, seconds: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """R-peak times (B,) s and the RR interval ending at each (B,) s; the first beat precedes the recording."""
    count = int(np.ceil((seconds + 4) / (0.5 * rr_mean)))
    if heart.irregularity:
        rr = rr_mean * np.exp(heart.irregularity * rng.standard_normal(count) - heart.irregularity ** 2 / 2)
    else:
        drift = gaussian_filter1d(rng.standard_normal(count), 3)
        phase = 2 * np.pi * heart.resp_hz * rr_mean * np.arange(count) + rng.uniform(0, 2 * np.pi)
        rr = rr_mean * (1 + heart.rsa * np.sin(phase) + 0.05 * drift)
    ectopic = rng.random(count) < heart.ectopic_rate
    rr[ectopic] *= 0.65
    rr[1:][ectopic[:-1]] += 0.35 * rr_mean   # compensatory pause
    rr = np.maximum(rr, 0.3)
    times = np.cumsum(rr) - 2.0 - rng.uniform(0, rr_mean)
    keep = times < seconds + 0.5
    return times[keep], rr[keep]


def _wave_train(centres: np.ndarray, amps: np.ndarray, widths: np.ndarray, n: int, fs: float) -> np.ndarray:
    """Sum of Gaussians with centres (s), amplitudes and widths (s), all (B, W), sampled at n points -> (n,)."""
    half = int(np.ceil(4 * widths.max() * fs))
    index = np.rint(centres * fs).astype(np.int64)[..., None] + np.arange(-half, half + 1)
    values = amps[..., None] * np.exp(-0.5 * ((index / fs - centres[..., None]) / widths[..., None]) ** 2)
    valid = (index >= 0) & (index < n)
    return np.bincount(index[valid], weights=values[valid], minlength=n)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    noise = gaussian_filter1d(rng.standard_normal(n), sigma)
    return noise / (noise.std() + 1e-12)


def _trial_signals(heart: _Heart, rng: np.random.Generator, seconds: float, fs: float) -> np.ndarray:
    """One trial: (2, T) float32, ECG (mV) and PPG (NU), T = round(seconds * fs)."""
    n = int(round(seconds * fs))
    t = np.arange(n) / fs
    rr_mean = 60.0 / np.clip(heart.rate_bpm + rng.normal(0, 4), 40, 150)
    times, rr = _beats(heart, rr_mean, seconds, rng)
    breathing = np.sin(2 * np.pi * (heart.resp_hz + rng.normal(0, 0.02)) * times + rng.uniform(0, 2 * np.pi))
    ecg = heart.ecg_waves
    offsets = np.broadcast_to(ecg[:, 0], (len(times), 7)).copy()
    offsets[:, [_ST, _T1, _T2]] *= np.sqrt(rr)[:, None]   # QT follows the RR interval (Bazett)
    amps = ecg[:, 1] * np.exp(rng.normal(0, 0.05, 7)) * (1 + 0.05 * breathing)[:, None]
    widths = np.broadcast_to(ecg[:, 2], amps.shape)
    ecg_mv = _wave_train(times[:, None] + offsets, amps, widths, n, fs)
    if heart.f_wave_mv:
        frequency = rng.uniform(4.5, 7.0) + 0.8 * _smooth_noise(rng, n, fs)
        ecg_mv += heart.f_wave_mv * np.sin(2 * np.pi * np.cumsum(frequency) / fs)
    ppg = heart.ppg_waves
    stroke = (rr / rr_mean) ** 0.7 * (1 + 0.1 * breathing)
    pulses = _wave_train(times[:, None] + heart.transit_s + ppg[:, 0], stroke[:, None] * ppg[:, 1],
                         np.broadcast_to(ppg[:, 2], (len(times), 2)), n, fs)
    ppg_nu = gaussian_filter1d(pulses, 0.02 * fs)
    respiration = np.sin(2 * np.pi * heart.resp_hz * t + rng.uniform(0, 2 * np.pi))
    ecg_mv = (np.exp(rng.normal(0, 0.08)) * ecg_mv + rng.uniform(0.03, 0.2) * respiration
              + rng.uniform(0.02, 0.15) * _smooth_noise(rng, n, 1.5 * fs)
              + rng.uniform(0, 0.02) * np.sin(2 * np.pi * 50.0 * t + rng.uniform(0, 2 * np.pi))
              + rng.uniform(0.01, 0.05) * rng.standard_normal(n))
    ppg_nu = (np.exp(rng.normal(0, 0.1)) * ppg_nu + rng.uniform(0.03, 0.12) * respiration
              + rng.uniform(0.005, 0.02) * rng.standard_normal(n))
    return np.stack([ecg_mv, ppg_nu]).astype(np.float32)


# ----------------------------------------------------------------------------------------------- hospital


@dataclass(frozen=True)
class _Plan:
    seed: int
    studies: int
    size: int
    trials: int
    seconds: float
    fs: float
    width: int   # digits of patient numbers


def _write_patient(root: Path, plan: _Plan, patient: int, condition: int, world: np.ndarray) -> list[dict]:
    """Write every study and trial of one patient under root; returns the manifest entries."""
    patient_id = f"P{patient + 1:0{plan.width}d}"
    anatomy = _make_anatomy(plan.seed, patient, plan.size)
    heart = _make_heart(plan.seed, patient, condition)
    affine = hospital_affine(plan.size)
    entries = []
    for study in range(plan.studies):
        study_id = f"S{study + 1}"
        stem = f"{patient_id}_{study_id}"
        rng = _rng(plan.seed, _STUDY, patient, study)
        image, labels, mask, findings = _render_study(anatomy, world, study, rng)
        report = _report(study_id, f"S{study}" if study else None, findings, rng)
        io.write_volume(root / "vol" / f"{stem}.nii.gz", image, affine)
        io.write_volume(root / "seg" / f"{stem}.nii.gz", labels, affine)
        io.write_volume(root / "lesion" / f"{stem}.nii.gz", mask, affine)
        write_text(root / "report" / f"{stem}.txt", report)
        signals = []
        for trial in range(plan.trials):
            trial_id = f"{study_id}_T{trial + 1}"
            path = root / "sig" / f"{patient_id}_{trial_id}"
            data = _trial_signals(heart, _rng(plan.seed, _TRIAL, patient, study, trial), plan.seconds, plan.fs)
            comments = [f"synthetic hospital patient {patient_id} study {study_id} trial {trial_id}"]
            io.write_wfdb(path, io.Signal(data, plan.fs, SIGNAL_CHANNELS, SIGNAL_UNITS, path, {"comments": comments}))
            signals.append({"path": f"sig/{path.name}", "format": "wfdb", "trial_id": trial_id, "fs": plan.fs})
        entries.append({"image": f"vol/{stem}.nii.gz", "label": f"seg/{stem}.nii.gz",
                        "lesion_mask": f"lesion/{stem}.nii.gz", "report_file": f"report/{stem}.txt",
                        "patient_id": patient_id, "study_id": study_id, "report": report, "condition": condition,
                        "lesions": findings, "signals": signals})
    return entries


def _split(conditions: list[int], seed: int) -> dict[str, list[int]]:
    """Patient-independent split, about 60/20/20, at least one patient per split from 3 patients on.

    Patients are shuffled within each condition and interleaved, so every split mixes both conditions."""
    n = len(conditions)
    held_out = max(1, round(0.2 * n)) if n >= 3 else 0
    n_val, n_test = (held_out, held_out) if n >= 3 else (n - 1, 0)
    rng = _rng(seed, _SPLIT)
    groups = [rng.permutation([k for k in range(n) if conditions[k] == c]).tolist() for c in (0, 1)]
    order = [k for pair in itertools.zip_longest(*groups) for k in pair if k is not None]
    return {"test": sorted(order[:n_test]), "validation": sorted(order[n_test:n_test + n_val]),
            "training": sorted(order[n_test + n_val:])}


def _check_arguments(patients: int, studies: int, size: int, seed: int, trials: int, signal_seconds: float,
                     fs: float) -> None:
    check_int_arguments((("patients", patients, 1, None), ("studies", studies, 1, None), ("size", size, 16, 256),
                         ("seed", seed, 0, None), ("trials", trials, 1, None)))
    if not (isinstance(signal_seconds, (int, float)) and np.isfinite(signal_seconds) and signal_seconds >= 1):
        raise UserError(f"signal_seconds: must be at least 1 second, got {signal_seconds!r}")
    if not (isinstance(fs, (int, float)) and np.isfinite(fs) and fs >= 100):
        raise UserError(f"fs: must be at least 100 Hz (the QRS complex needs it), got {fs!r}")


def make_hospital(out_dir: str | Path, *, patients: int = 8, studies: int = 2, size: int = 64, seed: int = 0,
                  trials: int = 2, signal_seconds: float = 20.0, fs: float = 250.0, progress: bool = False) -> Path:
    """Write the synthetic hospital to `out_dir` (see the module docstring) and return its manifest path.

    Volumes are (size,) * 3 voxels over a 400 mm field of view; each study has `trials` ECG/PPG records of
    `signal_seconds` at `fs` Hz. Everything is written into a temporary folder that replaces `out_dir` only
    when complete. `out_dir` must be new, empty or a previous synthetic hospital (which is replaced).
    """
    _check_arguments(patients, studies, size, seed, trials, signal_seconds, fs)
    out = Path(out_dir)
    check_replaceable(out, MANIFEST_NAME, "synthetic hospital")
    plan = _Plan(int(seed), int(studies), int(size), int(trials), float(signal_seconds), float(fs),
                 max(3, len(str(patients))))
    conditions = [_condition(plan.seed, k) for k in range(patients)]
    world = _world_grid(plan.size)
    with atomic_dir(out) as root:
        entries = [_write_patient(root, plan, k, conditions[k], world)
                   for k in track(range(patients), description="synthetic hospital", disable=not progress)]
        splits = _split(conditions, plan.seed)
        manifest = {
            "name": MANIFEST_NAME,
            "description": f"medssl synthetic hospital: {patients} patients x {studies} CT studies "
                           f"({size}^3 voxels), {trials} ECG/PPG trial(s) per study",
            "modality": {"0": "CT"},
            "labels": {str(k): name for k, name in ORGANS.items()},
            "synthetic": {"seed": plan.seed, "patients": patients, "studies": studies, "size": size,
                          "trials": trials, "signal_seconds": plan.seconds, "fs": plan.fs},
            **{name: [entry for k in members for entry in entries[k]] for name, members in splits.items()},
        }
        write_json(root / "manifest.json", manifest)
    return out / "manifest.json"
