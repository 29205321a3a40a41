"""The map file contract (medssl.explain.maps): NIfTI + sidecar, embedded provenance, refusals."""

from __future__ import annotations

import json
import shutil
import threading

import nibabel as nib
import numpy as np
import pytest

from medssl.data.io import Volume
from medssl.errors import UserError
from medssl.explain import maps
from medssl.explain.maps import (
    EXTENSION_CODE,
    MAP_FORMAT,
    MapSidecar,
    check_same_grid,
    describe_scale,
    peak,
    raw_values,
    read_map,
    read_sidecar,
    write_map,
    write_result_json,
)

SIDECAR_FIELDS = {"format", "kind", "image", "checkpoint", "phrase", "raw_scale", "rescaling", "groundable", "score",
                  "score_threshold", "peak_voxel", "peak_mm", "preprocessing", "created", "medssl_version", "extra"}


def _affine() -> np.ndarray:
    affine = np.diag([1.5, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 20.0, -30.0]
    return affine


def _map(shape=(6, 7, 5), at=(4, 1, 3), value=0.9, seed=0) -> np.ndarray:
    array = np.random.default_rng(seed).uniform(0.0, 0.5, shape).astype(np.float32)
    array[at] = value
    return array


def _sidecar(array: np.ndarray, affine: np.ndarray, **changes) -> MapSidecar:
    voxel, mm = peak(array, affine)
    fields = dict(kind="grounding", image="vol/P001_S1.nii.gz", checkpoint="runs/ground/checkpoints/last.pt",
                  phrase="A 14 mm hypodense lesion in the upper liver.",
                  raw_scale={"name": "cosine", "range": [-1, 1]},
                  rescaling={"name": "linear", "from": [-1, 1], "to": [0, 1]}, groundable=True, score=0.42,
                  score_threshold=0.2, peak_voxel=voxel, peak_mm=mm,
                  preprocessing={"spacing": [1.5, 2.0, 3.0], "window": [40, 400]}, extra={"smoothing_mm": 4})
    fields.update(changes)
    return MapSidecar.model_validate(fields)


def test_roundtrip_writes_pair_with_exact_fields(tmp_path):
    array, affine = _map(), _affine()
    sidecar = _sidecar(array, affine)
    nifti, side = write_map(tmp_path / "p1", array, affine, sidecar)
    assert (nifti.name, side.name) == ("p1.nii.gz", "p1.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p1.json", "p1.nii.gz"]  # no temporary leftovers
    data = json.loads(side.read_text())
    assert set(data) == SIDECAR_FIELDS
    assert data["format"] == MAP_FORMAT == "medssl-map-v1"
    assert data["rescaling"] == {"name": "linear", "from": [-1.0, 1.0], "to": [0.0, 1.0]}
    assert data["peak_voxel"] == [4, 1, 3]
    assert data["peak_mm"] == pytest.approx([-10 + 4 * 1.5, 20 + 1 * 2.0, -30 + 3 * 3.0])
    img = nib.load(nifti)
    assert img.get_data_dtype() == np.float32
    for path in (tmp_path / "p1", nifti, side):
        loaded = read_map(path)
        np.testing.assert_array_equal(loaded.array, array)
        np.testing.assert_allclose(loaded.affine, affine)
        assert loaded.array.dtype == np.float32
        assert loaded.sidecar == sidecar


def test_nifti_carries_provenance_when_copied_alone(tmp_path):
    array, affine = _map(), _affine()
    sidecar = _sidecar(array, affine)
    nifti, _ = write_map(tmp_path / "p1", array, affine, sidecar)
    ours = [ext for ext in nib.load(nifti).header.extensions if ext.get_code() == EXTENSION_CODE == 6]
    assert len(ours) == 1 and json.loads(ours[0].get_content())["phrase"] == sidecar.phrase
    elsewhere = tmp_path / "copied"
    elsewhere.mkdir()
    shutil.copy(nifti, elsewhere / "renamed.nii.gz")
    loaded = read_map(elsewhere / "renamed.nii.gz")
    assert loaded.sidecar == sidecar
    np.testing.assert_array_equal(loaded.array, array)


@pytest.mark.parametrize("bad, message", [
    (np.full((4, 4), 0.5, np.float32), "3D"),
    (np.full((4, 4, 4, 2), 0.5, np.float32), "3D"),
    (np.where(np.eye(4, dtype=bool)[..., None], np.nan, 0.5).repeat(4, axis=2).astype(np.float32), "non-finite"),
    (np.full((4, 4, 4), 1.5, np.float32), "[0, 1]"),
    (np.full((4, 4, 4), -0.1, np.float32), "[0, 1]"),
])
def test_write_refuses_bad_arrays(tmp_path, bad, message):
    good = np.zeros((4, 4, 4), np.float32)
    good[1, 1, 1] = 1.0
    sidecar = _sidecar(good, _affine())
    with pytest.raises(UserError, match=message) as err:
        write_map(tmp_path / "bad", bad, _affine(), sidecar)
    assert "bad.nii.gz" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_write_refuses_inconsistent_sidecars(tmp_path):
    array, affine = _map(), _affine()
    with pytest.raises(UserError, match="write_result_json"):
        write_map(tmp_path / "m", array, affine, _sidecar(array, affine, groundable=False))
    with pytest.raises(UserError, match="not the map's maximum"):
        write_map(tmp_path / "m", array, affine, _sidecar(array, affine, peak_voxel=(0, 0, 0)))
    with pytest.raises(UserError, match="peak_mm"):
        write_map(tmp_path / "m", array, affine, _sidecar(array, affine, peak_mm=(0.0, 0.0, 0.0)))
    fields = json.loads(_sidecar(array, affine).to_json())
    with pytest.raises(UserError, match=r"m\.json: invalid map sidecar: unknown key 'colour_map'"):
        write_map(tmp_path / "m", array, affine, {**fields, "colour_map": "jet"})
    with pytest.raises(UserError, match="raw_scale"):
        write_map(tmp_path / "m", array, affine, {**fields, "raw_scale": {"name": "logits"}})
    with pytest.raises(UserError, match="peak_voxel and peak_mm"):
        maps.sidecar_from_dict({**fields, "peak_voxel": None}, "x.json")
    with pytest.raises(UserError, match="not a medssl map sidecar"):
        write_map(tmp_path / "m", array, affine, {**fields, "format": "medssl-map-v0"})
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_pair(tmp_path, monkeypatch):
    affine = _affine()
    first = _map(seed=1)
    write_map(tmp_path / "m", first, affine, _sidecar(first, affine, phrase="first"))
    second = _map(seed=2, at=(0, 0, 0))

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(maps.nib, "save", broken_save)
    with pytest.raises(OSError):
        write_map(tmp_path / "m", second, affine, _sidecar(second, affine, phrase="second"))
    monkeypatch.undo()
    loaded = read_map(tmp_path / "m")
    assert loaded.sidecar.phrase == "first"
    np.testing.assert_array_equal(loaded.array, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.json", "m.nii.gz"]


def test_reader_never_sees_a_mixed_pair_during_overwrites(tmp_path):
    affine = _affine()
    versions = [(_map(seed=s, at=at), phrase) for s, at, phrase in ((3, (1, 1, 1), "one"), (4, (5, 6, 4), "two"))]
    versions = [(array, _sidecar(array, affine, phrase=phrase)) for array, phrase in versions]
    write_map(tmp_path / "m", versions[0][0], affine, versions[0][1])
    done, problems, reads = threading.Event(), [], [0]

    def reader():
        while not done.is_set():
            try:
                loaded = read_map(tmp_path / "m")
            except Exception as err:  # noqa: BLE001 - any failure is a problem here
                problems.append(repr(err))
                continue
            reads[0] += 1
            if peak(loaded.array, loaded.affine)[0] != loaded.sidecar.peak_voxel:
                problems.append(f"mixed pair: {loaded.sidecar.phrase}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for n in range(60):
            array, sidecar = versions[n % 2]
            write_map(tmp_path / "m", array, affine, sidecar)
    finally:
        done.set()
        thread.join()
    assert problems == [] and reads[0] > 0


def test_not_groundable_result_is_sidecar_only(tmp_path):
    array, affine = _map(), _affine()
    write_map(tmp_path / "spleen", array, affine, _sidecar(array, affine))  # an earlier run's map
    result = _sidecar(array, affine, phrase="No focal abnormality of the spleen.", groundable=False, score=0.05,
                      peak_voxel=None, peak_mm=None)
    path = write_result_json(tmp_path / "spleen", result)
    assert path == tmp_path / "spleen.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spleen.json"]  # the stale map is gone
    assert read_sidecar(path) == result
    with pytest.raises(UserError, match=r"spleen\.json: phrase 'No focal abnormality of the spleen\.' was judged "
                                        r"not groundable .*no map image"):
        read_map(tmp_path / "spleen.nii.gz")
    with pytest.raises(UserError, match="write_map"):
        write_result_json(tmp_path / "x", _sidecar(array, affine))


def test_read_refuses_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match=r"nothing\.nii\.gz: no such map"):
        read_map(tmp_path / "nothing")
    (tmp_path / "corrupt.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(UserError, match=r"corrupt\.nii\.gz: cannot read the map NIfTI") as err:
        read_map(tmp_path / "corrupt")
    assert "\n" not in str(err.value)
    array, affine = _map(), _affine()
    fields = json.loads(_sidecar(array, affine).to_json())
    nib.save(nib.Nifti1Image(array, affine), tmp_path / "foreign.nii.gz")  # no embedded provenance
    with pytest.raises(UserError, match="no medssl provenance"):
        read_map(tmp_path / "foreign.nii.gz")
    (tmp_path / "foreign.json").write_text(json.dumps({**fields, "format": "something-else"}))
    with pytest.raises(UserError, match=r"foreign\.json: not a medssl map sidecar"):
        read_map(tmp_path / "foreign.nii.gz")
    (tmp_path / "foreign.json").write_text(json.dumps({**fields, "peak_voxel": [6, 1, 3]}))
    with pytest.raises(UserError, match=r"foreign\.json: peak_voxel \[6, 1, 3\] lies outside.*shape mismatch"):
        read_map(tmp_path / "foreign.nii.gz")
    (tmp_path / "foreign.json").write_text("{not json")
    with pytest.raises(UserError, match=r"foreign\.json: cannot read the map sidecar"):
        read_map(tmp_path / "foreign.nii.gz")
    (tmp_path / "foreign.json").write_text(json.dumps(fields))
    assert read_map(tmp_path / "foreign").sidecar.phrase == fields["phrase"]  # sidecar alone is enough
    nib.save(nib.Nifti1Image(array * 3, affine), tmp_path / "foreign.nii.gz")
    with pytest.raises(UserError, match=r"foreign\.nii\.gz: map values must lie in \[0, 1\]"):
        read_map(tmp_path / "foreign")
    (tmp_path / "sidecar_only.json").write_text(json.dumps(fields))
    with pytest.raises(UserError, match="map image is missing"):
        read_map(tmp_path / "sidecar_only.json")


def test_read_refuses_a_swapped_sidecar_and_a_map_off_the_image_grid(tmp_path):
    affine = _affine()
    a, b = _map(seed=5), _map(seed=6, at=(0, 0, 0))
    write_map(tmp_path / "a", a, affine, _sidecar(a, affine, phrase="liver"))
    write_map(tmp_path / "b", b, affine, _sidecar(b, affine, phrase="spleen"))
    shutil.copy(tmp_path / "b.json", tmp_path / "a.json")
    with pytest.raises(UserError, match=r"a\.json: sidecar does not match .*'spleen' vs 'liver'"):
        read_map(tmp_path / "a")
    image = Volume(np.zeros((6, 7, 5), np.float32), affine, tmp_path / "img.nii.gz")
    assert read_map(tmp_path / "b", like=image).sidecar.phrase == "spleen"
    with pytest.raises(UserError, match=r"shape \(6, 7, 5\) does not match the image .*img\.nii\.gz"):
        read_map(tmp_path / "b", like=Volume(np.zeros((6, 7, 6), np.float32), affine, tmp_path / "img.nii.gz"))
    shifted = affine.copy()
    shifted[0, 3] += 1.0
    with pytest.raises(UserError, match="affine differs"):
        read_map(tmp_path / "b", like=Volume(np.zeros((6, 7, 5), np.float32), shifted, tmp_path / "img.nii.gz"))
    check_same_grid((6, 7, 5), affine, (6, 7, 5), affine.astype(np.float32))  # float32 storage is tolerated


def test_peak_and_scales():
    array = np.zeros((3, 4, 5), np.float32)
    array[2, 1, 4] = array[1, 3, 0] = 0.8  # tie: the first in C order wins
    affine = _affine()
    voxel, mm = peak(array, affine)
    assert voxel == (1, 3, 0) and mm == pytest.approx((-8.5, 26.0, -30.0))
    with pytest.raises(UserError, match="NaN"):
        peak(np.full((2, 2, 2), np.nan), affine)
    sidecar = _sidecar(_map(), affine)
    np.testing.assert_allclose(raw_values(sidecar.rescaling, [0.0, 0.5, 1.0]), [-1.0, 0.0, 1.0])
    minmax = maps.MinMaxRescaling.model_validate({"name": "min-max", "from": [0.001, 0.021]})
    np.testing.assert_allclose(raw_values(minmax, [0.0, 0.5, 1.0]), [0.001, 0.011, 0.021])
    assert describe_scale(sidecar.raw_scale, sidecar.rescaling) == "cosine similarity [-1, 1], linear [-1, 1] -> [0, 1]"
    attention = maps.AttentionScale()
    assert describe_scale(attention, minmax) == "attention weights (sum to 1), min-max [0.001, 0.021] -> [0, 1]"
    with pytest.raises(ValueError, match="increasing"):
        maps.LinearRescaling.model_validate({"from": [1, -1]})
