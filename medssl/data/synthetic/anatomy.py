"""CT-like torsos of the synthetic hospital: anatomy per patient, one rendered study at a time.

Geometry: the field of view is 400 mm along each axis, voxels are 400/size mm isotropic and the world
origin is the volume centre. World coordinates are RAS+: +x is the patient's right, +y anterior, +z
superior. The anatomy template is written in a frame whose +x is the patient's LEFT (left lung at
+72 mm), so world x is mirrored on the way into that frame (`_canonical`): the liver ends up on the
patient's right, the spleen and most of the heart on the left, as in a real torso.

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

Sites (`SITES`): the scanner profile a study is rendered with. Site "A" is the hospital as it always was
(unenhanced, blur 0.5 voxel, noise 6-12 HU). Site "B" is another scanner and protocol: a portal-venous
contrast phase (organ enhancement over the unenhanced HU: liver +50, spleen +70, kidneys +120, heart blood
pool +100, aorta +130, soft tissue +10; lesions keep their own values, so hypodense ones stand out more), a
low-dose acquisition (noise x 2, as a quarter of the dose gives) and a smoother reconstruction kernel
(Gaussian blur 1.0 voxel instead of 0.5). Site A draws and computes exactly what it did before sites
existed, so every earlier cohort stays byte-identical.

Landmarks (`LANDMARKS`): points fixed in each patient's canonical anatomy (organ poles and centres, lung
bases, vertebral-body centres), mapped to world RAS mm for each study by inverting the study's
world -> canonical map (`_world`: Newton steps through the smooth deformation and the breathing shift), so
the same landmark is the same anatomical point in every patient and study.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, map_coordinates
from scipy.spatial.transform import Rotation

from medssl.data.synthetic.reports import GRAMMAR, report_rank
from medssl.data.synthetic.streams import ANATOMY, LESIONS, stream_rng

ORGANS: dict[int, str] = {0: "background", 1: "body", 2: "lung_left", 3: "lung_right", 4: "heart", 5: "liver",
                          6: "spleen", 7: "kidney_left", 8: "kidney_right", 9: "spine"}
FIELD_OF_VIEW_MM = 400.0
_WORLD_TO_TEMPLATE = np.array([-1.0, 1.0, 1.0], dtype=np.float32)  # RAS+ (x = right) -> template (x = left)

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


@dataclass(frozen=True)
class SiteProfile:
    """A scanner and protocol: HU added per tissue (contrast enhancement, indexed like `_TISSUE_HU`), a factor
    on the study's noise level and the Gaussian blur (voxels) of the reconstruction."""

    name: str
    enhancement_hu: tuple[float, ...]
    noise_factor: float
    blur_voxels: float


def _enhancement(**hu: float) -> tuple[float, ...]:
    tissues = {"body": _BODY, "heart": _HEART, "liver": _LIVER, "spleen": _SPLEEN, "kidneys": (_KIDNEY_L, _KIDNEY_R),
               "aorta": _AORTA}
    table = np.zeros(len(_TISSUE_HU))
    for name, value in hu.items():
        table[list(np.atleast_1d(tissues[name]))] = value
    return tuple(float(v) for v in table)


SITES: dict[str, SiteProfile] = {
    "A": SiteProfile("A", (0.0,) * len(_TISSUE_HU), 1.0, 0.5),
    "B": SiteProfile("B", _enhancement(body=10, heart=100, liver=50, spleen=70, kidneys=120, aorta=130), 2.0, 1.0),
}


def hospital_affine(size: int) -> np.ndarray:
    """(4, 4) RAS+ affine of a size^3 volume: FIELD_OF_VIEW_MM / size isotropic, centred on the origin."""
    spacing = FIELD_OF_VIEW_MM / size
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -(size - 1) / 2 * spacing
    return affine


def world_grid(size: int) -> np.ndarray:
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


def make_anatomy(seed: int, patient: int, size: int) -> _Anatomy:
    rng = stream_rng(seed, ANATOMY, patient)
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
    return _with_lesions(anatomy, stream_rng(seed, LESIONS, patient), FIELD_OF_VIEW_MM / size)


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
        kind = str(rng.choice(GRAMMAR.lesion_kinds[ORGANS[organ]]))
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
    """Canonical positions (3, M) of world points (3, M): RAS+ world mirrored to the template's left-is-+x
    frame, then study pose, breathing, deformation, patient pose."""
    s = pose.rotation.T @ (world * _WORLD_TO_TEMPLATE[:, None] - pose.shift[:, None])
    s[2] += pose.breath_mm * np.exp(-(s[2] / 90.0) ** 2)
    s += anatomy.wave_amps.T @ np.sin(anatomy.wave_vectors @ s + anatomy.wave_phases[:, None])
    return (anatomy.rotation.T @ (s - anatomy.shift[:, None])) / anatomy.scale[:, None]


def _world(anatomy: _Anatomy, pose: _Pose, q: np.ndarray, iterations: int = 20) -> np.ndarray:
    """World positions (3, M) float64 of canonical points q (3, M): the inverse of `_canonical` (Newton steps
    through the deformation and the breathing shift; the rest is affine)."""
    s2 = anatomy.rotation.astype(np.float64) @ (q * anatomy.scale[:, None]) + anatomy.shift[:, None]
    amps, vectors = anatomy.wave_amps.astype(np.float64), anatomy.wave_vectors.astype(np.float64)
    s1 = s2.copy()
    for _ in range(iterations):   # s1 + amps.T sin(vectors s1 + phases) = s2
        phase = vectors @ s1 + anatomy.wave_phases[:, None]
        residual = s1 + amps.T @ np.sin(phase) - s2
        jacobian = np.eye(3) + np.einsum("ki,km,kj->mij", amps, np.cos(phase), vectors)
        s1 = s1 - np.linalg.solve(jacobian, residual.T[..., None])[..., 0].T
    s0 = s1.copy()
    for _ in range(iterations):   # z + breath exp(-(z / 90)^2) = s1_z
        bump = pose.breath_mm * np.exp(-(s0[2] / 90.0) ** 2)
        s0[2] -= (s0[2] + bump - s1[2]) / (1 - 2 * s0[2] / 90.0 ** 2 * bump)
    return (pose.rotation.astype(np.float64) @ s0 + pose.shift[:, None]) * _WORLD_TO_TEMPLATE[:, None]


# landmarks: (name, tissue, normalised local coordinates u of the organ's shape: inside is |u| <= 1)
_ORGAN_LANDMARKS = (
    ("liver_dome", _LIVER, (0, 0, 1)), ("liver_centre", _LIVER, (0, 0, 0)),
    ("spleen_centre", _SPLEEN, (0, 0, 0)), ("spleen_lower_pole", _SPLEEN, (0, 0, -1)),
    ("heart_centre", _HEART, (0, 0, 0)),
    ("kidney_left_upper_pole", _KIDNEY_L, (0, 0, 1)), ("kidney_left_lower_pole", _KIDNEY_L, (0, 0, -1)),
    ("kidney_right_upper_pole", _KIDNEY_R, (0, 0, 1)), ("kidney_right_lower_pole", _KIDNEY_R, (0, 0, -1)),
    ("lung_left_base", _LUNG_L, (0, 0, -0.8)), ("lung_right_base", _LUNG_R, (0, 0, -0.8)),
)
# vertebral bodies: the k-th vertebra counted from canonical z = 0 (discs fill the first 22 % of each period)
_VERTEBRAE = (("vertebra_lower", -3), ("vertebra_middle", 0), ("vertebra_upper", 3))
LANDMARKS: tuple[str, ...] = tuple(name for name, *_ in _ORGAN_LANDMARKS) + tuple(name for name, _ in _VERTEBRAE)


def _canonical_landmarks(anatomy: _Anatomy) -> np.ndarray:
    """(3, L) canonical positions of `LANDMARKS` for this patient."""
    shapes = {}
    for tissue, shape in anatomy.shapes:
        shapes.setdefault(tissue, shape)   # the spine's first shape is the vertebral body
    points = [shapes[t].centre + shapes[t].rotation @ (shapes[t].axes * np.asarray(u, np.float32))
              for _, t, u in _ORGAN_LANDMARKS]
    spine = shapes[_SPINE]
    axis = spine.rotation[:, 2]   # the cylinder's axis
    for _, k in _VERTEBRAE:
        z = (k + 0.61) * anatomy.vertebra_mm
        points.append(spine.centre + axis * (z - spine.centre[2]) / axis[2])
    return np.stack(points, axis=1).astype(np.float64)


def landmarks(anatomy: _Anatomy, pose: _Pose) -> dict[str, list[float]]:
    """{name: [x, y, z]} world RAS mm (0.1 mm) of every landmark of `LANDMARKS` in a study with `pose`."""
    world = _world(anatomy, pose, _canonical_landmarks(anatomy))
    return {name: [round(float(c), 1) for c in world[:, k]] for k, name in enumerate(LANDMARKS)}


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
                     key=lambda lesion: report_rank(ORGANS[lesion.organ]))
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


def render_study(anatomy: _Anatomy, world: np.ndarray, study: int, rng: np.random.Generator,
                 site: SiteProfile = SITES["A"]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict], dict]:
    """One CT study at `site`: image (N, N, N) int16 HU, labels (N, N, N) uint8, lesion mask (N, N, N) uint8,
    the findings (one dict per lesion label: label, organ, kind, location, size_mm, centre_mm, lesion_id, the
    lesion's index among the patient's lesions, the same in every study) and the landmarks ({name: [x, y, z]}
    world RAS mm, `LANDMARKS`)."""
    shape = (anatomy.texture.shape[1],) * 3
    pose = _Pose(_rotation(rng.normal(0, 1.5, 3)), rng.normal(0, 4, 3).astype(np.float32),
                 float(rng.uniform(-10, 10)))
    q = _canonical(anatomy, pose, world)
    tissue = _tissues(anatomy, q)
    table = (np.abs(world[0]) < 180) & (world[1] > -175) & (world[1] < -150)
    tissue[table & (tissue == 0)] = _TABLE
    if any(site.enhancement_hu):
        anatomy = dataclasses.replace(anatomy, hu=anatomy.hu + np.asarray(site.enhancement_hu, np.float32))
    hu, grain = _intensities(anatomy, tissue, q)
    mask, lesions = _paint_lesions(anatomy, study, hu, tissue, q, grain)
    noise_hu = rng.uniform(6, 12) * site.noise_factor
    image = (gaussian_filter(hu.reshape(shape), site.blur_voxels)
             + noise_hu * rng.standard_normal(shape, dtype=np.float32))
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    labels = _TISSUE_LABEL[tissue]
    midline = float(world[0, labels == _SPINE].mean())
    findings = [{"label": k, "organ": ORGANS[lesion.organ], "kind": lesion.kind,
                 "location": _location(world[:, mask == k], world[:, labels == lesion.organ], midline),
                 "size_mm": int(round(diameter)),
                 "centre_mm": [round(float(c), 1) for c in world[:, mask == k].mean(axis=1)],
                 "lesion_id": next(j for j, own in enumerate(anatomy.lesions) if own is lesion)}
                for k, (lesion, diameter) in enumerate(lesions, start=1)]
    return image, labels.reshape(shape), mask.reshape(shape), findings, landmarks(anatomy, pose)


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
