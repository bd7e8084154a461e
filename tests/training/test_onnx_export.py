"""ONNX export through ONNX Runtime against the PyTorch model ``load_model`` serves, for every backbone
family the project trains, and the export's and the ONNX runtime's errors."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from training.__main__ import app
from training.checkpoint import save_checkpoint
from training.data.transforms import Preprocess
from training.export import (
    FORMAT_VERSION,
    ModelExistsError,
    ModelFormatError,
    add_onnx,
    export_model,
    load_model,
)
from training.inference import embedding_cosines, probe_batch
from training.model import ReIDModel
from training.onnx_export import ONNX_OPSET, OnnxExportError
from training.onnx_runtime import ONNX_MIN_COSINE, ONNX_NAME, OnnxRuntimeError, resolve_runtime

SIZE = (64, 32)
PREP = Preprocess(size=SIZE, interpolation="bilinear")
VIT_TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
RESNET_TINY = {"layers": (1, 1, 1, 1)}

#: One tiny configuration per backbone family the project trains (random init, depth 1-2).
FAMILIES = [
    pytest.param("vit_small_patch16_224", VIT_TINY, id="vit"),
    pytest.param("deit_tiny_patch16_224", {"depth": 1}, id="deit"),
    pytest.param(
        "swin_tiny_patch4_window7_224",
        {"depths": (1, 1), "num_heads": (1, 2), "embed_dim": 32, "window_size": 4},
        id="swin",
    ),
    pytest.param("resnet18", RESNET_TINY, id="resnet"),
    pytest.param("mobilenetv2_050", {"depth_multiplier": 0.1}, id="mobilenet"),
    # timm's tiny EfficientNet: the same builder and blocks (depthwise, squeeze-excite, SiLU) as B0.
    pytest.param("test_efficientnet", {}, id="efficientnet"),
    pytest.param("convnext_atto", {"depths": (1, 1, 1, 1)}, id="convnext"),
]


def _trained_like(model: ReIDModel, seed: int = 0) -> ReIDModel:
    """Gives BatchNorm layers the running statistics of their inputs, as training would.

    Exact averages (momentum None) over image-like batches: with the initial statistics a random-init
    EfficientNet maps every image to nearly the same embedding, which would make any parity trivial.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(2):
            model(probe_batch(16, SIZE, seed=100 * seed + i))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


def _views(ids: int, views: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic re-identification split: ``views`` noisy views of ``ids`` smooth base images."""
    base = probe_batch(ids, SIZE, seed=0)
    gen = torch.Generator().manual_seed(seed)
    images = base.repeat_interleave(views, 0) + 0.5 * torch.randn(ids * views, 3, *SIZE, generator=gen)
    return images, torch.arange(ids).repeat_interleave(views)


def _exported(arch: str, kwargs: dict, out: Path, *, seed: int = 0) -> tuple[ReIDModel, Path]:
    torch.manual_seed(seed)
    model = _trained_like(ReIDModel(arch, img_size=SIZE, backbone_kwargs=kwargs), seed)
    return model, export_model(model, out, kind="person", preprocess=PREP, onnx=True)


@pytest.mark.parametrize("arch,kwargs", FAMILIES)
def test_onnx_runtime_reproduces_load_model_at_batch_1_and_32(arch, kwargs, tmp_path):
    _, out = _exported(arch, kwargs, tmp_path / "m")
    meta = json.loads((out / "model.json").read_text())
    section = meta["onnx"]
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert section["opset"] == ONNX_OPSET and section["weights_sha256"] == meta["weights_sha256"]
    assert section["input"]["shape"] == ["batch", 3, *SIZE] and section["input"]["layout"] == "NCHW"
    assert section["input"]["mean"] == list(PREP.mean) and section["input"]["interpolation"] == "bilinear"
    assert section["output"]["l2_normalized"]
    assert section["output"]["shape"] == ["batch", meta["embedding"]["dim"]]
    graph = onnx.load(str(out / ONNX_NAME)).graph
    shape = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert graph.input[0].name == "images" and shape == ["batch", 3, *SIZE]

    reference = load_model(out, runtime="torch")
    served = load_model(out, runtime="onnx")
    assert reference.runtime == "torch" and served.runtime == "onnx"
    assert served.engine.describe()["providers"] == ["CPUExecutionProvider"]

    gallery, gallery_ids = _views(ids=8, views=4, seed=1)  # 32 images: one batch of 32
    queries, query_ids = _views(ids=8, views=1, seed=2)  # one query at a time: batch 1
    g_torch, g_onnx = reference.embed(gallery), served.embed(gallery)
    q_torch = torch.cat([reference.embed(q[None]) for q in queries])
    q_onnx = torch.cat([served.embed(q[None]) for q in queries])
    assert g_onnx.shape == (32, reference.dim) and q_onnx.shape == (8, reference.dim)
    assert float(embedding_cosines(g_onnx, g_torch).min()) >= ONNX_MIN_COSINE
    assert float(embedding_cosines(q_onnx, q_torch).min()) >= ONNX_MIN_COSINE
    torch.testing.assert_close(g_onnx.norm(dim=1), torch.ones(32), rtol=0, atol=1e-5)

    rank1_torch = (q_torch @ g_torch.T).argmax(dim=1)
    rank1_onnx = (q_onnx @ g_onnx.T).argmax(dim=1)
    assert torch.equal(rank1_onnx, rank1_torch)
    # Not a degenerate model that embeds every image alike (where any parity would hold).
    similarity = g_torch @ g_torch.T
    assert float(similarity[~torch.eye(32, dtype=torch.bool)].mean()) < 0.9
    assert len(set(gallery_ids[rank1_torch].tolist())) >= 3 and query_ids.numel() == 8


@pytest.mark.parametrize(
    "arch,kwargs,layers", [("vit_small_patch16_224", VIT_TINY, "mlp"), ("resnet18", RESNET_TINY, "conv")]
)
def test_denoiserep_model_converted_then_fused_exports_to_onnx(arch, kwargs, layers, tmp_path):
    from training import denoiserep

    torch.manual_seed(3)
    model = ReIDModel(arch, img_size=SIZE, backbone_kwargs=kwargs)
    denoiserep.convert(model.backbone, layers=layers)
    with torch.no_grad():  # non-zero denoisers, so that fusion changes the weights
        for p in denoiserep.denoiser_parameters(model.backbone):
            p.normal_(0, 0.02)
    model = _trained_like(model)
    out = export_model(model, tmp_path / "m", kind="person", preprocess=PREP, onnx=True)
    assert denoiserep.is_converted(model.backbone)
    served = load_model(out, runtime="onnx")
    for n in (1, 32):
        x = probe_batch(n, SIZE, seed=n)
        with torch.no_grad():
            unfused = model(x)  # eval mode: the explicit denoise-then-layer computation
        assert float(embedding_cosines(served.embed(x), unfused).min()) >= ONNX_MIN_COSINE


@torch.library.custom_op("reidtest::mystery", mutates_args=())
def _mystery(x: torch.Tensor) -> torch.Tensor:
    return x.relu()


@_mystery.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Mystery(nn.Module):
    """A layer whose operator has no ONNX translation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mystery(x)


def test_export_failure_names_the_layer_the_operator_and_the_opset(tmp_path):
    model = ReIDModel("resnet18", img_size=SIZE, backbone_kwargs=RESNET_TINY).eval()
    model.backbone.layer2[0].act1 = Mystery()
    with pytest.raises(OnnxExportError) as err:
        export_model(model, tmp_path / "m", kind="person", preprocess=PREP, onnx=True)
    message = str(err.value)
    assert "layer backbone.layer2.0.act1 (Mystery)" in message
    assert "reidtest.mystery" in message and f"opset {ONNX_OPSET}" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written, no temporary directory left


def test_opset_below_the_exporters_is_refused_and_a_higher_one_is_recorded(tmp_path):
    torch.manual_seed(0)
    model = ReIDModel("resnet18", img_size=SIZE, backbone_kwargs=RESNET_TINY).eval()
    with pytest.raises(OnnxExportError, match=r"opset 17 cannot be exported: choose 18"):
        export_model(model, tmp_path / "a", kind="person", preprocess=PREP, onnx=True, onnx_opset=17)
    out = export_model(model, tmp_path / "b", kind="person", preprocess=PREP, onnx=True, onnx_opset=20)
    assert json.loads((out / "model.json").read_text())["onnx"]["opset"] == 20
    opsets = {o.domain: o.version for o in onnx.load(str(out / ONNX_NAME)).opset_import}
    assert opsets[""] == 20
    assert load_model(out, runtime="onnx").engine.parity["min_cosine"] >= ONNX_MIN_COSINE


@pytest.fixture(scope="module")
def cnn_dir(tmp_path_factory) -> Path:
    """An exported tiny CNN with model.onnx."""
    return _exported("resnet18", RESNET_TINY, tmp_path_factory.mktemp("cnn") / "m")[1]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_meta(model_dir: Path, **changes) -> None:
    meta = json.loads((model_dir / "model.json").read_text())
    meta.update(changes)
    (model_dir / "model.json").write_text(json.dumps(meta))


def test_runtime_auto_takes_onnx_for_a_cnn_on_cpu_only_with_a_file(cnn_dir, tmp_path):
    assert load_model(cnn_dir, runtime="auto").runtime == "onnx"
    bare = _copy(cnn_dir, tmp_path / "bare")
    (bare / ONNX_NAME).unlink()
    _edit_meta(bare, onnx=None)
    assert load_model(bare, runtime="auto").runtime == "torch"
    assert load_model(cnn_dir).runtime == "torch"  # the library default stays torch
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu, has_onnx=True, is_cnn=False) == "torch"  # transformers
    assert resolve_runtime("auto", cuda, has_onnx=True, is_cnn=True) == "torch"
    assert resolve_runtime("onnx", cuda, has_onnx=False, is_cnn=False) == "onnx"
    with pytest.raises(ValueError, match="runtime must be one of auto, torch, onnx"):
        resolve_runtime("tensorflow", cpu, has_onnx=True, is_cnn=True)


def test_runtime_onnx_without_a_file_says_to_export_one(cnn_dir, tmp_path):
    bare = _copy(cnn_dir, tmp_path / "bare")
    (bare / ONNX_NAME).unlink()
    with pytest.raises(OnnxRuntimeError, match=r"has no model\.onnx: run `reid export-onnx "):
        load_model(bare, runtime="onnx")
    _edit_meta(bare, onnx=None)
    with pytest.raises(OnnxRuntimeError, match=r"no onnx section in model\.json"):
        load_model(bare, runtime="onnx")


def test_a_corrupt_or_foreign_onnx_file_is_refused_and_auto_falls_back(cnn_dir, tmp_path, caplog):
    bad = _copy(cnn_dir, tmp_path / "bad")
    data = bytearray((bad / ONNX_NAME).read_bytes())
    data[-1] ^= 0xFF
    (bad / ONNX_NAME).write_bytes(bytes(data))
    with pytest.raises(OnnxRuntimeError, match="does not match the checksum"):
        load_model(bad, runtime="onnx")
    with caplog.at_level(logging.WARNING, logger="training.onnx_runtime"):
        assert load_model(bad, runtime="auto").runtime == "torch"
    assert "running model bad on torch" in caplog.text

    escape = _copy(cnn_dir, tmp_path / "escape")
    meta = json.loads((escape / "model.json").read_text())
    _edit_meta(escape, onnx={**meta["onnx"], "file": "../cnn/m/model.onnx"})
    with pytest.raises(OnnxRuntimeError, match="names no valid file"):
        load_model(escape, runtime="onnx")


def test_a_file_that_does_not_reproduce_the_weights_fails_the_parity_check(cnn_dir, tmp_path):
    # Another model's ONNX file, with model.json edited so that every checksum agrees: only the
    # comparison with the PyTorch model at load can tell.
    _, other = _exported("resnet18", RESNET_TINY, tmp_path / "other", seed=7)
    swapped = _copy(cnn_dir, tmp_path / "swapped")
    shutil.copy(other / ONNX_NAME, swapped / ONNX_NAME)
    meta = json.loads((swapped / "model.json").read_text())
    section = json.loads((other / "model.json").read_text())["onnx"]
    _edit_meta(swapped, onnx={**section, "weights_sha256": meta["weights_sha256"]})
    with pytest.raises(OnnxRuntimeError, match="does not reproduce the PyTorch model's embeddings"):
        load_model(swapped, runtime="onnx")


def test_provider_and_option_errors_say_what_to_do(cnn_dir):
    with pytest.raises(OnnxRuntimeError, match="install onnxruntime-gpu in place of onnxruntime"):
        load_model(cnn_dir, runtime="onnx", onnx_provider="cuda")
    with pytest.raises(OnnxRuntimeError, match=r"provider 'tensorrt'.*not available"):
        load_model(cnn_dir, runtime="onnx", onnx_provider="tensorrt")
    with pytest.raises(OnnxRuntimeError, match="unknown ONNX Runtime provider 'tpu'"):
        load_model(cnn_dir, runtime="onnx", onnx_provider="tpu")
    with pytest.raises(OnnxRuntimeError, match="dtype and compile are options of the torch runtime"):
        load_model(cnn_dir, runtime="onnx", dtype=torch.bfloat16)
    served = load_model(cnn_dir, runtime="onnx")
    with pytest.raises(ValueError, match="takes 64x32 inputs, got 32x32"):
        served.embed(torch.zeros(1, 3, 32, 32))
    assert served.embed(torch.zeros(0, 3, *SIZE)).shape == (0, served.dim)


def test_older_format_versions_load_and_a_newer_one_is_refused(cnn_dir, tmp_path):
    old = _copy(cnn_dir, tmp_path / "old")
    (old / ONNX_NAME).unlink()
    meta = json.loads((old / "model.json").read_text())
    del meta["onnx"]
    (old / "model.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert load_model(old).version == meta["weights_sha256"][:12]
    _edit_meta(old, format_version=2)
    assert load_model(old).version == meta["weights_sha256"][:12]
    _edit_meta(old, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ModelFormatError, match="reads versions 1, 2, 3; it was written by a newer version"):
        load_model(old)


def _cli(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == code, f"{args}\n{result.output}\n{result.exception!r}"
    assert "Traceback" not in result.output
    return result.output


def test_export_onnx_command_adds_onnx_to_a_version_1_directory(cnn_dir, tmp_path):
    old = _copy(cnn_dir, tmp_path / "old")
    (old / ONNX_NAME).unlink()
    meta = json.loads((old / "model.json").read_text())
    del meta["onnx"]
    meta["format_version"] = 1
    (old / "model.json").write_text(json.dumps(meta))
    weights = (old / "model.safetensors").read_bytes()

    assert "min cosine with PyTorch" in _cli("export-onnx", str(old))
    after = json.loads((old / "model.json").read_text())
    assert after["format_version"] == FORMAT_VERSION and after["onnx"]["file"] == ONNX_NAME
    assert {k: v for k, v in after.items() if k not in ("onnx", "format_version")} == {
        k: v for k, v in meta.items() if k != "format_version"
    }
    assert (old / "model.safetensors").read_bytes() == weights
    assert load_model(old, runtime="onnx").runtime == "onnx"
    assert sorted(p.name for p in old.iterdir()) == ["model.json", ONNX_NAME, "model.safetensors"]

    assert "pass --overwrite" in _cli("export-onnx", str(old), code=1)
    _cli("export-onnx", str(old), "--overwrite")
    assert "does not exist" in _cli("export-onnx", str(tmp_path / "nowhere"), code=1)
    with pytest.raises(ModelExistsError):
        add_onnx(old)


def test_reid_export_onnx_flag_writes_model_onnx_from_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = ReIDModel("resnet18", img_size=SIZE, num_classes=3, backbone_kwargs=RESNET_TINY)
    save_checkpoint(
        tmp_path / "run" / "last.pt",
        {
            "architecture": {**model.architecture(), "num_classes": 3, "embedding": "bn"},
            "model": model.state_dict(),
            "kind": "vehicle",
            "preprocess": PREP.to_dict(),
            "epoch": 1,
        },
    )
    run = str(tmp_path / "run")
    assert "(with model.onnx)" in _cli("export", run, "--out", str(tmp_path / "m"), "--onnx")
    served = load_model(tmp_path / "m", runtime="onnx")
    x = probe_batch(4, SIZE, seed=5)
    with torch.no_grad():
        expected = model.eval()(x)
    assert float(embedding_cosines(served.embed(x), expected).min()) >= ONNX_MIN_COSINE
    parity = json.loads((tmp_path / "m" / "model.json").read_text())["onnx"]["parity"]
    assert parity["min_cosine"] >= ONNX_MIN_COSINE and parity["batches"] == [1, 8]
    out = _cli("export", run, "--out", str(tmp_path / "m2"), "--onnx", "--opset", "12", code=1)
    assert "error: opset 12 cannot be exported" in out and not (tmp_path / "m2").exists()
