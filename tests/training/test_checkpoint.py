"""Checkpoints: atomic round trip, safe loading, RNG capture, architecture checks, exact resume."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tests.training.tiny_data import make_dataset
from training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    check_architecture,
    load_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from training.config import load_config
from training.engine import Trainer

TINY = [
    "model.backbone=vit_small_patch16_224",
    "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "data.size=[32, 16]",
    "data.p=3",
    "data.k=2",
    "data.num_workers=0",
    "data.pad=2",
    "optim.name=sgd",
    "optim.lr=0.05",
    "optim.warmup_epochs=1",
    "train.device=cpu",
    "eval.every=2",
    "eval.trials=2",
]


def test_round_trip_and_atomic_write(tmp_path):
    payload = {"model": {"w": torch.arange(4.0)}, "epoch": 3, "nested": {"a": [1, 2]}}
    path = save_checkpoint(tmp_path / "run" / "last.pt", payload)
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and loaded["nested"] == {"a": [1, 2]}
    torch.testing.assert_close(loaded["model"]["w"], torch.arange(4.0))


def test_resolve_prefers_best_then_last(tmp_path):
    save_checkpoint(tmp_path / "last.pt", {"epoch": 2})
    assert resolve_checkpoint(tmp_path).name == "last.pt"
    save_checkpoint(tmp_path / "best.pt", {"epoch": 1})
    assert resolve_checkpoint(tmp_path).name == "best.pt"
    assert resolve_checkpoint(tmp_path / "last.pt").name == "last.pt"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"has no best\.pt or last\.pt"):
        resolve_checkpoint(empty)
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing.pt")


def test_foreign_and_corrupt_files_are_refused(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a `reid train` checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable training checkpoint"):
        load_checkpoint(tmp_path / "corrupt.pt")


def test_rng_state_restores_every_generator(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    first = (torch.rand(3), random.random(), np.random.normal(size=2))
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    second = (torch.rand(3), random.random(), np.random.normal(size=2))
    torch.testing.assert_close(first[0], second[0])
    assert first[1] == second[1]
    np.testing.assert_array_equal(first[2], second[2])


def test_architecture_mismatch_is_explained():
    ckpt = {"architecture": {"backbone": "resnet18", "kwargs": {}}}
    check_architecture(ckpt, "resnet18", {})
    with pytest.raises(CheckpointError, match=r"trained with backbone 'resnet18'.*asks for 'resnet50'"):
        check_architecture(ckpt, "resnet50", {})
    vit = {
        "architecture": {"backbone": "vit_small_patch16_224", "kwargs": {"depth": 2, "img_size": [64, 32]}}
    }
    check_architecture(vit, "vit_small_patch16_224", {"depth": 2})  # img_size comes from the data size
    with pytest.raises(CheckpointError):
        check_architecture(vit, "vit_small_patch16_224", {"depth": 3})


class _Interrupt(RuntimeError):
    pass


def _interrupt_after(epoch_to_stop: int):
    def callback(epoch: int, record: dict) -> None:
        if epoch + 1 == epoch_to_stop:
            raise _Interrupt

    return callback


@pytest.mark.parametrize("stage", ["baseline", "denoiserep"])
def test_interrupted_and_resumed_run_ends_bit_identical(tmp_path, stage):
    dataset = make_dataset(tmp_path / "data", train_ids=6, test_ids=3, per_id=4, size=(32, 16))
    overrides = [*TINY, "train.epochs=4", "denoiserep.epochs=4", "denoiserep.lr=0.01"]
    if stage == "denoiserep":
        base = load_config(None, [*overrides, "train.epochs=1", "eval.every=-1"])
        Trainer(base, tmp_path / "base", dataset=dataset).fit()
        overrides += ["train.stage=denoiserep", f"train.init={tmp_path / 'base' / 'last.pt'}"]
    cfg = load_config(None, overrides)

    full = Trainer(cfg, tmp_path / "full", dataset=dataset).fit()
    with pytest.raises(_Interrupt):
        Trainer(cfg, tmp_path / "resumed", dataset=dataset, callbacks=[_interrupt_after(2)]).fit()
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 2
    resumed = Trainer(cfg, tmp_path / "resumed", dataset=dataset).fit()

    a = load_checkpoint(tmp_path / "full" / "last.pt")
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert a["epoch"] == b["epoch"] == 4
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in full.history] == [r["loss"] for r in resumed.history]
    assert [r["phase"] for r in resumed.history] == (
        [None] * 4 if stage == "baseline" else ["denoiser", "backbone", "denoiser", "backbone"]
    )
    assert full.best["mAP"] == resumed.best["mAP"]
