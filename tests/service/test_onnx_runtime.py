"""The service on the ONNX Runtime backend: a real `reid serve --runtime onnx` process over HTTP, whose
search scores are the PyTorch model's, and the start-up refusal of a model without model.onnx."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from bench.server import reid_server, serve_args
from service.cli import register
from service.settings import load_settings
from tests.service.conftest import INPUT_SIZE, jpeg_bytes
from training.export import export_model, load_model
from training.model import ReIDModel
from training.onnx_runtime import ONNX_NAME

ARCH, KWARGS = "resnet18", {"layers": (1, 1, 1, 1)}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = ReIDModel(ARCH, img_size=INPUT_SIZE, backbone_kwargs=KWARGS).eval()
    for module in model.modules():  # random running statistics: less alike random-init features
        if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 1.5)
    out = tmp_path_factory.mktemp("onnx-model") / "person"
    return export_model(
        model, out, kind="person", preprocess={"size": INPUT_SIZE, "interpolation": "bilinear"}, onnx=True
    )


def _torch_embedding(model_dir: Path, jpeg: bytes) -> np.ndarray:
    loaded = load_model(model_dir, runtime="torch")
    with Image.open(io.BytesIO(jpeg)) as img:
        return loaded.embed(loaded.preprocess(img)[None]).numpy()[0]


def test_reid_serve_runtime_onnx_serves_the_pytorch_embeddings(onnx_model: Path, tmp_path: Path) -> None:
    args = serve_args(
        onnx_model, f"sqlite:///{tmp_path / 'reid.sqlite3'}", tmp_path / "data", tmp_path, "cpu"
    )
    env = {"REID_RUNTIME": "onnx", "REID_DECODE_PROCESSES": "0", "REID_RATE_LIMIT_PER_S": "0"}
    seeds = [11, 12, 13, 14]
    server = reid_server(args, env, tmp_path / "server.log")
    with server as url, httpx.Client(base_url=url, timeout=60) as client:
        (model,) = client.get("/v1/models").json()
        assert model["runtime"] == "onnx" and model["dtype"] == "float32"
        gallery = client.post("/v1/galleries", json={"name": "lobby", "model": "person"}).json()
        files = [("image", (f"{s}.jpg", jpeg_bytes(s), "image/jpeg")) for s in seeds]
        items = client.post(f"/v1/galleries/{gallery['id']}/items", files=files).json()["items"]
        query = jpeg_bytes(seeds[0])
        r = client.post(
            f"/v1/galleries/{gallery['id']}/search",
            files=[("image", ("q.jpg", query, "image/jpeg"))],
            data={"k": len(seeds)},
        )
        assert r.status_code == 200, r.text
        results = r.json()["queries"][0]["results"]
    assert results[0]["item_id"] == items[0]["id"] and results[0]["score"] > 0.9999
    # Every score is the inner product of the PyTorch model's embeddings of the same JPEGs.
    q = _torch_embedding(onnx_model, query)
    by_id = {item["id"]: seed for item, seed in zip(items, seeds, strict=True)}
    for hit in results:
        expected = float(q @ _torch_embedding(onnx_model, jpeg_bytes(by_id[hit["item_id"]])))
        assert hit["score"] == pytest.approx(expected, abs=1e-4)
    assert "onnx runtime" in (tmp_path / "server.log").read_text()


def test_reid_serve_runtime_onnx_refuses_a_model_without_model_onnx(onnx_model: Path, tmp_path: Path) -> None:
    bare = shutil.copytree(onnx_model, tmp_path / "bare")
    (bare / ONNX_NAME).unlink()
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["serve", "--runtime", "onnx", "--model", f"person={bare}"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert "has no model.onnx" in text and "reid export-onnx" in text


def test_runtime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REID_CONFIG", "REID_RUNTIME", "REID_ONNX_PROVIDER"):
        monkeypatch.delenv(name, raising=False)
    assert load_settings().runtime == "auto" and load_settings().onnx_provider == "auto"
    monkeypatch.setenv("REID_RUNTIME", "onnx")
    monkeypatch.setenv("REID_ONNX_PROVIDER", "tensorrt")
    settings = load_settings()
    assert settings.runtime == "onnx" and settings.onnx_provider == "tensorrt"
    assert load_settings(runtime="torch").runtime == "torch"
    monkeypatch.setenv("REID_RUNTIME", "tensorflow")
    with pytest.raises(ValueError, match=r"REID_RUNTIME=.tensorflow. is not valid: expected one of auto"):
        load_settings()
