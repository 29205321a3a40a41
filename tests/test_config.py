"""Configs: YAML + dotted overrides -> validated objects; every mistake names its key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import Field

from medssl.config import StrictModel, TrainConfig, dump_config, load_config, parse_overrides, validate_config
from medssl.data.preprocessing import VolumeDataConfig
from medssl.downstream.grounding.config import GroundingConfig
from medssl.downstream.segmentation.config import FinetuneSegConfig
from medssl.downstream.ts_classification import EvalTimeseriesConfig
from medssl.errors import UserError
from medssl.pretrain.timeseries import PretrainTimeseriesConfig
from medssl.pretrain.volume import PretrainVolumeConfig


class VolumeTaskConfig(StrictModel):
    """A volume task's data and train sections plus a free-form section: the schema these tests load."""

    data: VolumeDataConfig
    train: TrainConfig
    model: dict[str, Any] = Field(default_factory=dict)


REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
SCHEMA_OF = {"pretrain_volume": PretrainVolumeConfig, "pretrain_volume_mae": PretrainVolumeConfig,
             "finetune_seg": FinetuneSegConfig, "grounding": GroundingConfig,
             "pretrain_timeseries": PretrainTimeseriesConfig, "pretrain_timeseries_physionet": PretrainTimeseriesConfig,
             "pretrain_timeseries_comet_matched": PretrainTimeseriesConfig,
             "pretrain_timeseries_comet_b256": PretrainTimeseriesConfig,
             "eval_timeseries": EvalTimeseriesConfig}


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


BASE = {"data": {"manifest": "m.json"}, "train": {"steps": 5, "batch_size": 2}}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_validates(path: Path) -> None:
    schema = SCHEMA_OF[path.stem.removesuffix("_tiny")]
    config = load_config(path, schema)
    assert config.train.steps > 0 and config.train.batch_size > 0
    assert config.data.manifest.is_absolute()


def test_overrides_are_typed_and_nested(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), VolumeTaskConfig,
                         ["train.steps=20", "data.crop_size=[16, 16, 24]", "model.width=16", "train.amp=false"])
    assert config.train.steps == 20
    assert config.data.crop_size == (16, 16, 24)
    assert config.model == {"width": 16}
    assert config.train.amp is False


def test_relative_manifest_resolves_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(write(tmp_path, BASE), VolumeTaskConfig)
    assert config.data.manifest == tmp_path / "m.json"


@pytest.mark.parametrize("override, needle", [
    (["train.stepz=3"], "unknown key 'train.stepz'"),
    (["train.steps=abc"], "field 'train.steps'"),
    (["train.steps=-1"], "field 'train.steps'"),
    (["data.window=[40, -5]"], "field 'data.window[1]'"),
    (["data.small_volume=crop"], "field 'data.small_volume'"),
    (["data.percentiles=[99, 1]"], "field 'data.percentiles': need 0 <= lower < upper <= 100"),
    (["data.modality=XR"], "field 'data.modality'"),
    (["nonsense"], "override 'nonsense'"),
    (["train.steps.x=1"], "train.steps is a value"),
])
def test_bad_values_name_the_key(tmp_path: Path, override: list[str], needle: str) -> None:
    with pytest.raises(UserError, match="^") as info:
        load_config(write(tmp_path, BASE), VolumeTaskConfig, override)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_required_key_and_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="missing key 'train.batch_size'"):
        validate_config({"data": {"manifest": "m"}, "train": {"steps": 1}}, VolumeTaskConfig)
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", VolumeTaskConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(UserError, match=r"bad\.yaml: invalid YAML"):
        load_config(bad, VolumeTaskConfig)
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="must be a YAML mapping"):
        load_config(bad, VolumeTaskConfig)


def test_dump_roundtrips(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), VolumeTaskConfig, ["train.seed=7"])
    again = validate_config(yaml.safe_load(dump_config(config)), VolumeTaskConfig)
    assert again == config


def test_parse_overrides_yaml_values() -> None:
    assert parse_overrides(["a.b=1.5", "c=null", "d=[1, 2]", "e=text"]) == {"a.b": 1.5, "c": None, "d": [1, 2],
                                                                            "e": "text"}
