"""The exported-model format: export -> load round trip, integrity checks, purity of export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.transforms import Preprocess, build_test_transform
from training.export import (
    FORMAT_VERSION,
    ModelExistsError,
    ModelFormatError,
    export_model,
    load_model,
)
from training.model import ReIDModel

VIT_TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}
PREP = Preprocess(size=(64, 32), interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _trained_like(model: ReIDModel, seed: int = 0) -> ReIDModel:
    """Gives BN layers non-trivial running statistics, as training would."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 64, 32, generator=gen) * 2 + 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def vit_model() -> ReIDModel:
    torch.manual_seed(0)
    return _trained_like(
        ReIDModel("vit_small_patch16_224", num_classes=5, img_size=(64, 32), backbone_kwargs=VIT_TINY)
    )


@pytest.fixture(scope="module")
def exported(vit_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("exp") / "model"
    export_model(
        vit_model,
        out,
        kind="person",
        preprocess=PREP,
        training={"dataset": "synthetic"},
        evaluation={"mAP": 0.5, "protocol": "market1501"},
    )
    return out


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (80 + i, 40, 3), dtype=np.uint8)) for i in range(n)]


@pytest.mark.parametrize("arch,kwargs", [("vit_small_patch16_224", VIT_TINY), ("resnet18", {})])
def test_round_trip_gives_identical_embeddings(arch, kwargs, tmp_path):
    torch.manual_seed(1)
    model = _trained_like(ReIDModel(arch, num_classes=3, img_size=(64, 32), backbone_kwargs=kwargs))
    out = export_model(model, tmp_path / "m", kind="vehicle", preprocess=PREP.to_dict())
    loaded = load_model(out)
    x = torch.randn(6, 3, 64, 32)
    with torch.no_grad():
        expected = model(x)
    got = loaded.embed(x)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert loaded.dim == model.embed_dim and loaded.kind == "vehicle"
    assert loaded.module.classifier is None  # not exported unless asked


def test_metadata_contents(exported, vit_model):
    meta = json.loads((exported / "model.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["name"] == "model"
    assert meta["architecture"] == {
        "backbone": "vit_small_patch16_224",
        "kwargs": {**VIT_TINY, "img_size": [64, 32]},
    }
    assert meta["embedding"] == {"dim": 64, "feature": "bn", "normalized": True}
    assert meta["input"] == {
        "size": [64, 32],
        "interpolation": "bilinear",
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
    }
    assert meta["evaluation"]["protocol"] == "market1501"
    assert meta["training"] == {"dataset": "synthetic"}
    assert meta["denoiserep"] is None
    loaded = load_model(exported)
    assert loaded.version == meta["weights_sha256"][:12]
    assert loaded.input_size == (64, 32) and loaded.interpolation == "bilinear"
    assert loaded.meta == meta


def test_preprocess_is_the_shared_test_transform(exported):
    loaded = load_model(exported)
    image = _images(1)[0].convert("L")  # any mode is converted to RGB
    got = loaded.preprocess(image)
    assert got.shape == (3, 64, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, build_test_transform(PREP)(image))


def test_embed_images_matches_model(exported, vit_model):
    loaded = load_model(exported)
    images = _images(5)
    feats = loaded.embed_images(images, batch_size=2)
    assert feats.shape == (5, 64) and feats.dtype == np.float32
    batch = torch.stack([build_test_transform(PREP)(im) for im in images])
    with torch.no_grad():
        expected = vit_model(batch).numpy()
    np.testing.assert_allclose(feats, expected, atol=1e-6)


def test_export_does_not_mutate_the_model(tmp_path):
    torch.manual_seed(2)
    model = ReIDModel("resnet18", num_classes=4, img_size=(64, 32)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, tmp_path / "m", kind="person", preprocess=PREP)
    assert model.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_classifier_included_on_request(tmp_path, vit_model):
    out = export_model(vit_model, tmp_path / "m", kind="person", preprocess=PREP, include_classifier=True)
    loaded = load_model(out)
    torch.testing.assert_close(loaded.module.classifier.weight, vit_model.classifier.weight)


def test_checksum_mismatch_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in exported.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=r"model\.safetensors does not match the checksum"):
        load_model(copy)


@pytest.mark.parametrize("version,hint", [(FORMAT_VERSION + 1, "newer version"), ("1", "re-export")])
def test_wrong_format_version_refused(exported, tmp_path, version, hint):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    meta = json.loads((exported / "model.json").read_text())
    meta["format_version"] = version
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match=hint):
        load_model(copy)


def test_missing_files_refused(exported, tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    only_json = tmp_path / "only_json"
    only_json.mkdir()
    (only_json / "model.json").write_text((exported / "model.json").read_text())
    with pytest.raises(ModelFormatError, match=r"model\.safetensors is missing"):
        load_model(only_json)
    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    (only_weights / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    with pytest.raises(ModelFormatError, match=r"model\.json is missing"):
        load_model(only_weights)
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "model.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match="not valid JSON"):
        load_model(bad_json)


def test_weights_of_another_architecture_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    meta = json.loads((exported / "model.json").read_text())
    meta["architecture"]["kwargs"]["depth"] = 3
    (copy / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelFormatError, match="does not fit architecture"):
        load_model(copy)


def test_refuses_to_overwrite_non_empty_dir(exported, vit_model, tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    with pytest.raises(ModelExistsError, match="not empty"):
        export_model(vit_model, target, kind="person", preprocess=PREP)
    assert (target / "keep.txt").exists()
    export_model(vit_model, target, kind="person", preprocess=PREP, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["model.json", "model.safetensors"]
    # No temp directories left beside the target.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_model(vit_model, empty, kind="person", preprocess=PREP)
    load_model(empty)


def test_invalid_kind_rejected(vit_model, tmp_path):
    with pytest.raises(ValueError, match="kind"):
        export_model(vit_model, tmp_path / "m", kind="animal", preprocess=PREP)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    "arch,kwargs,layers", [("vit_small_patch16_224", VIT_TINY, "mlp"), ("resnet18", {}, "conv")]
)
def test_denoiserep_model_exports_fused_and_matches_unfused_eval(arch, kwargs, layers, tmp_path):
    from training import denoiserep

    torch.manual_seed(3)
    model = ReIDModel(arch, num_classes=3, img_size=(64, 32), backbone_kwargs=kwargs)
    denoiserep.convert(model.backbone, layers=layers)
    # Non-zero denoisers (a fresh conversion is D = 0, d = 0) so that fusion has something to fold.
    with torch.no_grad():
        for p in denoiserep.denoiser_parameters(model.backbone):
            p.normal_(0, 0.02)
    model = _trained_like(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_model(model, tmp_path / "m", kind="person", preprocess=PREP)
    assert denoiserep.is_converted(model.backbone)  # export did not fuse the trained model in place
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    meta = json.loads((out / "model.json").read_text())
    assert meta["denoiserep"]["layers"] == layers
    assert meta["denoiserep"]["num_layers"] == len(denoiserep.denoising_layers(model.backbone)) > 0
    loaded = load_model(out)
    assert not denoiserep.is_converted(loaded.module)
    x = torch.randn(5, 3, 64, 32)
    with torch.no_grad():
        unfused = model(x)  # eval mode: the explicit denoise-then-layer computation
    torch.testing.assert_close(loaded.embed(x), unfused, rtol=0, atol=1e-5)
