"""The preprocessed store (medssl.data.store): what it holds equals the in-memory pipeline's, crops read from it
equal the in-memory crops bit for bit, it is refused or redone when it does not fit, and memory stays bounded."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from medssl.data import io
from medssl.data import store as store_module
from medssl.data.body import body_mask
from medssl.data.manifest import load_manifest
from medssl.data.preprocessing import VolumeDataConfig, VolumePreprocessing
from medssl.data.store import OPEN_SCANS, ensure_store, open_store, preprocess, task_store
from medssl.data.synthetic.hospital import make_hospital
from medssl.data.volumes import manifest_volume_entries, whole_volume_pipeline
from medssl.downstream.segmentation.config import AugmentSettings, CropSettings
from medssl.downstream.segmentation.training import SegBatches, StoredSegVolumes
from medssl.errors import UserError
from medssl.pretrain.views import crop_region, extract_crop, extract_crop_from_region, sample_crop
from medssl.pretrain.volume_batches import VolumePretrainBatches

pytestmark = pytest.mark.usefixtures("one_thread")
PREP = VolumePreprocessing(crop_size=(24, 24, 24))


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("store") / "hospital", patients=4, studies=2, size=32, seed=2,
                         trials=1, signal_seconds=2.0)


@pytest.fixture(scope="module")
def built(hospital: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("built") / "store"
    preprocess(hospital, root, PREP, quiet=True)
    return root


def _old_body_mask(volume: np.ndarray, threshold: float) -> np.ndarray:
    """The body mask before the store (3D fill, then slice by slice): the reference the fast one must equal."""
    labels, count = ndimage.label(volume > threshold, structure=np.ones((3, 3, 3), bool))
    if count == 0:
        return np.zeros(volume.shape, bool)
    largest = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    filled = ndimage.binary_fill_holes(largest)
    for k in range(filled.shape[2]):
        filled[:, :, k] = ndimage.binary_fill_holes(filled[:, :, k])
    return filled


def test_body_mask_equals_the_3d_and_slice_fill_it_replaces() -> None:
    rng = np.random.default_rng(0)
    tube = np.zeros((20, 20, 12))
    tube[3:17, 3:17, :] = 1.0
    tube[6:10, 6:10, :] = 0.0  # a lung through every slice: open at both ends, filled slice by slice
    tube[12:15, 12:15, 4:8] = 0.0  # a closed cavity: filled in 3D
    twins = np.zeros((16, 16, 10))
    twins[1:5, 2:6, 1:4] = twins[9:13, 8:12, 5:8] = 1.0  # two components of the same size: the first in C order wins
    edges = np.ones((12, 10, 6))
    edges[4:6, 0:3, :] = 0.0  # background on the volume's edge: not a hole
    edges[5:7, 4:6, 2] = 0.0  # a hole of one slice
    fields, filled = [tube, twins, edges, np.zeros((5, 6, 7))], 0
    for trial in range(20):
        field = ndimage.gaussian_filter(rng.random((28, 24, 20)), 1.5 + trial % 3 * 0.5)
        fields.append((field - field.min()) / (field.max() - field.min()))
    for k, field in enumerate(fields):
        threshold = 0.5 if k < 4 else 0.3 + 0.4 * rng.random()
        expected = _old_body_mask(field, threshold)
        filled += bool((expected & (field <= threshold)).any())
        np.testing.assert_array_equal(body_mask(field, threshold), expected)
    assert _old_body_mask(tube, 0.5)[7, 7, 0] and _old_body_mask(tube, 0.5)[13, 13, 5] and filled >= 5
    assert body_mask(twins, 0.5)[2, 3, 2] and not body_mask(twins, 0.5)[10, 9, 6]
    assert body_mask(edges, 0.5)[5, 5, 2] and not body_mask(edges, 0.5)[5, 1, 2] and not body_mask(fields[3], 0.5).any()


def test_a_crop_from_the_region_it_covers_is_the_crop_from_the_whole_volume() -> None:
    rng = np.random.default_rng(1)
    volume = torch.rand(1, 40, 30, 26)
    for trial in range(100):
        geom = sample_crop(volume.shape[1:], rng.uniform(-8, 48, 3), (12, 10, 8), rng.uniform(0.5, 1.7),
                           rng.random(3) < 0.5, clamp=bool(trial % 2))
        lo, hi = crop_region(geom, volume.shape[1:])
        region = volume[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert torch.equal(extract_crop_from_region(region, lo, volume.shape[1:], geom), extract_crop(volume, geom))


def test_stored_arrays_equal_the_in_memory_pipeline(hospital: Path, built: Path) -> None:
    prep = VolumePreprocessing(crop_size=(40, 24, 24))  # the 32^3 volumes are padded along X when read
    store = open_store(built, prep, hospital)
    split = store.split("training")
    entries = manifest_volume_entries(load_manifest(hospital), "training", with_label=True)
    pipeline = whole_volume_pipeline(prep, with_label=True)
    for i in range(2):
        expected = pipeline(entries[i])
        image = expected["image"].as_tensor()[0].numpy()
        scan = store.scan(split.scans[i], pad_to=prep.crop_size)
        everything = (np.zeros(3, int), np.array(scan.shape))
        assert scan.shape == image.shape
        np.testing.assert_array_equal(scan.image(*everything), image)
        np.testing.assert_array_equal(scan.label(*everything), expected["label"].as_tensor()[0].numpy())
        mask = body_mask(image)
        np.testing.assert_array_equal(scan.body(*everything), mask)
        flat = np.flatnonzero(mask)
        assert scan.body_count == len(flat)
        for k in (0, 7, len(flat) // 2, len(flat) - 1):
            np.testing.assert_array_equal(scan.body_voxel(k), np.unravel_index(flat[k], mask.shape))
        label = expected["label"].as_tensor()[0].numpy()
        own = label[tuple(slice(o, o + n) for o, n in zip(scan.offset, scan.stored_shape))]  # not the padding
        assert scan.offset.tolist() == [4, 0, 0]
        assert scan.class_counts == {int(v): int(n) for v, n in zip(*np.unique(own, return_counts=True))}
        for value, count in scan.class_counts.items():
            places = scan.class_locations(value)
            assert len(places) == min(count, store_module.CLASS_LOCATIONS)
            assert (label[tuple(places.T)] == value).all()


@pytest.mark.parametrize("crop, matcher", [((24, 24, 24), "body_box"), ((40, 24, 32), "body_box"),
                                           ((16, 16, 16), "registration")])
def test_pretraining_batches_from_the_store_equal_the_in_memory_ones(hospital: Path, tmp_path: Path, crop: tuple,
                                                                    matcher: str) -> None:
    """Every tensor of every batch, bit for bit: the same draw, crops resampled from the region read only."""
    prep = VolumePreprocessing(crop_size=crop)
    preprocess(hospital, tmp_path / "store", prep, quiet=True)
    store = open_store(tmp_path / "store", prep, hospital)
    options = dict(batch_size=3, points=16, stride=4, grid=3, seed=5)
    in_memory = VolumePretrainBatches.from_manifest(hospital, "training", prep, matcher, **options)
    stored = VolumePretrainBatches.from_store(store, "training", prep, matcher, **options)
    for i in range(3):
        expected, got = in_memory[i], stored[i]
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (i, key)


def test_segmentation_crops_from_the_store_equal_the_in_memory_ones(hospital: Path, built: Path) -> None:
    store = open_store(built, PREP, hospital)
    scans = list(store.split("training").scans[:3])
    scans_data = [store.scan(s, pad_to=PREP.crop_size) for s in scans]
    images = [torch.from_numpy(s.image(np.zeros(3, int), np.array(s.shape)))[None] for s in scans_data]
    labels = [torch.from_numpy(s.label(np.zeros(3, int), np.array(s.shape)).astype(np.uint8))[None]
              for s in scans_data]
    for crops, augment in ((CropSettings(sampler="uniform"), AugmentSettings(enabled=False)),
                           (CropSettings(uniform_fraction=0.3), AugmentSettings(enabled=False)),
                           (CropSettings(uniform_fraction=0.3), AugmentSettings(affine_prob=1.0, affine_margin=4))):
        options = dict(size=3, seed=4, classes=10, crops=crops, augment=augment)
        in_memory = SegBatches(images, labels, crop=PREP.crop_size, **options)
        stored = SegBatches.from_store(store, scans, PREP, **options)
        assert isinstance(stored.volumes, StoredSegVolumes)
        for i in range(3):
            for key, value in in_memory[i].items():
                assert torch.equal(value, stored[i][key]), (crops, augment.enabled, i, key)


def test_other_settings_are_refused_by_name(hospital: Path, built: Path) -> None:
    other = VolumePreprocessing(crop_size=(24, 24, 24), window=(50.0, 350.0))
    with pytest.raises(UserError, match=r"window \[40\.0, 400\.0\] \(asked: \[50\.0, 350\.0\]\)"):
        open_store(built, other, hospital)
    with pytest.raises(UserError, match="other settings"):
        preprocess(hospital, built, other, quiet=True)
    # the crop size is not a setting of the store: another crop reads the same store
    assert open_store(built, VolumePreprocessing(crop_size=(16, 16, 16)), hospital)


def test_preprocess_redoes_a_partly_written_scan_and_keeps_the_rest(hospital: Path, built: Path,
                                                                    tmp_path: Path) -> None:
    root = shutil.copytree(built, tmp_path / "store")
    scans = sorted(p for p in (root / "scans").iterdir())
    shutil.rmtree(scans[0])
    partial = root / "scans" / f".tmp-{scans[0].name}-999"  # what a killed run leaves
    shutil.copytree(scans[1], partial)
    (partial / "scan.json").unlink()
    summary = preprocess(hospital, root, PREP, quiet=True)
    assert (summary["written"], summary["kept"]) == (1, len(scans) - 1)
    assert not partial.exists() and (scans[0] / "scan.json").is_file()
    assert preprocess(hospital, root, PREP, quiet=True)["written"] == 0


def test_a_corrupt_or_truncated_file_is_named_when_read(hospital: Path, built: Path, tmp_path: Path) -> None:
    root = shutil.copytree(built, tmp_path / "store")
    scan_id = open_store(root, PREP, hospital).split("training").scans[0]
    image = root / "scans" / scan_id / "image.b2nd"
    raw = bytearray(image.read_bytes())
    middle = len(raw) // 2
    raw[middle:middle + 16] = bytes(16)  # a flipped stretch inside a compressed chunk
    image.write_bytes(bytes(raw))
    scan = open_store(root, PREP, hospital).scan(scan_id)
    with pytest.raises(UserError, match=f"{image}.*(corrupt|checksum)"):
        scan.image(np.zeros(3, int), np.array(scan.shape))
    image.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(UserError, match=f"{image}.*(corrupt|truncated)"):
        open_store(root, PREP, hospital).scan(scan_id).image(np.zeros(3, int), np.array(scan.shape))


def test_a_changed_manifest_makes_the_store_stale(hospital: Path, built: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(hospital.parent, tmp_path / "copy", ignore=shutil.ignore_patterns(".medssl-store"))
    manifest = folder / "manifest.json"
    preprocess(manifest, folder / "store", PREP, quiet=True)
    tree = json.loads(manifest.read_text())
    tree["training"] = tree["training"][:-1]
    manifest.write_text(json.dumps(tree))
    with pytest.raises(UserError, match="stale"):
        open_store(folder / "store", PREP, manifest)
    data = VolumeDataConfig(manifest=manifest, store=folder / "store", crop_size=PREP.crop_size)
    with pytest.raises(UserError, match="stale"):  # a store the user named is not rebuilt behind their back
        ensure_store(data, PREP)


def test_a_small_cohort_without_a_store_gets_a_temporary_one_and_a_large_one_is_told(
        hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = shutil.copytree(hospital.parent, tmp_path / "copy", ignore=shutil.ignore_patterns(".medssl-store"))
    data = VolumeDataConfig(manifest=folder / "manifest.json", crop_size=PREP.crop_size)
    store, prep = task_store(data)
    assert prep == PREP and store.temporary is not None and store.root == store.temporary.path
    assert not (folder / ".medssl-store").exists()  # nothing written beside the data
    temporary = store.root
    del store
    assert not temporary.exists()
    preprocess(folder / "manifest.json", store_module.default_store_path(folder / "manifest.json", PREP), PREP,
               quiet=True)
    store, _ = task_store(data)  # now found beside the manifest, from its index alone
    assert store.temporary is None and store.root.parent == folder / ".medssl-store"
    monkeypatch.setattr(store_module, "AUTO_BUILD_SCANS", 2)
    shutil.rmtree(folder / ".medssl-store")
    with pytest.raises(UserError, match="run medssl preprocess"):
        task_store(data)


def test_memory_is_bounded_whatever_the_number_of_entries(hospital: Path, tmp_path: Path) -> None:
    """3000 entries behind the training files: building the batches and reading them allocates a few MiB (the
    index), and a process never holds more than OPEN_SCANS scans open."""
    tree = json.loads(hospital.read_text())
    files = tree["training"]
    many = dict(tree, training=[{"image": str(hospital.parent / files[i % len(files)]["image"]),
                                 "patient_id": f"P{i:05d}", "study_id": "S1"} for i in range(3000)],
                validation=[], test=[])
    manifest = tmp_path / "many.json"
    manifest.write_text(json.dumps(many))
    preprocess(manifest, tmp_path / "store", PREP, quiet=True)
    tracemalloc.start()
    store = open_store(tmp_path / "store", PREP, manifest)
    batches = VolumePretrainBatches.from_store(store, "training", PREP, batch_size=4, points=16, seed=0)
    for i in range(3):
        batches[i]
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 24 * 2**20, peak  # an in-memory cohort of 8 volumes alone is 1 MiB each, plus masks
    assert len(store._open) <= OPEN_SCANS
    for scan in store.scan_ids:
        for edge in range(8, 8 + OPEN_SCANS):  # more (scan, padding) pairs than may stay open
            store.scan(scan, pad_to=(edge, edge, edge))
    assert len(store._open) == OPEN_SCANS


# ------------------------------------------------------------------------------------------------ the command


def _medssl(*argv: str, cwd: Path, file_limit: int | None = None) -> subprocess.CompletedProcess:
    def limit() -> None:
        if file_limit is not None:  # a disk that fills: writes past this size fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-m", "medssl", *argv], cwd=cwd, capture_output=True, encoding="utf-8",
                          errors="replace", timeout=600, preexec_fn=limit, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_line_error(done: subprocess.CompletedProcess, needle: str) -> None:
    """Exit 2, one error line naming the problem (among the progress bar's lines), no traceback."""
    errors = [line[line.index("error: "):] for line in done.stderr.replace("\r", "\n").splitlines()
              if "error: " in line]
    assert done.returncode == 2, done.stderr
    assert len(errors) == 1 and needle in errors[0], done.stderr
    assert "Traceback" not in done.stderr


def _complete(store: Path) -> None:
    """Nothing half-written: no temporary scan folder, every scan folder complete."""
    scans = store / "scans"
    assert not list(scans.glob(".tmp-*"))
    for scan in scans.iterdir():
        assert {"scan.json", "image.b2nd", "body.b2nd"} <= {p.name for p in scan.iterdir()}


def test_preprocess_command_names_a_failing_scan_and_leaves_only_complete_scans(hospital: Path,
                                                                                 tmp_path: Path) -> None:
    folder = shutil.copytree(hospital.parent, tmp_path / "copy", ignore=shutil.ignore_patterns(".medssl-store"))
    tree = json.loads((folder / "manifest.json").read_text())
    bad = folder / tree["training"][1]["image"]
    image = io.read_volume(bad)
    array = image.array.copy()
    array[3, 3, 3] = np.nan
    io.write_volume(bad, array, image.affine)
    done = _medssl("preprocess", "-c", "pretrain_volume_tiny", "data.manifest=copy/manifest.json",
                   "data.store=store", "--workers", "2", cwd=tmp_path)
    _one_line_error(done, f"{bad}: training[1]: 1 NaN/inf voxel(s)")
    assert not (tmp_path / "store" / "index.json").exists()
    _complete(tmp_path / "store")
    assert len(list((tmp_path / "store" / "scans").iterdir())) == len(
        {e["image"] for s in ("training", "validation", "test") for e in tree[s]}) - 1


def test_preprocess_command_on_a_full_disk_says_so_and_leaves_only_complete_scans(hospital: Path,
                                                                                   tmp_path: Path) -> None:
    done = _medssl("preprocess", "-c", "pretrain_volume_tiny", f"data.manifest={hospital}", "data.store=store",
                   "--workers", "1", cwd=tmp_path, file_limit=48 * 1024)
    _one_line_error(done, f"data.store: {tmp_path / 'store'}: disk full while writing")
    assert not (tmp_path / "store" / "index.json").exists()
    _complete(tmp_path / "store")


def test_training_on_a_corrupt_store_names_the_file(hospital: Path, built: Path, tmp_path: Path) -> None:
    root = shutil.copytree(built, tmp_path / "store")
    for image in (root / "scans").glob("*/image.b2nd"):
        raw = bytearray(image.read_bytes())
        raw[len(raw) // 2: len(raw) // 2 + 64] = bytes(64)
        image.write_bytes(bytes(raw))
    done = _medssl("pretrain", "volume", "-c", "pretrain_volume_tiny", f"data.manifest={hospital}",
                   "data.store=store", "data.crop_size=[32,32,32]", "probe.enabled=false", "train.steps=2",
                   "-o", "run", cwd=tmp_path)
    _one_line_error(done, "image.b2nd: ")
    assert str(root / "scans") in done.stderr and "run medssl preprocess again" in done.stderr
