"""Report grounding: the alignment objectives alone, the label-free anatomy graph, `ground train` end to end
on a tiny synthetic hospital, `ground infer` on unseen and real volumes, and bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.cli import main
from medssl.config import load_config
from medssl.data import io
from medssl.data.synthetic.hospital import make_hospital
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.grounding.data import Statements, content_words, jaccard
from medssl.downstream.grounding.graph import AnatomyGraph, best_region_dice
from medssl.downstream.grounding.infer import Grounder, read_report
from medssl.downstream.grounding.task import ground_train
from medssl.errors import UserError
from medssl.explain.maps import read_map
from medssl.losses.alignment import phrase_attention
from medssl.losses.anatomy_prompts import region_prompt_contrast
from medssl.losses.phrase_local import phrase_volume_contrast
from medssl.losses.report_global import report_volume_contrast
from medssl.losses.report_prior import absence_loss, ball_mass_loss, region_mass_loss, volume_loss
from medssl.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "grounding_tiny.yaml"
NIBABEL_MR = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------ objectives


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def test_local_score_finds_the_volume_that_holds_the_phrase() -> None:
    """A phrase whose embedding equals one voxel of volume 0 scores highest there, and the contrast is lower
    when each phrase's voxel sits in its own volume than when the phrases are swapped."""
    torch.manual_seed(0)
    voxels = _unit(torch.randn(3, 100, 16)).transpose(1, 2).contiguous()  # (B, E, V)
    phrases = torch.stack([voxels[b, :, 10 * b] for b in range(3)])  # phrase b = a voxel of volume b
    body = torch.ones(3, 100, dtype=torch.bool)
    att = phrase_attention(phrases, voxels, body, attention_tau=0.05)
    assert att.scores.argmax(dim=1).tolist() == [0, 1, 2]
    assert torch.allclose(att.attention.sum(dim=-1), torch.ones(3, 3))
    exclude = torch.zeros(3, 3, dtype=torch.bool)
    right = phrase_volume_contrast(att.scores, torch.tensor([0, 1, 2]), exclude)
    wrong = phrase_volume_contrast(att.scores, torch.tensor([1, 2, 0]), exclude)
    assert right < wrong
    # voxels outside the body get no attention
    body[0, 10] = False
    assert phrase_attention(phrases, voxels, body, attention_tau=0.05).attention[0, 0, 10] == 0
    # a crop without any body voxel is attended over all of it instead of giving NaN
    body[1] = False
    empty = phrase_attention(phrases, voxels, body, attention_tau=0.05)
    assert torch.isfinite(empty.scores).all() and torch.allclose(empty.attention[:, 1].sum(-1), torch.ones(3))


def test_global_and_anatomy_contrast_reward_matching_pairs() -> None:
    torch.manual_seed(1)
    reports = _unit(torch.randn(4, 8))
    none = torch.zeros(4, 4, dtype=torch.bool)
    assert report_volume_contrast(reports, reports, none) < report_volume_contrast(reports.roll(1, 0), reports, none)
    prompts = _unit(torch.randn(3, 8))
    nodes = torch.tensor([0, 1, 2, -1]).repeat_interleave(4).reshape(1, 2, 2, 4)  # 4 voxels per node, 4 outside
    voxels = torch.zeros(1, 8, 2, 2, 4)
    for node in range(3):
        voxels[0, :, nodes[0] == node] = prompts[node][:, None]
    groups = torch.arange(3)
    matched = region_prompt_contrast(voxels, nodes, prompts, groups)
    shuffled = region_prompt_contrast(voxels, nodes, prompts[[1, 2, 0]], groups)
    assert matched < shuffled
    # nodes whose prompts read the same are all positives of each other: region 2 may also match prompt 0
    assert region_prompt_contrast(voxels, nodes, prompts, torch.tensor([0, 1, 0])) > matched


def test_priors_measure_size_place_and_emptiness() -> None:
    grid = torch.stack(torch.meshgrid(*[torch.arange(10.0)] * 3, indexing="ij"), dim=-1).reshape(-1, 3) * 5  # 5 mm
    centre = torch.tensor([25.0, 25.0, 25.0])
    near = (grid - centre).norm(dim=1) < 8
    focused = near.float() / near.sum()
    spread = torch.full((1000,), 1 / 1000)
    size = torch.tensor([15.0])
    assert (ball_mass_loss(focused[None], grid[None], size, 6.0) < 0.1
            < ball_mass_loss(spread[None], grid[None], size, 6.0))
    sims = torch.where(near, 1.0, -1.0)[None]
    body = torch.ones(1, 1000, dtype=torch.bool)
    stated_right = volume_loss(sims, body, torch.tensor([15.0]), torch.tensor([125.0]), 0.05)
    stated_wrong = volume_loss(sims, body, torch.tensor([60.0]), torch.tensor([125.0]), 0.05)
    assert stated_right < 0.3 < stated_wrong
    assert absence_loss(torch.full((1, 1000), -0.5), body, 0.05, 0.1) == 0
    assert absence_loss(sims, body, 0.05, 0.1) > 1.0
    assert absence_loss(sims[:0], body[:0], 0.05, 0.1) == 0
    nodes = torch.where(near, 3, 1)[None]  # the peak's region holds the focused map whole, half of the split one
    split = 0.5 * focused + 0.5 * (~near).float() / (~near).sum()
    assert region_mass_loss(focused[None], nodes) < 1e-6
    assert region_mass_loss(split[None], nodes) == pytest.approx(0.5, abs=1e-5)
    empty = region_mass_loss(focused[:0][None][:0], nodes[:0])  # a batch whose reports state no finding
    assert empty == 0 and torch.isfinite(empty)


def test_statement_parsing_and_text_similarity() -> None:
    statements = Statements.of("CT chest, study S1.\nFindings: A 14 mm hypodense lesion in the upper liver. "
                               "No focal abnormality of the spleen. The kidneys are unremarkable.\nImpression: One.")
    assert statements.findings == ["A 14 mm hypodense lesion in the upper liver."]
    assert statements.negated == ["No focal abnormality of the spleen.", "The kidneys are unremarkable."]
    a = content_words("A 14 mm hypodense lesion in the upper liver.")
    assert a == {"hypodense", "lesion", "upper", "liver"}
    assert jaccard(a, content_words("Hypodense lesion of 20 mm in the lower liver.")) >= 0.5
    assert jaccard(a, content_words("Cyst of 9 mm in the left kidney.")) < 0.5


# ------------------------------------------------------------------------------------------------ the graph


def test_anatomy_graph_is_a_tree_that_nests_and_round_trips() -> None:
    rng = np.random.default_rng(0)
    coords = np.stack(np.meshgrid(*[np.linspace(0, 1, 8)] * 3, indexing="ij")).astype(np.float32)
    features = np.concatenate([(coords[:1] > 0.5).astype(np.float32), rng.normal(size=(2, 8, 8, 8)) * 0.01])
    body = np.ones((8, 8, 8), bool)
    graph = AnatomyGraph.build([features], [coords], [body], regions=2, parts=["upper_lower", "left_right"],
                               voxels_per_volume=512, coord_weight=0.1, seed=0)
    level1, level2 = graph.assign(features, coords, body)
    assert set(np.unique(level1)) == {0, 1} and set(np.unique(level2)) <= set(range(8))
    assert np.all(level2 // 4 == level1)  # every part lies inside its region
    right = level1[coords[0] > 0.5][0]
    assert np.all(level1[coords[0] > 0.5] == right) and "right" in graph.prompts(1)[right]
    assert "left" in graph.prompts(1)[1 - right]
    tree = graph.nodes()
    assert tree[0]["prompt"] == "body" and len(tree) == 1 + 2 + 8
    assert all(node["parent"] == 1 + (node["id"] - 3) // 4 for node in tree if node["level"] == 2)
    again = AnatomyGraph.from_dict(json.loads(json.dumps(graph.to_dict())))
    assert all(np.array_equal(a, b) for a, b in zip(again.assign(features, coords, body), [level1, level2]))
    labels = (coords[0] > 0.5).astype(int) + 1
    assert best_region_dice(level1, labels, {0: "background", 1: "left side", 2: "right side"}) == {
        "left side": 1.0, "right side": 1.0}


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def hospital(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hospital(tmp_path_factory.mktemp("ground") / "hospital", patients=8, studies=2, size=32, seed=3,
                         trials=1, signal_seconds=2.0)


@pytest.fixture(scope="module")
def trained(hospital: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run = tmp_path_factory.mktemp("ground_run") / "run"
    config = load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "train.steps=12", "train.log_every=4",
                                                 "grounding.encoder_lr_scale=0.1"])
    return run, ground_train(config, run, quiet=True)


def test_a_frozen_encoder_trains_the_heads_on_features_computed_once(hospital: Path, tmp_path: Path) -> None:
    config = load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "train.steps=4", "train.log_every=2"])
    assert config.grounding.encoder_lr_scale == 0  # the default
    ground_train(config, tmp_path / "run", quiet=True)
    trained = load_checkpoint(tmp_path / "run" / "grounding.pt")["model"]
    encoder = {k: v for k, v in trained.items() if k.startswith("encoder.")}
    graph = {k.replace("graph_encoder.", "encoder.", 1): v for k, v in trained.items()
             if k.startswith("graph_encoder.")}
    assert encoder and all(torch.equal(v, graph[k]) for k, v in encoder.items())  # never moved from its start
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "lr.encoder" not in record and math.isfinite(record["loss"])


def test_ground_train_writes_the_run_directory_and_a_calibrated_model(trained: tuple[Path, dict]) -> None:
    run, summary = trained
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt", "grounding.pt",
                 "grounding_eval.csv"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert {"loss", "global", "local", "anatomy", "prior.ball", "prior.volume", "prior.absent", "lr.heads",
            "lr.encoder"} <= set(records[0])
    assert records[0]["lr.encoder"] == pytest.approx(0.1 * records[0]["lr.heads"])
    model = load_checkpoint(run / "grounding.pt", kind="grounding-model")
    assert math.isfinite(model["state"]["calibration"]["threshold"])
    assert model["arch"]["graph"]["region_prompts"] and isinstance(model["arch"]["tokenizer"], str)
    for key in ("test_lesion_seen_pointing_game", "test_lesion_heldout_hit", "test_organ_heldout_pointing_game",
                "test_groundable_call_accuracy", "test_swap_mean_map_change", "random_lesion_all_pointing_game",
                "test_graph_dice_mean"):
        assert key in summary and 0.0 <= summary[key] <= 1.0, key
    rows = (run / "grounding_eval.csv").read_text().splitlines()
    assert rows[0].startswith("cnr,") and len(rows) > 20


def test_infer_writes_maps_in_the_inputs_space_for_an_unseen_volume(trained, hospital: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    test_entry = json.loads(hospital.read_text())["test"][0]
    image = hospital.parent / test_entry["image"]
    flipped = tmp_path / "las.nii.gz"  # the same volume stored in another orientation
    volume = io.read_volume(image)
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = volume.array.shape[0] - 1
    io.write_volume(flipped, np.ascontiguousarray(volume.array[::-1]), volume.affine @ flip)
    code = _cli(["ground", "infer", "--checkpoint", str(run / "grounding.pt"), "--image", str(flipped), "--text",
                 "a 30 mm hypodense lesion in the upper liver", "-o", str(tmp_path / "out")])
    assert code == 0
    listing = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert len(listing) == 1 and "orientation LAS" in capsys.readouterr().err
    entry = listing[0]
    sidecar = json.loads((tmp_path / "out" / entry["sidecar"]).read_text())
    assert sidecar["raw_scale"] == {"name": "cosine", "range": [-1.0, 1.0]} and sidecar["phrase"] == entry["phrase"]
    assert sidecar["score_threshold"] == pytest.approx(
        load_checkpoint(run / "grounding.pt")["state"]["calibration"]["threshold"])
    if entry["groundable"]:
        loaded = read_map(tmp_path / "out" / entry["map"], like=io.read_volume(flipped))
        assert 0.0 <= loaded.array.min() and loaded.array.max() <= 1.0
    # the LAS map is the RAS map flipped back: grounding happened in the same space
    code = _cli(["ground", "infer", "--checkpoint", str(run / "grounding.pt"), "--image", str(image), "--text",
                 "a 30 mm hypodense lesion in the upper liver", "-o", str(tmp_path / "ras")])
    ras = json.loads((tmp_path / "ras" / "results.json").read_text())["results"][0]
    assert code == 0 and ras["score"] == pytest.approx(entry["score"], abs=1e-4)


def test_infer_on_a_real_mr_warns_about_the_modality(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    report = tmp_path / "report.txt"
    report.write_text("Findings: A 20 mm cyst in the lower left kidney. The spleen is unremarkable.\n")
    code = _cli(["ground", "infer", "--checkpoint", str(run / "grounding.pt"), "--image", str(NIBABEL_MR),
                 "--report", str(report), "--modality", "MR", "-o", str(tmp_path / "mr")])
    err = capsys.readouterr().err
    assert code == 0 and "modality MR, the model was trained on CT" in err and "voxel size" in err
    listing = json.loads((tmp_path / "mr" / "results.json").read_text())["results"]
    assert [r["kind"] for r in listing] == ["finding", "normal"] and not listing[1]["groundable"]
    for row in listing:
        if row["groundable"]:
            loaded = read_map(tmp_path / "mr" / row["map"])
            assert loaded.array.shape == (33, 41, 25)
            np.testing.assert_allclose(loaded.affine, nib.load(NIBABEL_MR).affine, atol=1e-4)
    code = _cli(["ground", "infer", "--checkpoint", str(run / "grounding.pt"), "--image", str(NIBABEL_MR),
                 "--text", "a cyst", "-o", str(tmp_path / "mr2")])
    assert code == 0 and "does not look like CT" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ bad input


def _cli(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def test_bad_input_is_refused_with_one_line_and_nothing_written(trained, hospital: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    run, _ = trained
    image = hospital.parent / json.loads(hospital.read_text())["test"][0]["image"]
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
        (["--text", "   "], "the phrase is empty"),
        (["--report", str(empty)], "the report is empty"),
        (["--report", str(binary)], "not a text file"),
        (["--report", str(latin)], "not UTF-8 text"),
        (["--text", "x", "--report", str(empty)], "exactly one of --text"),
        (["--text", "cyst", "--modality", "PET"], "--modality: 'PET'"),
    ]
    for extra, message in cases:
        out = tmp_path / "out"
        assert _cli(["ground", "infer", "--checkpoint", ckpt, "--image", str(image), *extra, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (extra, err)
        assert not out.exists()
    for image_path, checkpoint, message in [(two_d, ckpt, "slice.nii.gz"),
                                            (image, str(seg), "is not a grounding model"),
                                            (tmp_path / "missing.nii.gz", ckpt, "no such file")]:
        out = tmp_path / "out"
        assert _cli(["ground", "infer", "--checkpoint", checkpoint, "--image", str(image_path), "--text", "cyst",
                     "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("x")
    assert _cli(["ground", "infer", "--checkpoint", ckpt, "--image", str(image), "--text", "cyst", "-o",
                 str(tmp_path / "taken")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]


def test_unknown_words_are_answered_with_a_warning(trained, hospital: Path) -> None:
    run, _ = trained
    image = hospital.parent / json.loads(hospital.read_text())["test"][0]["image"]
    grounder = Grounder.load(run / "grounding.pt")
    result = grounder.ground(grounder.prepare(image), ["zorblax quuxifer"])[0]
    assert "no known word" in result.warnings[0] and math.isfinite(result.score)


def test_ground_train_refuses_bad_input_before_writing(hospital: Path, tmp_path: Path) -> None:
    data = json.loads(hospital.read_text())
    data["test"].append(dict(data["training"][0]))  # a training patient in the test split
    leaky = hospital.parent / "leaky.json"
    leaky.write_text(json.dumps(data))
    with pytest.raises(UserError, match="is in more than one split"):
        ground_train(load_config(TINY, GroundingConfig, [f"data.manifest={leaky}"]), tmp_path / "run")
    for entry in data["training"]:
        entry["report"] = ""
    silent = hospital.parent / "silent.json"
    data["test"].pop()
    silent.write_text(json.dumps(data))
    with pytest.raises(UserError, match="have no report to ground"):
        ground_train(load_config(TINY, GroundingConfig, [f"data.manifest={silent}"]), tmp_path / "run")
    with pytest.raises(UserError, match="train.batch_size must be at least 2"):
        load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "train.batch_size=1"])
    with pytest.raises(UserError, match="every objective weight is 0"):
        load_config(TINY, GroundingConfig, [f"data.manifest={hospital}", "objectives.global.weight=0",
                                            "objectives.local.weight=0", "objectives.anatomy.weight=0",
                                            "objectives.prior.weight=0"])
    assert not (tmp_path / "run").exists()


def test_read_report_keeps_the_findings(tmp_path: Path) -> None:
    report = tmp_path / "r.txt"
    report.write_text("CT chest, study S1.\nFindings: A 9 mm cyst in the left kidney. Spine: no focal lesion.\n"
                      "Impression: One focal lesion.\n", encoding="utf-8")
    assert read_report(report) == ["A 9 mm cyst in the left kidney.", "Spine: no focal lesion."]
    report.write_text("Nodule of 8 mm in the lower right lung.\nThe heart is normal in size.", encoding="utf-8")
    assert read_report(report) == ["Nodule of 8 mm in the lower right lung.", "The heart is normal in size."]


def test_the_feature_ceiling_probe_scores_lesion_voxels_of_held_out_patients(hospital: Path) -> None:
    from medssl.bench.grounding import feature_ceiling

    figures = feature_ceiling(hospital, None, config=TINY)
    assert 0.0 <= figures["auroc_lesion_voxels"] <= 1.0 and 0.0 <= figures["pointing_game"] <= 1.0
    assert figures["studies_with_lesion"] >= 1 and 0.0 < figures["lesion_share_of_body"] < 0.1
