"""`medssl bench app`: its synthetic case opens in the app as a probability map on its lesion, bad options are
refused in one line, and (with Debian's chromium) the bench runs end to end on a tiny volume and prints every aim."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medssl.app import grounding, session, viewport
from medssl.bench.app import PHRASE, write_case
from medssl.bench.browser import find_chromium


@pytest.mark.parametrize("options, field", [(["--size", "8", "8", "8"], "--size"), (["--window", "13x"], "--window"),
                                            (["--repeats", "0"], "--repeats")])
def test_bad_options_exit_2_in_one_line(options: list[str], field: str, tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "medssl", "bench", "app", *options, "--work", str(tmp_path / "w")],
                          capture_output=True, encoding="utf-8", timeout=120)
    assert done.returncode == 2 and field in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "w").exists()  # refused before anything is written


def test_the_synthetic_case_opens_as_a_probability_map_on_its_lesion(tmp_path: Path) -> None:
    out = write_case(tmp_path, (96, 80, 48))
    ct = nib.load(tmp_path / "synthetic_ct.nii.gz")
    values = np.asarray(ct.dataobj)
    assert ct.shape == (96, 80, 48) and values.dtype == np.int16 and values.min() < -900 and values.max() > 500
    library = session.discover([out], [])
    case = session.case_from_infer_output(library, library.infer_outputs[0])
    assert session.first_map(case) == PHRASE  # the app opens on it
    view = session.load_view_volume(case.image)
    result = grounding.stored_grounding(case.rows[0], view.volume)
    assert result.is_probability and result.groundable and viewport.default_display(result).threshold == 0.5
    peak = tuple(result.sidecar.peak_voxel)
    assert 0 <= values[peak] <= 40  # the peak lies in the hypodense lesion (10 HU, noise sd 12), not in the liver
    cropped = nib.Nifti1Image.from_bytes(viewport.map_nifti(result, view.volume.affine))
    assert np.prod(cropped.shape) < np.prod(ct.shape) / 2  # only the lesion's box travels
    assert np.isclose(cropped.get_fdata().max(), result.map01.max())
    assert write_case(tmp_path, (96, 80, 48)) == out  # reused, not rewritten


@pytest.mark.skipif(find_chromium() is None, reason="Debian's chromium is not installed")
def test_the_bench_runs_on_a_tiny_volume_and_prints_every_aim(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "medssl", "bench", "app", "--size", "32", "32", "24", "--repeats",
                           "2", "--reloads", "0", "-o", str(tmp_path / "app.json")], capture_output=True,
                          encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for words in ("without scrolling", "screen px per voxel", "wheel slicing", "ctrl+wheel zoom", "middle-drag pan",
                  "right-drag W/L", "click on the main plane to Python's read-out", "open the case with its map",
                  "SwiftShader"):
        assert words in done.stdout, words
    figures = json.loads((tmp_path / "app.json").read_text(encoding="utf-8"))
    assert figures["geometry"]["shown_voxels"][:2] == [32, 32] and all(figures["changed"].values())
    assert figures["click_to_python_ms"]["n"] == 3 and len(figures["open_s"]) == 1
