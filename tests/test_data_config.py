"""DataConfig: the trainer YAML's ``data:`` section fails loudly on typos and bad values."""

from __future__ import annotations

import pytest
import yaml

from data_pipelines import DataConfig
from data_pipelines.config import INSIGHTFACE_AUG


def test_defaults_and_yaml_round_trip() -> None:
    text = """
    data:
      source: rec
      path: /data/ms1m/train
      num_classes: 93431
      last_batch: pad
      dali_aug: {blur: 0.5}
    """
    cfg = DataConfig.from_dict(yaml.safe_load(text)["data"])
    assert (cfg.source, cfg.path, cfg.num_classes, cfg.last_batch) == (
        "rec",
        "/data/ms1m/train",
        93431,
        "pad",
    )
    assert cfg.dali_aug == {"downscale": 0.0, "blur": 0.5, "hsv": 0.0, "gray": 0.0}
    assert (cfg.reader, cfg.shuffle, cfg.skip_corrupt, cfg.mirror, cfg.num_threads) == (
        "external",
        True,
        False,
        0.5,
        4,
    )
    assert DataConfig.from_dict(cfg.to_dict()) == cfg


def test_dali_aug_true_means_insightface_probabilities() -> None:
    assert DataConfig(path="x", dali_aug=True).dali_aug == INSIGHTFACE_AUG
    assert set(DataConfig(path="x").dali_aug.values()) == {0.0}


def test_unknown_keys_are_named_with_the_allowed_ones() -> None:
    with pytest.raises(
        ValueError, match=r"unknown key\(s\) \['shufle'\]; allowed keys: \[.*'shuffle'"
    ):
        DataConfig.from_dict({"path": "x", "shufle": False})


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"source": "lmdb"}, r"data.source: 'lmdb' is not one of 'rec', 'folder'$"),
        ({"source": "synthetic"}, r"data.source: 'synthetic' is not one of 'rec', 'folder'$"),
        ({"last_batch": "keep"}, r"data.last_batch: 'keep' is not one of 'drop', 'pad'"),
        ({"reader": "mx"}, r"data.reader: 'mx' is not one of 'external', 'native'"),
        ({"shuffle": "yes"}, r"data.shuffle: 'yes' must be true or false"),
        ({"num_threads": 0}, r"data.num_threads: 0 must be a positive integer"),
        ({"num_classes": 2.5}, r"data.num_classes: 2.5 must be a positive integer"),
        ({"mirror": 1.5}, r"data.mirror: 1.5 must be a probability in \[0, 1\]"),
        (
            {"dali_aug": {"blurr": 0.1}},
            r"data.dali_aug: unknown key\(s\) \['blurr'\]; allowed keys: \['downscale'",
        ),
        ({"dali_aug": {"blur": 2}}, r"data.dali_aug.blur: 2 must be a probability"),
        ({"dali_aug": "on"}, r"data.dali_aug: 'on' must be true, false or a mapping"),
        ({"path": None}, r"data.path is required for data.source 'rec'"),
        ({"num_images": 10}, r"data: unknown key\(s\) \['num_images'\]; allowed keys: \["),
        ({"shuffle_buffer": 100}, r"data.shuffle_buffer applies only to data.reader 'native'"),
        ({"stick_to_shard": True}, r"data.stick_to_shard applies only to data.reader 'native'"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DataConfig.from_dict({"path": "/data/train", **override})


def test_a_synthetic_source_is_refused_before_its_keys() -> None:
    with pytest.raises(
        ValueError, match=r"data.source: 'synthetic' is not one of 'rec', 'folder'$"
    ):
        DataConfig.from_dict({"source": "synthetic", "num_classes": 10, "num_images": 100})


def test_native_only_keys_accepted_for_native() -> None:
    cfg = DataConfig(path="x", reader="native", shuffle_buffer=64, stick_to_shard=True)
    assert (cfg.shuffle_buffer, cfg.stick_to_shard) == (64, True)
