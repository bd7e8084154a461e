"""Typed config: YAML loading, dotted overrides, strict types, the shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from training.config import (
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_defaults_are_the_reference_recipe():
    cfg = load_config()
    assert cfg.model.backbone == "vit_small_patch16_224"
    assert cfg.loss.label_smoothing == 0.1 and cfg.loss.denoise_weight == 0.1
    assert cfg.data.k == 4
    assert cfg.denoiserep.timesteps == 1000 and cfg.denoiserep.beta == (1e-4, 2e-3)
    assert cfg.stage_epochs() == cfg.train.epochs


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "optim:\n  lr: 0.1\n  name: adamw\ntrain:\n  stage: denoiserep\ndenoiserep:\n  epochs: 3\n"
    )
    cfg = load_config(
        path, ["optim.lr=0.02", "eval.rerank=true", "data.size=[256, 256]", "data.options.test_size=800"]
    )
    assert cfg.optim.lr == 0.02 and cfg.optim.name == "adamw"
    assert cfg.eval.rerank is True
    assert cfg.data.size == (256, 256)
    assert cfg.data.options == {"test_size": 800}
    assert cfg.stage_epochs() == 3
    # Sections left out keep their defaults; keys left out inside a section too.
    assert cfg.optim.momentum == 0.9 and cfg.loss.triplet_margin == 0.3


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "did you mean 'optim.lr'"),
        ("eval.rerank=yes please", "true or false"),
        ("eval.rerank=1", "true or false"),
        ("optim.name=adam", "one of 'sgd', 'adamw'"),
        ("data.p=1.5", "integer"),
        ("data.size=[1]", "list of 2"),
        ("optimiser.lr=1", "unknown config section"),
        ("optim", "key=value"),
        ("lr=1", "section and a setting"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("train.stage=finetune", "'baseline', 'denoiserep', 'label-free'"),
        ("data.interpolation=cubic", "data.interpolation must be"),
        ("data.erasing_prob=1.5", "erasing_prob"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_booleans_are_real_booleans():
    assert load_config(None, ["eval.rerank=True"]).eval.rerank is True
    assert load_config(None, ["train.channels_last=false"]).train.channels_last is False
    with pytest.raises(ConfigError):
        config_from_dict({"eval": {"rerank": "no"}})


def test_numbers_in_exponent_notation_without_dot(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 3e-4\n")  # PyYAML reads this as a string
    assert load_config(path).optim.lr == pytest.approx(3e-4)


def test_optional_values_accept_null():
    cfg = load_config(None, ["optim.grad_clip=5", "data.size=null"])
    assert cfg.optim.grad_clip == 5.0 and cfg.data.size is None
    assert load_config(None, ["optim.grad_clip=null"]).optim.grad_clip is None


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["data.size=[64, 32]", "optim.grad_clip=1.0", "model.kwargs={depth: 2}"])
    dump_config(cfg, tmp_path / "out.yaml")
    again = config_from_dict(yaml.safe_load((tmp_path / "out.yaml").read_text()))
    assert again == cfg
    assert config_to_dict(again)["data"]["size"] == [64, 32]


def test_parse_override_values_are_yaml():
    assert parse_override("model.kwargs={depth: 2, embed_dim: 64}") == (
        ["model", "kwargs"],
        {"depth": 2, "embed_dim": 64},
    )
    assert parse_override("train.init=") == (["train", "init"], None)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert cfg.data.dataset in ("market1501", "vehicleid")


def test_the_four_configs_are_shipped():
    assert {p.name for p in CONFIGS} >= {
        "market1501_vit_small.yaml",
        "market1501_resnet50.yaml",
        "vehicleid_vit_small.yaml",
        "tiny_cpu.yaml",
    }
