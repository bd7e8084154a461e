"""Training stages and their guarantees: what each DenoiseRep phase may change, label-free training,
corrupt images, the LR schedule, and clear errors for foreseeable mistakes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.training.tiny_data import make_dataset, write_market_layout
from training.__main__ import app
from training.checkpoint import load_checkpoint
from training.config import load_config
from training.data.image_dataset import TrainImageDataset, UnreadableIdentityError
from training.data.transforms import Preprocess, build_test_transform
from training.engine import LRSchedule, Trainer, TrainingError, phase_for_epoch

TINY = [
    "model.backbone=vit_small_patch16_224",
    "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
    "data.size=[32, 16]",
    "data.p=3",
    "data.k=2",
    "data.num_workers=0",
    "data.pad=2",
    "optim.lr=0.05",
    "optim.warmup_epochs=0",
    "train.device=cpu",
    "train.epochs=1",
    "eval.every=-1",
    "denoiserep.lr=0.05",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("d"), train_ids=6, test_ids=3, per_id=4, size=(32, 16))


@pytest.fixture(scope="module")
def baseline(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("base")
    Trainer(load_config(None, TINY), run, dataset=data).fit()
    return run


def _split(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    denoisers = {k: v for k, v in state.items() if ".denoiser_" in k}
    others = {k: v for k, v in state.items() if ".denoiser_" not in k}
    return denoisers, others


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


CNN = ["model.backbone=test_resnet", "model.kwargs={}", "denoiserep.layers=conv"]


@pytest.fixture(scope="module")
def cnn_baseline(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cnn_base")
    Trainer(load_config(None, [*TINY, *CNN]), run, dataset=data).fit()
    return run


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_label_free_changes_only_the_denoisers(arch, baseline, cnn_baseline, data, tmp_path):
    init = baseline if arch == "vit" else cnn_baseline
    extra = [] if arch == "vit" else CNN
    # The training split relabelled to one identity: a labelled recipe could not even batch it (PK),
    # label-free training must not care.
    unlabeled = dataclasses.replace(data, train=[dataclasses.replace(s, pid=0) for s in data.train])
    cfg = load_config(
        None, [*TINY, *extra, "train.stage=label-free", f"train.init={init}", "denoiserep.epochs=2"]
    )
    Trainer(cfg, tmp_path / "lf", dataset=unlabeled).fit()
    before = load_checkpoint(init / "last.pt")["model"]
    after = load_checkpoint(tmp_path / "lf" / "last.pt")["model"]
    denoisers, others = _split(after)
    assert denoisers and all(torch.count_nonzero(v) > 0 for v in denoisers.values())  # trained from 0
    assert others.keys() == before.keys()
    # Weights AND buffers untouched: for the CNN that includes every BatchNorm's running statistics.
    assert not _changed(before, others)
    if arch == "cnn":
        assert any(k.endswith("running_mean") for k in others)


def test_phases_restrict_what_changes(baseline, data, tmp_path):
    overrides = [*TINY, "train.stage=denoiserep", f"train.init={baseline}", "denoiserep.epochs=2"]
    states = []

    def keep(epoch: int, record: dict) -> None:
        states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer = Trainer(load_config(None, overrides), tmp_path / "dr", dataset=data, callbacks=[keep])
    trainer.fit()
    start = dict(load_checkpoint(baseline / "last.pt")["model"])
    d1, o1 = _split(states[0])
    d2, o2 = _split(states[1])
    # Epoch 1 (denoiser phase): only denoisers moved (they start at zero).
    assert all(torch.count_nonzero(v) > 0 for v in d1.values())
    assert not _changed(start, o1)
    # Epoch 2 (backbone phase): the denoisers stayed, the backbone and head moved.
    assert not _changed(d1, d2)
    assert {k for k in _changed(o1, o2) if k.startswith("backbone.")} and "classifier.weight" in _changed(
        o1, o2
    )


def test_phase_schedule():
    cfg = load_config(
        None, ["train.stage=denoiserep", "denoiserep.denoiser_epochs=2", "denoiserep.backbone_epochs=1"]
    )
    assert [phase_for_epoch(cfg, e) for e in range(6)] == ["denoiser", "denoiser", "backbone"] * 2
    cfg = load_config(None, ["train.stage=denoiserep", "denoiserep.first_phase=backbone"])
    assert [phase_for_epoch(cfg, e) for e in range(3)] == ["backbone", "denoiser", "backbone"]
    assert (
        phase_for_epoch(load_config(None, ["train.stage=denoiserep", "denoiserep.mode=joint"]), 3) == "joint"
    )
    assert phase_for_epoch(load_config(None, ["train.stage=label-free"]), 5) == "denoiser"
    assert phase_for_epoch(load_config(None), 0) is None


def test_lr_schedule_warmup_cosine_and_multistep():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [param], "lr": 0.1}, {"params": [], "lr": 1.0}])
    sched = LRSchedule(opt, total_epochs=10, warmup_epochs=2, warmup_factor=0.1, min_lr_ratio=0.0)
    sched.step(0.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    sched.step(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * (0.1 + 0.9 * 0.5))
    sched.step(6.0)  # halfway through the cosine part
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5)  # each group keeps its own base LR
    sched.step(10.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    step = LRSchedule(opt, total_epochs=10, kind="multistep", milestones=[3, 6], gamma=0.1)
    step.step(5.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_corrupt_training_images_are_skipped_and_counted(data, tmp_path):
    broken = data.train[0].path
    copy = tmp_path / "broken.jpg"
    copy.write_bytes(Path(broken).read_bytes()[:100])  # truncated JPEG
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    train = [
        dataclasses.replace(data.train[0], path=str(copy)),
        dataclasses.replace(data.train[1], path=str(empty)),
        *data.train[2:],
    ]
    run = tmp_path / "run"
    cfg = load_config(None, [*TINY, "train.epochs=2"])
    result = Trainer(cfg, run, dataset=dataclasses.replace(data, train=train)).fit()
    assert result.skipped_images == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_images"] == 2 and sorted(summary["skipped_paths"]) == sorted(
        [str(copy), str(empty)]
    )
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["skipped_images"] == 2


def test_all_images_of_an_identity_unreadable_is_a_clear_error(data, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    pid = data.train[0].pid
    train = [dataclasses.replace(s, path=str(bad)) if s.pid == pid else s for s in data.train]
    dataset = TrainImageDataset(train, build_test_transform(Preprocess(size=(32, 16))))
    with pytest.raises(
        UnreadableIdentityError, match=f"all 4 training images of identity {pid} are unreadable"
    ):
        dataset[0]
    item = dataset[len(train) - 1]  # other identities are unaffected
    assert item["skipped"] == "" and item["image"].shape == (3, 32, 16)


def test_denoiserep_stage_requires_init(data, tmp_path):
    with pytest.raises(TrainingError, match="--init"):
        Trainer(load_config(None, [*TINY, "train.stage=denoiserep"]), tmp_path / "x", dataset=data).fit()


def test_run_directory_of_another_stage_is_refused(baseline, data, tmp_path):
    cfg = load_config(None, [*TINY, "train.stage=label-free", f"train.init={baseline}"])
    with pytest.raises(TrainingError, match="holds a 'baseline' run"):
        Trainer(cfg, baseline, dataset=data).fit()


# ---------------------------------------------------------------- the CLI: clear errors, no traceback


def _fails(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    return result.output


def test_cli_missing_dataset_folder(tmp_path):
    out = _fails(
        "train", "--dataset", "market1501", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")
    )
    assert "error:" in out and "does not exist" in out


def test_cli_unknown_backbone(tmp_path):
    root = tmp_path / "m"
    (root / "bounding_box_train").mkdir(parents=True)
    out = _fails(
        "train",
        "--backbone",
        "resnet5O",
        "--dataset",
        "market1501",
        "--root",
        str(root),
        "--out",
        str(tmp_path / "r"),
    )
    assert "unknown backbone 'resnet5O'" in out


def test_cli_checkpoint_of_another_architecture(baseline, tmp_path):
    out = _fails(
        "train",
        "--backbone",
        "resnet18",
        "--stage",
        "denoiserep",
        "--init",
        str(baseline),
        "--dataset",
        "market1501",
        "--root",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
    )
    assert "error:" in out and "trained with backbone 'vit_small_patch16_224'" in out


def test_cli_pretrained_file_whose_shapes_do_not_fit(data, tmp_path):
    from safetensors.torch import save_file

    weights = tmp_path / "wrong.safetensors"
    save_file({"patch_embed.proj.weight": torch.zeros(7, 3, 16, 16)}, str(weights))
    market = write_market_layout(data, tmp_path / "market")
    out = _fails(
        "train",
        "--dataset",
        "market1501",
        "--root",
        str(market),
        "--pretrained",
        str(weights),
        "--set",
        "model.kwargs={depth: 1, embed_dim: 32, num_heads: 2}",
        "--set",
        "data.size=[32, 16]",
        "--set",
        "data.p=3",
        "--set",
        "data.k=2",
        "--out",
        str(tmp_path / "r"),
    )
    assert "error:" in out and "patch_embed.proj.weight" in out


@pytest.mark.parametrize("device", ["cuda:99", "gpu"])
def test_cli_unusable_device(device, tmp_path):
    out = _fails("train", "--device", device, "--out", str(tmp_path / "r"))
    assert "error:" in out and device in out


def test_cli_bad_override(tmp_path):
    out = _fails("train", "--set", "optim.lrr=0.1", "--out", str(tmp_path / "r"))
    assert "did you mean 'optim.lr'" in out


def test_cli_export_errors(tmp_path):
    assert "has no best.pt or last.pt" in _fails("export", str(tmp_path), "--out", str(tmp_path / "m"))
    assert "does not exist" in _fails(
        "evaluate", "--model", str(tmp_path / "none"), "--dataset", "market1501", "--root", str(tmp_path)
    )


def _without_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Training batches without a "label" key: any code path that reads one fails with KeyError."""
    original = TrainImageDataset.__getitem__

    def getitem(self, index):  # a drop-in for the dataset's __getitem__
        item = dict(original(self, index))
        item.pop("label")
        return item

    monkeypatch.setattr(TrainImageDataset, "__getitem__", getitem)


def test_the_denoiser_phase_reads_no_label_and_logs_the_weight_change(
    cnn_baseline, data, tmp_path, monkeypatch
):
    _without_labels(monkeypatch)
    with pytest.raises(KeyError, match="label"):  # the patch bites: a labelled recipe reads labels
        Trainer(load_config(None, [*TINY, *CNN, "train.epochs=1"]), tmp_path / "base", dataset=data).fit()
    overrides = [*TINY, *CNN, "train.stage=denoiserep", f"train.init={cnn_baseline}", "denoiserep.epochs=1"]
    result = Trainer(load_config(None, overrides), tmp_path / "dr", dataset=data).fit()
    (record,) = result.history
    assert record["phase"] == "denoiser" and "accuracy" not in record
    assert record["weight_change_mean"] > 0 and record["weight_change_max"] >= record["weight_change_mean"]
    lf = [*TINY, *CNN, "train.stage=label-free", f"train.init={cnn_baseline}", "denoiserep.epochs=1"]
    Trainer(load_config(None, lf), tmp_path / "lf", dataset=data).fit()
