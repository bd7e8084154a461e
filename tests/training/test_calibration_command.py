"""`reid calibrate`: closed-form DenoiseRep on an exported model and a folder of unlabelled crops."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from training.__main__ import app
from training.data.transforms import Preprocess
from training.export import FORMAT_VERSION, export_model, load_model
from training.model import ReIDModel


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ReIDModel("test_resnet", img_size=None)
    out = tmp_path_factory.mktemp("models") / "plain"
    return export_model(model.eval(), out, kind="person", preprocess=Preprocess(size=(32, 16)))


@pytest.fixture(scope="module")
def crops(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("crops")
    rng = np.random.default_rng(0)
    for camera in range(2):
        sub = folder / f"cam{camera}"
        sub.mkdir()
        for i in range(10):
            pixels = rng.integers(0, 255, size=(40, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(sub / f"{i:03d}.jpg")
    (folder / "cam0" / "broken.jpg").write_bytes(b"not an image")  # skipped, not fatal
    return folder


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, f"{args}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result.output


def test_calibrate_writes_a_plain_model_whose_change_is_recorded(exported, crops, tmp_path):
    out = tmp_path / "calibrated"
    printed = _cli("calibrate", str(exported), "--images", str(crops), "--out", str(out), "--batch-size", "8")
    assert "calibrated on 20 images (1 unreadable skipped)" in printed
    meta = json.loads((out / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    section = meta["denoiserep"]
    assert section["conv_side"] == "input" and section["calibration"]["images"] == 20
    assert section["weight_change"]["mean"] > 1e-4
    assert all(layer["weight_change"] > 0 for layer in section["per_layer"])
    # A plain model (strict load into the vanilla architecture) that embeds differently, but close.
    before, after = load_model(exported), load_model(out)
    x = torch.randn(4, 3, 32, 16)
    cosine = torch.nn.functional.cosine_similarity(before.embed(x), after.embed(x)).min()
    assert 0.5 < float(cosine) < 1 - 1e-6
    stronger = tmp_path / "stronger"
    _cli("calibrate", str(exported), "--images", str(crops), "--out", str(stronger), "--beta-t", "0.2")
    change = json.loads((stronger / "model.json").read_text())["denoiserep"]["weight_change"]["mean"]
    assert change > section["weight_change"]["mean"]  # beta_T is the strength knob


def test_calibrate_refuses_bad_inputs_with_one_line(exported, crops, tmp_path):
    missing = _cli(
        "calibrate", str(exported), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), code=1
    )
    assert "is not a folder" in missing
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "holds no image" in _cli(
        "calibrate", str(exported), "--images", str(empty), "--out", str(tmp_path / "o"), code=1
    )
    bad_beta = _cli(
        "calibrate",
        str(exported),
        "--images",
        str(crops),
        "--out",
        str(tmp_path / "o"),
        "--beta-t",
        "2",
        code=1,
    )
    assert "--beta-t" in bad_beta
    not_a_model = _cli("calibrate", str(crops), "--images", str(crops), "--out", str(tmp_path / "o"), code=1)
    assert "model.json" in not_a_model
    assert not (tmp_path / "o").exists()  # nothing half-written
