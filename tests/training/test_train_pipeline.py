"""End to end on synthetic data: reid train (baseline -> denoiserep) -> reid export -> load_model.

Runs the real commands in-process on datasets written by the synthetic writer in the Market-1501
and VehicleID layouts, read back by the real parsers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from training.__main__ import app
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.data.registry import build_dataset
from training.data.synthetic import write_synthetic
from training.data.transforms import Preprocess, build_test_transform
from training.embedding import evaluate_embedder
from training.export import load_model
from training.model import ReIDModel

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny_cpu.yaml")


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, f"{args}\n{result.output}\n{result.exception!r}"
    return result.output


@pytest.fixture(scope="module")
def market(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "market"
    return write_synthetic(
        out, layout="market1501", ids=48, images_per_id=8, cameras=3, seed=0, progress=False
    )


@pytest.fixture(scope="module")
def pipeline(market, tmp_path_factory) -> dict[str, Path]:
    runs = tmp_path_factory.mktemp("runs")
    _run("train", "-c", CONFIG, "--root", str(market), "--out", str(runs / "base"))
    _run(
        "train",
        "-c",
        CONFIG,
        "--root",
        str(market),
        "--stage",
        "denoiserep",
        "--init",
        str(runs / "base"),
        "--epochs",
        "2",
        "--out",
        str(runs / "dr"),
    )
    _run("export", str(runs / "dr"), "--out", str(runs / "model"))
    return {"base": runs / "base", "dr": runs / "dr", "model": runs / "model"}


def test_baseline_learns_far_above_random_init(pipeline, market):
    dataset = build_dataset("market1501", market)
    torch.manual_seed(0)
    random_model = ReIDModel("test_resnet", img_size=(64, 32)).eval()
    ckpt = load_checkpoint(pipeline["base"] / "last.pt")
    transform = build_test_transform(Preprocess.from_dict(ckpt["preprocess"]))
    with torch.inference_mode():
        random_map = evaluate_embedder(random_model, dataset, transform, device="cpu")["mAP"]
    trained_map = ckpt["best"]["mAP"]
    assert trained_map > 2.5 * random_map and trained_map > random_map + 0.08, (trained_map, random_map)
    metrics = [json.loads(line) for line in (pipeline["base"] / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 13))
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    assert all(m["images_per_s"] > 0 for m in metrics)
    summary = json.loads((pipeline["base"] / "summary.json").read_text())
    assert summary["best"]["mAP"] == pytest.approx(trained_map)


def test_denoiserep_stage_alternates_phases_and_exports_fused(pipeline):
    ckpt = load_checkpoint(pipeline["dr"] / "last.pt")
    assert ckpt["denoiserep"]["layers"] == "auto" and ckpt["denoiserep"]["conv_side"] == "input"
    assert [r["phase"] for r in ckpt["history"]] == ["denoiser", "backbone"]
    assert ckpt["history"][0]["denoise_loss"] > 0 and ckpt["history"][1]["denoise_loss"] == 0
    meta = json.loads((pipeline["model"] / "model.json").read_text())
    assert meta["denoiserep"]["num_layers"] > 0 and meta["denoiserep"]["layers"] == "auto"
    assert meta["denoiserep"]["weight_change"]["mean"] > 0
    assert meta["training"]["stage"] == "denoiserep"
    assert meta["evaluation"]["protocol"] == "market1501"
    keys = load_file(str(pipeline["model"] / "model.safetensors")).keys()
    assert not [k for k in keys if "denoiser" in k or k.startswith("classifier")]


def test_loaded_model_embeds_exactly_as_training_time_eval(pipeline, market):
    loaded = load_model(pipeline["model"])
    # The converted (unfused) trained model, as the training loop held it, in eval mode.
    trained = model_from_checkpoint(load_checkpoint(pipeline["dr"] / "best.pt")).eval()
    dataset = build_dataset("market1501", market)
    images = [Image.open(s.path) for s in dataset.query[:12]]
    batch = torch.stack([loaded.preprocess(im) for im in images])
    with torch.inference_mode():
        expected = trained(batch).numpy()
    np.testing.assert_allclose(loaded.embed_images(images, batch_size=5), expected, rtol=0, atol=1e-5)


def test_reid_evaluate_reproduces_the_training_evaluation(pipeline, market):
    out = _run(
        "evaluate",
        "--model",
        str(pipeline["model"]),
        "--dataset",
        "market1501",
        "--root",
        str(market),
        "--json",
        "--num-workers",
        "0",
    )
    result = json.loads(out.strip().splitlines()[-1])
    meta = json.loads((pipeline["model"] / "model.json").read_text())
    assert result["protocol"] == "market1501" and result["ap_mode"] == "standard"
    assert set(result["cmc"]) >= {"1", "5", "10"}
    assert result["num_valid_queries"] > 0 and result["skipped_images"] == 0
    assert result["mAP"] == pytest.approx(meta["evaluation"]["mAP"], abs=1e-6)
    assert result["mINP"] == pytest.approx(meta["evaluation"]["mINP"], abs=1e-6)


def test_vehicleid_baseline_label_free_export(tmp_path):
    root = write_synthetic(
        tmp_path / "vid", layout="vehicleid", ids=24, images_per_id=6, seed=1, progress=False
    )
    common = [
        "-c",
        CONFIG,
        "--dataset",
        "vehicleid",
        "--root",
        str(root),
        "--set",
        "data.size=[48,48]",
        "--set",
        "data.p=4",
        "--set",
        "eval.trials=3",
    ]
    _run("train", *common, "--epochs", "3", "--set", "eval.every=3", "--out", str(tmp_path / "base"))
    _run(
        "train",
        *common,
        "--stage",
        "label-free",
        "--init",
        str(tmp_path / "base"),
        "--epochs",
        "1",
        "--set",
        "denoiserep.epochs=1",
        "--out",
        str(tmp_path / "lf"),
    )
    _run("export", str(tmp_path / "lf"), "--out", str(tmp_path / "model"))
    loaded = load_model(tmp_path / "model")
    meta = loaded.meta
    assert loaded.kind == "vehicle" and loaded.input_size == (48, 48)
    assert meta["evaluation"]["protocol"] == "vehicleid" and meta["evaluation"]["num_trials"] == 3
    assert "mAP_std" in meta["evaluation"]
    assert meta["training"]["stage"] == "label-free" and meta["denoiserep"]["num_layers"] > 0
    out = _run(
        "evaluate",
        "--model",
        str(tmp_path / "model"),
        "--dataset",
        "vehicleid",
        "--root",
        str(root),
        "--test-size",
        "800",
        "--trials",
        "3",
        "--json",
        "--num-workers",
        "0",
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["protocol"] == "vehicleid"
    assert result["mAP"] == pytest.approx(meta["evaluation"]["mAP"], abs=1e-6)
