"""Report grounding as where x what: anatomy (organ masks, frames, places), the finding scorer learnt from
report labels alone on a planted-lesion phantom, not-found, the organ head, ground train / infer end to end, and
bad input."""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.cli import main
from medssl.config import load_config
from medssl.data import io
from medssl.data.manifest import Manifest, load_manifest
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.grounding import anatomy, task
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.grounding.data import Bag, MILBatches, build_bags, kinds_seen, report_bags
from medssl.downstream.grounding.features import VolumeEvidence
from medssl.downstream.grounding.infer import Grounder, GroundingSettings, read_report
from medssl.downstream.grounding.losses import anchored_l2, balanced_bag_loss, top_k_mean
from medssl.downstream.grounding.metrics import grounding_metrics
from medssl.downstream.grounding.organs import OrganHead
from medssl.downstream.grounding.scorer import FindingScorer, ball_voxels
from medssl.downstream.grounding.task import MILObjective, ground_train, training_entries, training_studies
from medssl.downstream.grounding.voxel_store import OrganVoxelStore, organ_voxels_key, read_organ_voxels
from medssl.errors import UserError
from medssl.training.distributed import DistContext
from medssl.explain.maps import read_map
from medssl.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "grounding_tiny.yaml"
NIBABEL_MR = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"
LABELS = ("background", "body", "lung_left", "lung_right", "heart", "liver", "spleen", "kidney_left", "kidney_right",
          "spine")

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ anatomy


def test_organ_masks_fill_what_the_network_gave_to_another_class() -> None:
    labels = np.zeros((20, 20, 20), int)
    labels[4:16, 4:16, 4:16] = 5  # liver
    labels[9:11, 9:11, 9:11] = 1  # a lesion the network called "body"
    labels[1, 1, 1] = 5  # a stray voxel: not the organ
    masks = anatomy.organ_masks(labels, {0: "background", 1: "body", 5: "liver", 6: "spleen"}, skip=("background",))
    assert masks["liver"][10, 10, 10] and not masks["liver"][1, 1, 1] and masks["liver"].sum() == 12 ** 3
    assert not masks["spleen"].any()


def test_places_are_soft_priors_in_the_organs_own_frame() -> None:
    mask = np.zeros((30, 30, 30), bool)
    mask[18:28, 5:25, 5:25] = True  # an organ on the patient's right (RAS: larger x), away from the midline 15
    frame = anatomy.OrganFrame.of(mask, np.ones(3), midline=15.0, orientation="RAS")
    offsets = frame.offsets(mask.shape, np.ones(3))
    upper = anatomy.location_prior(offsets, ("upper",))
    assert upper[22, 15, 24] > 0.9 and upper[22, 15, 5] < 0.1
    lateral = anatomy.location_prior(offsets, ("lateral",))
    assert lateral[27, 15, 15] > 0.9 and lateral[18, 15, 15] < 0.1  # lateral: away from the midline
    central = anatomy.location_prior(offsets, ("central",))
    assert central[22, 14, 14] > central[18, 5, 5]
    assert np.all(anatomy.location_prior(offsets, ()) == 1.0)
    flipped = anatomy.OrganFrame.of(mask[::-1], np.ones(3), midline=14.0, orientation="LAS")  # stored L to R
    np.testing.assert_allclose(flipped.offsets(mask.shape, np.ones(3))[:, ::-1], offsets, atol=1e-5)
    parts = anatomy.organ_parts(mask, offsets)
    assert (parts["upper"] | parts["lower"]).sum() == mask.sum() and not (parts["upper"] & parts["lower"]).any()


def test_bag_losses_and_top_k() -> None:
    assert top_k_mean(torch.tensor([1.0, 5.0, 3.0]), 2) == pytest.approx(4.0)
    assert top_k_mean(torch.tensor([1.0]), 9) == pytest.approx(1.0)
    loss = balanced_bag_loss(torch.tensor([5.0, -5.0, -5.0, -5.0]), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert loss < 0.01
    assert balanced_bag_loss(torch.tensor([-5.0]), torch.tensor([1.0])) > 4.9
    assert anchored_l2(torch.ones(2, 3), torch.zeros(2, 3)) == pytest.approx(6.0)
    assert ball_voxels(12.5, 6.25) == 4 and ball_voxels(1.0, 6.25) == 1


def test_reports_become_positive_and_negative_bags() -> None:
    reports = [report_bags("Findings: A 14 mm hypodense lesion in the upper liver. The spleen is unremarkable. "
                           "The kidneys are unremarkable. Bilateral renal cysts.", LABELS),
               report_bags("Findings: Lateral spleen: cyst measuring 22 mm. The liver is unremarkable.", LABELS)]
    assert [(f.organ, f.kind, f.size_mm, f.places) for f in reports[0].findings] == [
        ("liver", "hypodense lesion", 14.0, ("upper",))]
    assert reports[0].normal == ["spleen", "kidney_left", "kidney_right"] and reports[0].skipped == 1
    by_organ, sizes = kinds_seen(reports)
    assert by_organ == {"liver": ["hypodense lesion"], "spleen": ["cyst"]} and sizes["cyst"] == 22.0
    bags = build_bags(reports, by_organ, sizes)
    assert {(b.study, b.organ, b.kind, b.label) for b in bags} == {
        (0, "liver", "hypodense lesion", 1), (0, "spleen", "cyst", 0), (1, "spleen", "cyst", 1),
        (1, "liver", "hypodense lesion", 0)}


# ------------------------------------------------------------------------------------------------ the phantom

_SIZE = 24
_SPACING = 6.0


def _phantom(seed: int, lesion: bool) -> tuple[VolumeEvidence, np.ndarray]:
    """A liver (a ball) with bright vessel-like decoys in every study and, when `lesion`, a dark 14 mm lesion
    (hypodense): the untrained anomaly score is drawn to the decoys, reports only say which livers hold it."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*(np.arange(_SIZE),) * 3, indexing="ij")).astype(float)
    centre = np.full(3, (_SIZE - 1) / 2)
    liver = np.linalg.norm(grid - centre[:, None, None, None], axis=0) <= 10
    hu = np.where(liver, 60.0, 40.0) + rng.normal(0, 6, liver.shape)
    inside = np.argwhere(liver & (np.linalg.norm(grid - centre[:, None, None, None], axis=0) <= 6))
    for point in inside[rng.choice(len(inside), 2, replace=False)]:  # decoys: +160 HU, 10 mm
        hu += 160 * (np.linalg.norm(grid - point[:, None, None, None], axis=0) <= 0.9)
    target = np.zeros(liver.shape, bool)
    if lesion:
        point = inside[rng.integers(len(inside))]
        target = np.linalg.norm(grid - point[:, None, None, None], axis=0) <= 1.2
        hu = np.where(target, 20.0 + rng.normal(0, 6, liver.shape), hu)
    probabilities = np.stack([~liver, liver]).astype(np.float32)
    decoder = rng.normal(0, 1, (2, *liver.shape)).astype(np.float32)
    evidence = VolumeEvidence.build(hu.astype(np.float32), [(40.0, 400.0)], probabilities, decoder,
                                    {0: "background", 1: "liver"}, np.full(3, _SPACING), "RAS", np.ones_like(liver))
    return evidence, target


def _pointing(scorer: FindingScorer, cases: list[tuple[VolumeEvidence, np.ndarray]]) -> float:
    hits = []
    for evidence, target in cases:
        organ = evidence.organ("liver")
        with torch.no_grad():
            logits = scorer.voxel_logits(0, "liver", organ.phi(14.0))
        hits.append(target.ravel()[organ.index[int(logits.argmax())]])
    return float(np.mean(hits))


def test_the_finding_scorer_learns_a_planted_lesion_from_report_labels_alone() -> None:
    torch.manual_seed(0)
    train = [_phantom(seed, lesion=seed % 2 == 0) for seed in range(24)]
    voxels = {(k, "liver"): evidence.organ("liver") for k, (evidence, _) in enumerate(train)}
    bags = [Bag(k, "liver", "hypodense lesion", 14.0, (), int(k % 2 == 0))
            for k in range(len(train))]  # the report: "a 14 mm hypodense lesion in the liver" / "liver normal"
    scorer = FindingScorer(["hypodense lesion"], ["liver"], windows=1, decoder_channels=2)
    held_out = [_phantom(100 + seed, lesion=True) for seed in range(10)]
    normal = [_phantom(200 + seed, lesion=False) for seed in range(10)]
    untrained = _pointing(scorer, held_out)
    batches = MILBatches(bags, voxels, ["hypodense lesion"], bags_per_step=12, seed=0)
    objective = MILObjective(anchor_weight=0.001)
    optimiser = torch.optim.Adam(scorer.parameters(), lr=0.05)
    for step in range(80):
        optimiser.zero_grad()
        objective(scorer, batches[step], torch.Generator()).loss.backward()
        optimiser.step()
    trained = _pointing(scorer, held_out)
    assert untrained <= 0.3 and trained >= 0.9, (untrained, trained)  # the decoys fooled the untrained score
    dark, bright = scorer.weight[0, 1].item(), scorer.weight[0, 0].item()
    assert dark > bright  # it learnt the sign of "hypodense" from the reports

    def bag(evidence: VolumeEvidence) -> float:
        organ = evidence.organ("liver")
        with torch.no_grad():
            return float(scorer.bag_logit(0, "liver", organ.phi(14.0), ball_voxels(14.0, _SPACING)))

    present, absent = [bag(e) for e, _ in held_out], [bag(e) for e, _ in normal]
    assert min(present) > max(absent)  # not found: a normal liver scores below every liver with the lesion


def test_organ_voxels_are_organ_normalised_and_phi_follows_the_stated_size() -> None:
    evidence, _ = _phantom(7, lesion=True)
    organ = evidence.organ("liver")
    assert organ.mask_voxels == evidence.masks["liver"].sum() > organ.size  # the core: surface voxels left out
    assert organ.intensity_z.shape[1:] == (1, organ.size) and organ.depth_mm.min() > 1.5 * _SPACING
    z = organ.intensity_z[0, 0].astype(np.float32)
    assert abs(float(np.median(z))) < 0.05  # median 0 over the organ
    small, large = organ.phi(6.0), organ.phi(40.0)
    assert small.shape == large.shape == (organ.size, 2 + 1 + 2)
    assert float(large[:, 2].max()) > float(small[:, 2].max())  # a large finding does not fit near the surface
    assert evidence.organ("spleen") is None


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("ground") / "hospital", patients=8, studies=2, size=32, seed=3,
                         trials=1, signal_seconds=2.0)


@pytest.fixture(scope="module")
def trained(hospital: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`ground train` alone: it fine-tunes its organ head into RUN/organs, then the scorer."""
    run = tmp_path_factory.mktemp("ground_run") / "run"
    config = load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "train.steps=12", "train.log_every=4"])
    return run, ground_train(config, run, quiet=True)


def test_ground_train_alone_writes_an_organ_head_and_a_calibrated_model(trained: tuple[Path, dict]) -> None:
    run, summary = trained
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "grounding.pt",
                 "grounding_eval.csv", "organs/summary.json", "organs/checkpoints/last.pt"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12] and {"loss", "mil", "anchor"} <= set(records[0])
    model = load_checkpoint(run / "grounding.pt", kind="grounding-model")
    assert math.isfinite(model["state"]["calibration"]["threshold"])
    assert set(model["arch"]) == {"organ_head", "scorer", "settings"}
    assert summary["train_positive_bags"] > 0 and summary["train_negative_bags"] > 0
    for key in ("test_organ_report_pointing_game", "test_organ_unseen_pointing_game", "test_call_negated_accuracy"):
        assert key in summary and 0.0 <= summary[key] <= 1.0, key
    grounder = Grounder.load(run / "grounding.pt")
    assert grounder.head.organs == LABELS and grounder.scorer.kinds == sorted(model["arch"]["scorer"]["kinds"])


def test_a_finetune_seg_run_is_an_organ_head_and_round_trips(trained: tuple[Path, dict], hospital: Path) -> None:
    run, _ = trained
    head = OrganHead.load(run / "organs")
    again = OrganHead.from_state(head.state(), "state")
    image = torch.rand(1, 32, 32, 32)
    first, second = head.run(image), again.run(image)
    assert first.probabilities.shape == (10, 32, 32, 32) and first.features.shape[1:] == (32, 32, 32)
    torch.testing.assert_close(first.probabilities.sum(0), torch.ones(32, 32, 32))
    torch.testing.assert_close(first.features, second.features)
    other = dict(json.loads(hospital.read_text()))
    other["labels"] = {"0": "background", "1": "tumour"}
    (hospital.parent / "other_labels.json").write_text(json.dumps(other))
    config = load_config(TINY, GroundingConfig, [f"data.manifest={hospital.parent / 'other_labels.json'}"])
    with pytest.raises(UserError, match="organ head of another label set"):
        ground_train(config, run.parent / "other", organs=run / "organs", quiet=True)
    assert not (run.parent / "other" / "grounding.pt").exists()


def test_bench_grounding_evaluates_the_baselines_with_a_finished_runs_organ_head(trained, tmp_path: Path) -> None:
    """`bench grounding --run RUN`: ours is the run, the baselines see its held-out cases; nothing is trained."""
    from medssl.bench.grounding import grounding_benchmark

    run, summary = trained
    rows = grounding_benchmark(tmp_path / "b", run=run, variants=("ours", "untrained", "oracle_organs"))
    by_variant = {r["variant"]: r for r in rows}
    assert list(by_variant) == ["ours", "untrained", "oracle_organs"]
    for key in ("test_organ_report_pointing_game", "test_lesion_report_pointing_game"):
        assert by_variant["ours"][f"{key}_mean"] == pytest.approx(summary[key])
    # the tiny organ head (30 steps) misses the organs: the true masks find more of the lesions
    key = "test_lesion_report_hit_mean"
    assert by_variant["oracle_organs"][key] > by_variant["ours"][key]
    assert (tmp_path / "b" / "untrained_seed0" / "summary.json").is_file()
    assert not (tmp_path / "b" / "ours_seed0" / "checkpoints").exists()  # evaluated, not trained
    with pytest.raises(UserError, match="random_init"):
        grounding_benchmark(tmp_path / "c", run=run, variants=("ours", "random_init"))
    with pytest.raises(UserError, match="not a finished 'ground train' run"):
        grounding_benchmark(tmp_path / "c", run=tmp_path / "b", variants=("untrained",))


def _probe(run: Path) -> Grounder:
    """ground train's organ-head-only Grounder over `run`'s organ head (default windows)."""
    windows = [(40.0, 400.0), (-600.0, 1500.0)]
    return Grounder(OrganHead.load(run / "organs"), FindingScorer(["lesion"], [], len(windows), 1),
                    GroundingSettings(windows, {}, {}), "probe")


def _needed_studies(manifest: Manifest, organs: tuple[str, ...]) -> set[Path]:
    """The training volumes that at least one bag points at."""
    entries = training_entries(manifest, "training")
    reports = [report_bags(e.report, organs) for e in entries]
    bags = build_bags(reports, *kinds_seen(reports))
    return {manifest.path(entries[b.study].image) for b in bags}


_PREPARE = Grounder.prepare


def _count_prepare(monkeypatch: pytest.MonkeyPatch, stop_after: int | None = None) -> list[Path]:
    """Grounder.prepare records the volumes it is called on; with `stop_after`, the next call raises _Killed."""
    calls, prepare = [], _PREPARE

    def counted(self: Grounder, image: Path, **options) -> object:
        if stop_after is not None and len(calls) == stop_after:
            raise _Killed
        calls.append(Path(image))
        return prepare(self, image, **options)

    monkeypatch.setattr(Grounder, "prepare", counted)
    return calls


class _Killed(Exception):
    """A run killed half-way."""


def test_organ_voxels_read_from_disk_give_the_same_batches_as_in_ram(trained, hospital: Path, tmp_path: Path) -> None:
    run, _ = trained
    probe = _probe(run)
    key = organ_voxels_key(probe.head, probe.settings.windows)
    assert list((run / "organ_voxels" / key).glob("*.npz"))  # ground train wrote its organ voxels there
    manifest = load_manifest(hospital)
    store = OrganVoxelStore.open(tmp_path / "ov", key, clean=True, cached=2)
    studies = training_studies(probe, manifest, "training", store, quiet=True)
    entries = training_entries(manifest, "training")
    in_ram = {}
    for study in sorted({b.study for b in studies.bags}):  # what ground train kept in RAM before
        grounded = probe.prepare(manifest.path(entries[study].image))
        found = {(study, b.organ): grounded.organ(b.organ) for b in studies.bags if b.study == study}
        in_ram.update({key: voxels for key, voxels in found.items() if voxels is not None})
    assert set(store) == set(in_ram) and len(store) > 2
    kinds = sorted(studies.median_size)
    lazy, eager = (MILBatches(studies.bags, voxels, kinds, bags_per_step=8, seed=0) for voxels in (store, in_ram))
    for step in range(12):
        a, b = lazy[step], eager[step]
        assert a["organ"] == b["organ"] and a["k"] == b["k"]
        assert torch.equal(a["kind"], b["kind"]) and torch.equal(a["label"], b["label"])
        assert all(torch.equal(x, y) for x, y in zip(a["phi"] + a["prior"], b["phi"] + b["prior"], strict=True))
    assert len(store._loaded) == 2  # read lazily, two kept


def test_training_studies_reuse_complete_organ_voxel_files_and_redo_only_missing_ones(
        trained, hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = trained
    probe, manifest = _probe(run), load_manifest(hospital)
    key = organ_voxels_key(probe.head, probe.settings.windows)
    calls = _count_prepare(monkeypatch)
    first = training_studies(probe, manifest, "training", OrganVoxelStore.open(tmp_path, key, clean=True), quiet=True)
    assert set(calls) == _needed_studies(manifest, probe.head.organs) and len(calls) == len(set(calls))
    calls.clear()
    again = training_studies(probe, manifest, "training", OrganVoxelStore.open(tmp_path, key, clean=True), quiet=True)
    assert calls == [] and again.voxels.paths == first.voxels.paths
    (study, organ), path = next(iter(first.voxels.paths.items()))
    path.unlink()
    partial = tmp_path / key / f".{path.stem}.x1.tmp.npz"  # what a kill in the middle of a write leaves
    partial.write_bytes(b"PK\x03")
    again = training_studies(probe, manifest, "training", OrganVoxelStore.open(tmp_path, key, clean=True), quiet=True)
    assert calls == [manifest.path(training_entries(manifest, "training")[study].image)] and not partial.exists()
    assert again.voxels.paths == first.voxels.paths
    OrganVoxelStore.open(tmp_path, "another-head", clean=True)  # another organ head: never reused
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(Grounder, "prepare", lambda self, image: SimpleNamespace(organ=lambda name: None))
    with pytest.raises(UserError, match="the organ head finds none of the organs the 'training' reports name"):
        training_studies(probe, manifest, "training", OrganVoxelStore.open(tmp_path, key, clean=True), quiet=True)


def test_under_torchrun_each_rank_computes_its_share_of_the_training_studies(
        trained, hospital: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = trained
    probe, manifest = _probe(run), load_manifest(hospital)
    key = organ_voxels_key(probe.head, probe.settings.windows)
    monkeypatch.setattr(task, "raise_on_every_rank", lambda error, ctx: None)  # no process group in this test
    images = [manifest.path(e.image) for e in training_entries(manifest, "training")]
    needed = sorted(_needed_studies(manifest, probe.head.organs), key=images.index)
    calls = _count_prepare(monkeypatch)
    with pytest.raises(UserError, match="after every rank wrote its share"):  # rank 0's share is not written yet
        training_studies(probe, manifest, "training", OrganVoxelStore.open(tmp_path, key, clean=True), quiet=True,
                         ctx=DistContext(rank=1, world_size=2))
    assert calls == needed[1::2]
    calls.clear()
    done = training_studies(probe, manifest, "training", OrganVoxelStore.open(tmp_path, key, clean=False),
                            quiet=True, ctx=DistContext(rank=0, world_size=2))
    assert calls == needed[0::2] and done.voxels.paths  # every study indexed on rank 0, half computed there


def test_ground_train_resumes_a_run_killed_in_the_training_studies(trained, hospital: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run, _ = trained
    config = load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "train.steps=4"])
    out = tmp_path / "run"
    killed = _count_prepare(monkeypatch, stop_after=3)
    with pytest.raises(_Killed):
        ground_train(config, out, organs=run / "organs", quiet=True, evaluate_split=False)
    with pytest.raises(UserError, match="run directory is not empty"):
        ground_train(config, out, organs=run / "organs", quiet=True, evaluate_split=False)
    calls = _count_prepare(monkeypatch)
    summary = ground_train(config, out, organs=run / "organs", resume=True, quiet=True, evaluate_split=False)
    manifest = load_manifest(hospital)
    needed = _needed_studies(manifest, OrganHead.load(run / "organs").organs)
    redone = [c for c in calls if c in needed]  # calibration prepares its own studies
    assert len(killed) == 3 and not set(killed) & set(redone) and set(killed) | set(redone) == needed
    assert summary["steps"] == 4 and (out / "grounding.pt").is_file() and not (out / "FAILED").exists()
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        ground_train(config, tmp_path / "new", organs=run / "organs", resume=True, quiet=True)


def test_organ_voxel_files_round_trip_and_a_full_disk_is_one_line_naming_the_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    voxels = _phantom(7, lesion=True)[0].organ("liver")
    image = tmp_path / "scan.nii.gz"
    image.write_bytes(b"a volume")
    store = OrganVoxelStore.open(tmp_path / "ov", "k", clean=True)
    store.add(0, image, "liver", voxels)
    store.add(0, image, "spleen", None)  # not found: remembered, not indexed
    back = store[(0, "liver")]
    for name in ("index", "intensity_z", "decoder_z", "depth_mm", "offsets"):
        original, read = getattr(voxels, name), getattr(back, name)
        assert read.dtype == original.dtype and np.array_equal(read, original), name
    assert (back.organ, back.shape, back.spacing, back.mask_voxels) == (voxels.organ, voxels.shape, voxels.spacing,
                                                                        voxels.mask_voxels)
    assert list(store) == [(0, "liver")] and store.reuse(1, image, "spleen") and (1, "spleen") not in store
    written = sorted(p.name for p in (tmp_path / "ov" / "k").iterdir())

    def full_disk(handle, **arrays) -> None:
        handle.write(b"PK\x03\x04 half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(UserError) as err:
        store.add(1, image, "liver", voxels)
    assert str(err.value).startswith(f"{tmp_path / 'ov' / 'k'}: cannot write the organ voxels of the training "
                                     "studies: no space left on device") and "\n" not in str(err.value)
    assert sorted(p.name for p in (tmp_path / "ov" / "k").iterdir()) == written  # nothing half-written
    store.paths[(0, "liver")].write_bytes(b"PK\x03\x04 corrupt")
    with pytest.raises(UserError, match="unreadable organ voxels"):
        read_organ_voxels(store.paths[(0, "liver")])


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _image(hospital: Path) -> Path:
    return hospital.parent / json.loads(hospital.read_text())["test"][0]["image"]


def test_infer_writes_maps_in_the_inputs_space_with_the_query_and_organ(trained, hospital: Path, tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    image = _image(hospital)
    flipped = tmp_path / "las.nii.gz"  # the same volume stored in another orientation
    volume = io.read_volume(image)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = volume.array.shape[0] - 1
    io.write_volume(flipped, np.ascontiguousarray(volume.array[::-1]), volume.affine @ flip)
    report = tmp_path / "report.txt"
    report.write_text("Findings: The liver. A 20 mm hypodense lesion in the upper liver. The spleen is "
                      "unremarkable. The pancreas is normal.\n")
    code = _cli(["ground", "infer", "--checkpoint", str(run / "grounding.pt"), "--image", str(flipped), "--report",
                 str(report), "-o", str(tmp_path / "out")])
    assert code == 0 and "orientation LAS" in capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert Path(results["checkpoint"]).is_absolute() and Path(results["image"]).is_absolute()
    organ, finding, normal, unknown = results["results"]
    assert organ["query"]["organs"] == ["liver"] and organ["query"]["kind"] is None
    assert finding["query"]["kind"] == "hypodense lesion" and finding["query"]["locations"] == ["upper"]
    assert not normal["groundable"] and normal["reason"] == "normal statement"
    assert not unknown["groundable"] and "does not know (pancreas)" in unknown["reason"]
    for row in (organ, finding):
        sidecar = json.loads((tmp_path / "out" / row["sidecar"]).read_text())
        assert sidecar["raw_scale"]["name"] == "probability" and sidecar["extra"]["organ"] == row["organ"]
        assert sidecar["score_threshold"] == pytest.approx(row["threshold"])
        if row["groundable"]:
            loaded = read_map(tmp_path / "out" / row["map"], like=io.read_volume(flipped))
            assert 0.0 <= loaded.array.min() and loaded.array.max() <= 1.0
            assert sidecar["extra"]["organ_voxels"] > 0
    # the LAS maps are the RAS maps flipped back: grounding happened in the same space
    code = _cli(["ground", "infer", "--checkpoint", str(run / "grounding.pt"), "--image", str(image), "--report",
                 str(report), "-o", str(tmp_path / "ras")])
    ras = json.loads((tmp_path / "ras" / "results.json").read_text())["results"]
    assert code == 0 and [r["score"] for r in ras] == pytest.approx([r["score"] for r in results["results"]],
                                                                    abs=1e-4)


def test_a_finding_absent_from_the_scan_is_not_found_with_its_score(trained, hospital: Path) -> None:
    run, _ = trained
    grounder = Grounder.load(run / "grounding.pt")
    grounder.settings.threshold = 1.01  # nothing reaches it (a score is a probability): every finding is not found
    result = grounder.ground(grounder.prepare(_image(hospital)), ["A 15 mm cyst in the spleen."])[0]
    assert not result.groundable and result.map01 is None and "not found: score" in result.reason
    assert 0.0 <= result.score < result.threshold


def test_bad_input_is_refused_with_one_line_and_nothing_written(trained, hospital: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    image = _image(hospital)
    ckpt = str(run / "grounding.pt")
    empty, binary, latin = tmp_path / "empty.txt", tmp_path / "binary.txt", tmp_path / "latin.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01abc")
    latin.write_bytes("Findings: l\xe9sion.".encode("latin-1"))
    two_d = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 1, 3), np.float32), np.eye(4)), two_d)
    seg = tmp_path / "seg.pt"
    torch.save({**load_checkpoint(run / "grounding.pt"), "kind": "finetune-seg"}, seg)
    cases = [
        (["--text", "   "], "--text: empty"),
        (["--text", "lesion " * 200], "at most 1000"),
        (["--text", "zorblax quuxifer"], "names no organ or finding the model knows"),
        (["--text", "a 2 cm mass in the pancreas"], "names an organ this model does not know (pancreas)"),
        (["--report", str(empty)], "the report is empty"),
        (["--report", str(binary)], "not a text file"),
        (["--report", str(latin)], "not UTF-8 text"),
        (["--text", "x", "--report", str(empty)], "exactly one of --text"),
        (["--text", "cyst", "--modality", "PET"], "--modality: 'PET'"),
        (["--text", "cyst", "--modality", "MR"], "trained on CT"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert _cli(["ground", "infer", "--checkpoint", ckpt, "--image", str(image), *extra, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not out.exists()
    for image_path, checkpoint, message in [(two_d, ckpt, "slice.nii.gz"),
                                            (image, str(seg), "expected 'grounding-model'"),
                                            (NIBABEL_MR, ckpt, "not a CT in Hounsfield units"),
                                            (tmp_path / "missing.nii.gz", ckpt, "no such file")]:
        out = tmp_path / "out"
        assert _cli(["ground", "infer", "--checkpoint", checkpoint, "--image", str(image_path), "--text", "liver",
                     "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert _cli(["ground", "infer", "--checkpoint", ckpt, "--image", str(image), "--text", "liver", "-o",
                 str(tmp_path / "taken")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_an_organ_the_head_does_not_find_is_said_never_a_whole_body_map(trained, hospital: Path) -> None:
    run, _ = trained
    grounder = Grounder.load(run / "grounding.pt")
    grounded = grounder.prepare(_image(hospital))
    grounded.evidence.masks["spleen"][:] = False
    grounded._organs.clear()
    organ, finding = grounder.ground(grounded, ["the spleen", "a 10 mm cyst in the spleen"])
    for result in (organ, finding):
        assert not result.groundable and result.map01 is None and "finds no spleen" in result.reason


def test_ground_train_refuses_bad_input_before_writing(hospital: Path, tmp_path: Path) -> None:
    data = json.loads(hospital.read_text())
    data["test"].append(dict(data["training"][0]))  # a training patient in the test split
    leaky = hospital.parent / "leaky.json"
    leaky.write_text(json.dumps(data))
    with pytest.raises(UserError, match="is in more than one split"):
        ground_train(load_config(TINY, GroundingConfig, [f"data.manifest={leaky}"]), tmp_path / "run")
    assert not (tmp_path / "run" / "organs").exists()
    with pytest.raises(UserError, match="organs.seg.train_split"):
        load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "organs.seg.train_split=validation"])
    with pytest.raises(UserError, match="scorer.windows"):
        load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "scorer.windows=[[40, -1]]"])


def test_read_report_keeps_the_findings(tmp_path: Path) -> None:
    report = tmp_path / "r.txt"
    report.write_text("CT chest, study S1.\nFindings: A 9 mm cyst in the left kidney. Spine: no focal lesion.\n"
                      "Impression: One focal lesion.\n", encoding="utf-8")
    assert read_report(report) == ["A 9 mm cyst in the left kidney.", "Spine: no focal lesion."]
    report.write_text("Nodule of 8 mm in the lower right lung.\nThe heart is normal in size.", encoding="utf-8")
    assert read_report(report) == ["Nodule of 8 mm in the lower right lung.", "The heart is normal in size."]


def test_grounding_metrics_on_a_map_that_finds_its_target() -> None:
    target = np.zeros((8, 8, 8), bool)
    target[2:4, 2:4, 2:4] = True
    found = np.where(target, 0.9, 0.1).astype(np.float32)
    metrics = grounding_metrics(found, target)
    assert metrics.pointing_game and metrics.hit and metrics.dice == pytest.approx(1.0)
    missed = np.roll(found, 4, axis=0)
    assert not grounding_metrics(missed, target).pointing_game and grounding_metrics(missed, target).dice == 0.0
