"""`reid evaluate-features` through the real `reid` app: JSON contract, table, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evaluation.feature_file import FeatureFileError, load_feature_file, save_feature_file
from evaluation.metrics import evaluate_features
from reid_cli import _load_commands, app


@pytest.fixture(scope="module")
def runner() -> CliRunner:
    if not any(c.name == "evaluate-features" for c in app.registered_commands):
        _load_commands()
    return CliRunner()


def invoke(runner: CliRunner, *args: str):
    return runner.invoke(app, ["evaluate-features", *args])


def write_split(folder: Path, seed: int = 0, dim: int = 16) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, dim))
    q_pids, g_pids = np.arange(20).repeat(2), rng.integers(0, 20, 200)
    save_feature_file(folder / "q.npz", (centers[q_pids] + rng.normal(size=(40, dim))).astype(np.float32),
                      q_pids, np.zeros(40, dtype=np.int64))
    save_feature_file(folder / "g.npz", (centers[g_pids] + rng.normal(size=(200, dim))).astype(np.float32),
                      g_pids, rng.integers(1, 4, 200))
    return folder / "q.npz", folder / "g.npz"


def check_contract(result: dict) -> None:
    for key in ("mAP", "cmc", "mINP", "num_valid_queries", "protocol", "ap_mode"):
        assert key in result
    assert {"1", "5", "10"} <= set(result["cmc"])
    for value in [result["mAP"], result["mINP"], *result["cmc"].values()]:
        assert 0.0 <= value <= 1.0
    assert isinstance(result["num_valid_queries"], int) and result["num_valid_queries"] > 0


def test_json_output_matches_the_library(runner, tmp_path):
    q, g = write_split(tmp_path)
    res = invoke(runner, "--query", str(q), "--gallery", str(g), "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    check_contract(out)
    assert (out["protocol"], out["ap_mode"], out["metric"], out["rerank"]) == (
        "market1501", "standard", "cosine", False
    )
    qf, gf = load_feature_file(q), load_feature_file(g)
    expected = evaluate_features(
        qf.features, gf.features, qf.pids, gf.pids, qf.camids, gf.camids, device="cpu"
    )
    assert out["mAP"] == pytest.approx(expected["mAP"])
    assert out["num_valid_queries"] == 40


def test_options_reach_the_evaluator(runner, tmp_path):
    q, g = write_split(tmp_path)
    res = invoke(runner, "--query", str(q), "--gallery", str(g), "--json", "--metric", "euclidean",
                 "--ap-mode", "devkit", "--rerank", "--max-rank", "20", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    check_contract(out)
    assert (out["metric"], out["ap_mode"], out["rerank"]) == ("euclidean", "devkit", True)
    assert len(out["cmc_curve"]) == 20


def test_table_output(runner, tmp_path):
    q, g = write_split(tmp_path)
    res = invoke(runner, "--query", str(q), "--gallery", str(g), "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "mAP" in res.stdout and "rank-1" in res.stdout and "market1501" in res.stdout
    assert "{" not in res.stdout


def test_vehicleid_protocol(runner, tmp_path):
    _, g = write_split(tmp_path)
    res = invoke(runner, "--gallery", str(g), "--protocol", "vehicleid", "--test-size", "10", "--trials", "3",
                 "--seed", "5", "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    check_contract(out)
    assert out["protocol"] == "vehicleid" and out["num_trials"] == 3 and out["seed"] == 5
    assert out["test_size"] == 10
    assert set(out["cmc_std"]) == set(out["cmc"]) and out["mAP_std"] >= 0 and "mINP_std" in out
    table = invoke(runner, "--gallery", str(g), "--protocol", "vehicleid", "--trials", "2", "--device", "cpu")
    assert table.exit_code == 0 and "±" in table.stdout


def _bad_query(folder: Path, gallery: Path, **arrays: np.ndarray) -> list[str]:
    path = folder / "bad.npz"
    with path.open("wb") as fh:
        np.savez(fh, **arrays)
    return ["--query", str(path), "--gallery", str(gallery)]


def _bad_args(case: str, folder: Path, query: Path, gallery: Path) -> list[str]:
    feats, ids = np.ones((5, 16), dtype=np.float32), np.arange(5)
    nan_feats = feats.copy()
    nan_feats[2, 3] = np.nan
    narrow = feats[:, :8]
    (folder / "text.npz").write_text("not an archive")
    both = ["--query", str(query), "--gallery", str(gallery)]
    cases = {
        "missing_file": lambda: ["--query", str(folder / "absent.npz"), "--gallery", str(gallery)],
        "missing_array": lambda: _bad_query(folder, gallery, features=feats, pids=ids),
        "length_mismatch": lambda: _bad_query(folder, gallery, features=feats, pids=ids[:4], camids=ids),
        "nan_features": lambda: _bad_query(folder, gallery, features=nan_feats, pids=ids, camids=ids),
        "dimension_mismatch": lambda: _bad_query(folder, gallery, features=narrow, pids=ids, camids=ids),
        "not_npz": lambda: ["--query", str(folder / "text.npz"), "--gallery", str(gallery)],
        "query_with_vehicleid": lambda: [*both, "--protocol", "vehicleid"],
        "no_query": lambda: ["--gallery", str(gallery)],
        "unknown_metric": lambda: [*both, "--metric", "manhattan"],
        "test_size_too_large": lambda: ["--gallery", str(gallery), "--protocol=vehicleid", "--test-size=800"],
    }
    return cases[case]()


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_file", "no such feature file"),
        ("missing_array", "missing array(s) camids"),
        ("length_mismatch", "one entry per feature row"),
        ("nan_features", "NaN"),
        ("dimension_mismatch", "dimension"),
        ("not_npz", "not a readable .npz"),
        ("query_with_vehicleid", "no --query"),
        ("no_query", "--query is required"),
        ("unknown_metric", "unknown metric"),
        ("test_size_too_large", "only 20"),
    ],
)
def test_bad_inputs_give_one_line_errors(runner, tmp_path, case, message):
    q, g = write_split(tmp_path)
    res = invoke(runner, *_bad_args(case, tmp_path, q, g), "--device", "cpu")
    assert res.exit_code != 0
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert message in lines[0]


def test_feature_file_round_trip_and_integer_labels(tmp_path):
    path = save_feature_file(tmp_path / "f.feats", np.zeros((3, 2), np.float32), [1, 2, 3], [0, 0, 1])
    fs = load_feature_file(path)
    assert fs.features.shape == (3, 2) and fs.pids.tolist() == [1, 2, 3] and len(fs) == 3
    with pytest.raises(FeatureFileError, match="integers"):
        save_feature_file(tmp_path / "g.npz", np.zeros((3, 2), np.float32), [1.5, 2, 3], [0, 0, 1])


# --------------------------------------------------------------------------------------------------
# End to end: `reid synth` -> parser -> tiny random-init model -> .npz -> `reid evaluate-features`
# --------------------------------------------------------------------------------------------------


def embed(samples, model) -> np.ndarray:
    """Features of a tiny model at 64x32 (torchvision-style normalisation), one batch."""
    import torch
    from PIL import Image

    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    batch = []
    for s in samples:
        with Image.open(s.path) as im:
            pixels = np.asarray(im.convert("RGB").resize((32, 64)), dtype=np.float32) / 255.0
        batch.append((torch.from_numpy(pixels).permute(2, 0, 1) - mean) / std)
    with torch.inference_mode():
        return model(torch.stack(batch)).numpy()


@pytest.fixture(scope="module")
def tiny_model():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=0).eval()


def test_synth_then_evaluate_features_market1501(runner, tmp_path, tiny_model):
    from training.data.registry import build_dataset

    root = tmp_path / "market"
    res = runner.invoke(app, ["synth", "--kind", "person", "--layout", "market1501", "--out", str(root),
                              "--ids", "8", "--seed", "0", "--images-per-id", "6", "--no-progress"])
    assert res.exit_code == 0, res.output
    data = build_dataset("market1501", root)
    assert data.query and data.gallery
    for split, samples in (("q", data.query), ("g", data.gallery)):
        save_feature_file(tmp_path / f"{split}.npz", embed(samples, tiny_model),
                          [s.pid for s in samples], [s.camid for s in samples])
    res = invoke(runner, "--query", str(tmp_path / "q.npz"), "--gallery", str(tmp_path / "g.npz"), "--json",
                 "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    check_contract(out)
    # Valid queries: those with a gallery image of their identity from another camera.
    expected_valid = sum(
        any(g.pid == q.pid and g.camid != q.camid for g in data.gallery) for q in data.query
    )
    assert out["num_valid_queries"] == expected_valid
    assert out["num_skipped_queries"] == len(data.query) - expected_valid


def test_synth_then_evaluate_features_vehicleid(runner, tmp_path, tiny_model):
    from training.data.registry import build_dataset

    root = tmp_path / "vehicleid"
    res = runner.invoke(app, ["synth", "--kind", "vehicle", "--layout", "vehicleid", "--out", str(root),
                              "--ids", "8", "--seed", "1", "--images-per-id", "4", "--no-progress"])
    assert res.exit_code == 0, res.output
    test = build_dataset("vehicleid", root, test_size=2400).gallery  # the largest list: every test vehicle
    save_feature_file(tmp_path / "test.npz", embed(test, tiny_model), [s.pid for s in test],
                      [s.camid for s in test])
    res = invoke(runner, "--gallery", str(tmp_path / "test.npz"), "--protocol", "vehicleid", "--trials", "3",
                 "--json", "--device", "cpu")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    check_contract(out)
    num_ids = len({s.pid for s in test})
    assert out["test_size"] == num_ids
    assert all(t["num_gallery"] == num_ids for t in out["trials"])
    assert out["num_valid_queries"] == len(test) - num_ids
