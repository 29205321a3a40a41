"""Anatomical correspondence (medssl.correspondence, `medssl match`, `medssl bench correspondence`): descriptor
geometry, identity on the same scan, baselines, bad input, and the benchmark on a tiny hospital."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medssl.bench.correspondence import correspondence_benchmark, tasks
from medssl.cli import main
from medssl.correspondence import (Correspondence, EmbeddingMatcher, GeometricMatcher, guess_modality, match_point,
                                   sample_descriptors)
from medssl.data.preprocessing import VolumePreprocessing
from medssl.data.synthetic.hospital import make_hospital
from medssl.errors import UserError
from medssl.models.volume_encoders import VolumeEncoderConfig, build_volume_encoder
from medssl.training.pretrained import export_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hospital(tmp_path_factory) -> Path:
    """3 patients x 2 studies at 32^3 (12.5 mm voxels), landmarks and lesions; test split: one patient."""
    return make_hospital(tmp_path_factory.mktemp("corr") / "h", patients=3, studies=2, size=32, seed=2, trials=1,
                         signal_seconds=2.0)


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A random-weight "volume-encoder" checkpoint (BasicUNet width 4, CT window)."""
    config = VolumeEncoderConfig(width=4)
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("enc") / "encoder.pt"
    export_encoder(path, build_volume_encoder(config), config, VolumePreprocessing(crop_size=(32, 32, 32)).to_dict(),
                   {}, step=1)
    return path


def _entries(manifest: Path) -> list[dict]:
    data = json.loads(manifest.read_text())
    return [e for split in ("training", "validation", "test") for e in data[split]]


def test_descriptors_sample_each_scale_where_the_point_falls():
    """A stride-s map's cell i covers input voxels [s i, s (i + 1)): its centre s i + (s - 1) / 2 reads cell i."""
    maps = [torch.arange(4.0).view(1, 1, 4, 1, 1).expand(1, 1, 4, 4, 4).clone(), torch.ones(1, 1, 2, 2, 2)]
    maps[0] = torch.cat([maps[0], torch.ones_like(maps[0])], dim=1)   # (x index, 1): its direction encodes x
    centres = torch.tensor([[2 * i + 0.5, 3.0, 3.0] for i in range(4)])
    d = sample_descriptors(maps, [2, 4], centres)
    assert d.shape == (4, 3)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(4))
    expected = torch.nn.functional.normalize(torch.tensor([[i, 1.0] for i in range(4)]), dim=1) / 2 ** 0.5
    torch.testing.assert_close(d[:, :2], expected)


def test_guess_modality():
    assert guess_modality(np.full((4, 4, 4), -1000.0))[0] == "CT"
    assert guess_modality(np.linspace(0, 500, 64))[0] == "MR"


def test_a_scan_matched_to_itself_gives_the_point_back(hospital, encoder):
    entry = _entries(hospital)[0]
    image, points = str(hospital.parent / entry["image"]), np.array(list(entry["landmarks"].values()))
    spacing = 400 / 32
    for correspondence in (Correspondence(EmbeddingMatcher.from_checkpoint(encoder)),
                           Correspondence(GeometricMatcher("body_box"))):
        matched, scores = correspondence.match(image, image, points)
        errors = np.linalg.norm(matched - points, axis=1)
        assert np.median(errors) <= spacing / 2 and errors.max() < 2 * spacing, (correspondence.name, errors)
    point, score = match_point(str(encoder), image, image, points[0])
    assert len(point) == 3 and -1.0 <= score <= 1.0 + 1e-6
    point, score = match_point(None, image, image, points[0])
    assert score is None and np.linalg.norm(np.asarray(point) - points[0]) < spacing  # affine of a scan to itself


def test_the_affine_prior_bounds_the_search(hospital, encoder):
    first, second = (hospital.parent / e["image"] for e in _entries(hospital)[:2])
    points = np.array(list(_entries(hospital)[0]["landmarks"].values()))
    prior = Correspondence(GeometricMatcher("registration"))
    correspondence = Correspondence(EmbeddingMatcher.from_checkpoint(encoder), prior="registration", radius_mm=20.0)
    assert correspondence.name == "encoder + registration prior"
    anchored, _ = prior.match(first, second, points)
    matched, _ = correspondence.match(first, second, points)
    # within the radius of the prior, plus the refinement's 2 voxels and half a cell
    assert np.all(np.linalg.norm(matched - anchored, axis=1) <= 20.0 + 2.6 * 12.5)


def test_match_command_prints_json(hospital, encoder, capsys):
    entries = _entries(hospital)
    a, b = (str(hospital.parent / e["image"]) for e in entries[:2])
    main(["match", "--encoder", str(encoder), "--from", a, "--to", b, "--point", "10", "-20", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "encoder" and len(out["point_mm"]) == 3 and -1 <= out["score"] <= 1.0 + 1e-6
    main(["match", "--encoder", "none", "--baseline", "body_box", "--from", a, "--to", b, "--point", "10", "-20", "5"])
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "body_box" and out["score"] is None


def test_the_benchmark_scores_every_method(hospital, encoder, tmp_path):
    data = json.loads(hospital.read_text())
    data["test"] = data["training"] + data["test"]     # two patients with two studies each to match across
    data["training"] = data["validation"]
    data["test"][0]["landmarks"]["heart_centre"] = [0.0, 0.0, 900.0]   # outside the field of view: left out
    manifest = hospital.parent / "corr.json"
    manifest.write_text(json.dumps(data))
    work = tasks([{**e, "image": str(hospital.parent / e["image"]),
                   "lesion_mask": str(hospital.parent / e["lesion_mask"])} for e in data["test"]], pairs=None, seed=0)
    kinds = [t["kind"] for t in work]
    assert kinds.count("across patients") == 2 and kinds.count("across studies") == 2
    assert [t["outside"] for t in work if t["kind"] != "lesions"] == [1, 1, 1, 0]
    summary = correspondence_benchmark(tmp_path / "out", manifest=manifest, encoder=encoder, radius_mm=25.0,
                                       quiet=True)
    names = [r["method"] for r in summary]
    assert names == ["pretrained encoder", "random encoder", "registration", "body_box",
                     "pretrained encoder + registration prior", "random encoder + registration prior"]
    baseline = next(r for r in summary if r["method"] == "registration")
    assert baseline["patients_median_vs_registration"] == 1.0 and baseline["patients_points"] == 26
    assert all(0 <= r["studies_median_mm"] < 150 for r in summary)
    rows = list(csv.DictReader((tmp_path / "out" / "correspondence_matches.csv").open()))
    assert len(rows) == 6 * (26 + 27 + sum(len(t["names"]) for t in work if t["kind"] == "lesions"))
    for name in ("correspondence.png", "correspondence_example.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "out" / "correspondence.md").read_text()
    assert "| registration |" in text and "2 point(s) across patients, 1 point(s) across studies" in text
    before = (tmp_path / "out" / "matches_registration.csv").stat().st_mtime_ns   # a rerun reuses the matches
    correspondence_benchmark(tmp_path / "out", manifest=manifest, encoder=encoder, radius_mm=25.0, quiet=True)
    assert (tmp_path / "out" / "matches_registration.csv").stat().st_mtime_ns == before


def test_bad_input_is_refused_by_name(hospital, encoder, tmp_path):
    entries = _entries(hospital)
    a = str(hospital.parent / entries[0]["image"])
    with pytest.raises(UserError, match=r"--point 0 0 900: outside .*P00"):
        match_point(None, a, a, (0, 0, 900))
    data = json.loads(hospital.read_text())
    for split in ("training", "validation", "test"):
        for e in data[split]:
            e.pop("landmarks")
    (tmp_path / "bare.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="no entry of the 'test' split has 'landmarks'"):
        correspondence_benchmark(tmp_path / "out", manifest=tmp_path / "bare.json", encoder=encoder, quiet=True)
