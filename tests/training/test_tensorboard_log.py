"""TensorBoard sink: opt-in, and what it writes reads back equal to metrics.jsonl."""

from __future__ import annotations

import json
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.training.tiny_data import make_dataset
from training.config import load_config
from training.engine import Trainer
from training.tensorboard_log import TENSORBOARD_DIR, TensorBoardUnavailableError

TINY = [
    "model.backbone=test_resnet",
    "data.size=[32, 16]",
    "data.p=3",
    "data.k=2",
    "data.num_workers=0",
    "optim.warmup_epochs=0",
    "train.device=cpu",
    "train.epochs=2",
    "eval.every=1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d"), train_ids=6, test_ids=3, per_id=4, size=(32, 16))


def test_event_file_holds_the_jsonl_scalars(data, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, [*TINY, "train.tensorboard=true"]), run, dataset=data).fit()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / TENSORBOARD_DIR))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/accuracy", "eval/mAP", "eval/rank1"} <= tags
    for key in ("loss", "accuracy", "lr"):
        scalars = events.Scalars(f"train/{key}")
        assert [s.step for s in scalars] == [r["epoch"] for r in records]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in records], rel=1e-6)
    assert [s.value for s in events.Scalars("eval/mAP")] == pytest.approx(
        [r["evaluation"]["mAP"] for r in records], rel=1e-6
    )


def test_off_by_default_and_a_clear_error_without_the_package(data, tmp_path, monkeypatch):
    Trainer(load_config(None, [*TINY, "train.epochs=1", "eval.every=-1"]), tmp_path / "a", dataset=data).fit()
    assert not (tmp_path / "a" / TENSORBOARD_DIR).exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were missing
    with pytest.raises(TensorBoardUnavailableError, match="pip install tensorboard"):
        cfg = load_config(None, [*TINY, "train.epochs=1", "train.tensorboard=true"])
        Trainer(cfg, tmp_path / "b", dataset=data).fit()
