from pathlib import Path

import pytest

from echoic.config import apply_overrides, from_dict, load_yaml, to_dict
from echoic.data.augment import SpecAugmentConfig
from echoic.data.dataset import DataConfig
from echoic.errors import ConfigError


def test_defaults_and_nested_sections():
    raw = {"max_frames": 8000, "spec_augment": None, "speed_perturb": [0.9, 1, 1.1]}
    config = from_dict(DataConfig, raw, "data")
    assert config.max_frames == 8000 and config.spec_augment is None
    assert config.speed_perturb == [0.9, 1.0, 1.1]
    assert from_dict(DataConfig, to_dict(config), "data") == config
    assert from_dict(DataConfig, {}, "data").spec_augment == SpecAugmentConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"max_frame": 1},
            r"unknown key 'data.max_frame'; did you mean 'max_frames'\? "
            r"\(allowed in 'data': speed_perturb, spec_augment,",
        ),
        (
            {"spec_augment": {"num_freq_mask": 1}},
            r"unknown key 'data.spec_augment.num_freq_mask'; did you mean 'num_freq_masks'",
        ),
        ({"max_frames": "lots"}, r"'data.max_frames' must be int \| null, got 'lots' \(str\)"),
        ({"num_workers": 1.5}, r"'data.num_workers' must be int, got 1.5"),
        ({"num_workers": True}, r"'data.num_workers' must be int, got True"),
        ({"on_missing_audio": "warn"}, r"'data.on_missing_audio' must be one of 'skip', 'error'"),
        ({"speed_perturb": [0.9, "x"]}, r"'data.speed_perturb\[1\]' must be float"),
        ({"spec_augment": 80}, r"'data.spec_augment' must be a mapping of keys, got 80"),
        ({"batch_size": 8}, r"'data': set exactly one of max_frames and batch_size"),
        ({"spec_augment": {"max_time_ratio": 2}}, r"'data.spec_augment': max_time_ratio must be"),
    ],
)
def test_errors_are_one_line_and_name_the_key(data, message):
    with pytest.raises(ConfigError, match=message) as caught:
        from_dict(DataConfig, data, "data")
    assert "\n" not in str(caught.value)


def test_overrides_use_the_same_validation():
    raw = apply_overrides(
        {"data": {"max_frames": 100}},
        ["data.max_frames=200", "data.spec_augment.time_warp=5", "data.num_workers=0"],
    )
    assert raw == {"data": {"max_frames": 200, "spec_augment": {"time_warp": 5}, "num_workers": 0}}
    config = from_dict(DataConfig, raw["data"], "data")
    assert config.max_frames == 200 and config.spec_augment.time_warp == 5
    with pytest.raises(ConfigError, match=r"must look like section\.key=value"):
        apply_overrides({}, ["data.max_frames"])
    with pytest.raises(ConfigError, match=r"'data\.max_frames' is a value, not a section"):
        apply_overrides(raw, ["data.max_frames.x=1"])
    with pytest.raises(ConfigError, match=r"unknown key 'data\.max_framez'"):
        from_dict(DataConfig, apply_overrides({}, ["data.max_framez=1"])["data"], "data")


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data:\n  max_frames: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: invalid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_yaml(tmp_path / "list.yaml")


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("recipes/*/conf/*.yaml")))
def test_every_recipe_config_parses(path):
    from echoic.train.config import parse_experiment

    parse_experiment(load_yaml(path), where=str(path))
