"""Whole-network DenoiseRep on small timm models: fused == unfused, idempotent, strict-loadable.

Families: a ViT, a Swin (windowed attention, bias-free patch-merging Linear), a ResNet (padded and
strided k x k convs before BatchNorm), a MobileNetV3 (depthwise convs, squeeze-excitation convs with
bias) and a RegNetX (grouped convs). Everything runs in float64 unless a test says otherwise.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch

from training.denoiserep import (
    DenoiseRepError,
    backbone_parameters,
    convert,
    denoise_loss,
    denoiser_parameters,
    denoising_layers,
    describe,
    fuse,
    is_converted,
)

VIT = ("vit_tiny_patch16_224", {"img_size": (32, 16), "depth": 2, "num_classes": 5}, (32, 16))
SWIN = (
    "swin_tiny_patch4_window7_224",
    {
        "img_size": (32, 32),
        "depths": (1, 1),
        "num_heads": (1, 2),
        "embed_dim": 16,
        "window_size": 4,
        "num_classes": 5,
    },
    (32, 32),
)
RESNET = ("resnet18", {"num_classes": 5}, (32, 32))
MOBILENET = ("mobilenetv3_small_050", {"num_classes": 5}, (32, 32))
REGNET = ("regnetx_002", {"num_classes": 5}, (32, 32))

CASES = [
    pytest.param(*VIT, "mlp", id="vit-mlp"),
    pytest.param(*VIT, "linear", id="vit-linear"),
    pytest.param(*SWIN, "mlp", id="swin-mlp"),
    pytest.param(*SWIN, "linear", id="swin-linear"),
    pytest.param(*RESNET, "conv", id="resnet18-conv"),
    pytest.param(*MOBILENET, "conv", id="mobilenetv3-depthwise-conv"),
    pytest.param(*REGNET, "conv", id="regnetx-grouped-conv"),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def randomize_denoisers(model: torch.nn.Module, seed: int, strength: float = 0.05) -> None:
    """Nonzero denoisers: each one changes its layer's output by about ``strength`` (relative)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in denoising_layers(model):
            for p in layer.denoiser_parameters():
                fan = p.shape[-1] if p.dim() > 1 else 1
                noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
                p.copy_(noise * strength / (layer.step.c1 * math.sqrt(fan)))


def make(name: str, kwargs: dict, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, **kwargs).to(dtype).eval()


@pytest.mark.parametrize(("name", "kwargs", "size", "layers"), CASES)
def test_fused_network_equals_unfused_and_loads_into_vanilla(name, kwargs, size, layers):
    model = make(name, kwargs)
    x = torch.randn((2, 3, *size), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        original = model(x)
    convert(model, layers=layers)
    randomize_denoisers(model, seed=2)
    params_before = {k: v.clone() for k, v in model.state_dict().items()}

    with torch.no_grad():
        unfused = model(x)
        fused_model = fuse(model)
        fused = fused_model(x)
    assert rel_err(unfused, original) > 1e-3  # the denoisers change the network's output
    assert rel_err(fused, unfused) <= 1e-10

    # A plain model: no denoising layer, no denoiser tensor, and the original module classes.
    assert not is_converted(fused_model) and is_converted(model)
    assert type(fused_model) is type(model) and not fused_model.training
    assert not any("denoiser" in key for key in fused_model.state_dict())
    for layer_name, layer in denoising_layers(model):
        assert type(fused_model.get_submodule(layer_name)) is layer.source_class

    # The input model is untouched, and a second fusion is bit-identical.
    assert params_before.keys() == model.state_dict().keys()
    assert all(torch.equal(v, params_before[k]) for k, v in model.state_dict().items())
    again = fuse(model).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in fused_model.state_dict().items())

    vanilla = make(name, kwargs)
    vanilla.load_state_dict(fused_model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(vanilla(x), fused) <= 1e-12


@pytest.mark.parametrize(
    ("name", "kwargs", "size", "layers"),
    [pytest.param(*VIT, "mlp", id="vit"), pytest.param(*RESNET, "conv", id="resnet18")],
)
def test_fused_network_equals_unfused_in_float32(name, kwargs, size, layers):
    model = convert(make(name, kwargs, torch.float32), layers=layers)
    randomize_denoisers(model, seed=3)
    x = torch.randn((2, 3, *size), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        unfused = model(x)
        fused_model = fuse(model)
        fused = fused_model(x)
    assert all(p.dtype == torch.float32 for p in fused_model.parameters())
    assert rel_err(fused, unfused) <= 1e-5


def test_layer_specs_pick_the_documented_layers():
    vit = convert(make(*VIT[:2]), layers="linear")
    names = [n for n, _ in denoising_layers(vit)]
    assert names == [
        f"blocks.{b}.{n}" for b in (0, 1) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    swin = convert(make(*SWIN[:2]), layers="linear")
    assert "layers.1.downsample.reduction" in dict(denoising_layers(swin))  # a bias-free Linear
    assert "head.fc" not in dict(denoising_layers(swin))
    resnet = convert(make(*RESNET[:2]), layers="conv")
    conv_names = [n for n, _ in denoising_layers(resnet)]
    assert (
        conv_names[0] == "conv1" and "layer1.0.conv1" in conv_names and "layer2.0.downsample.0" in conv_names
    )
    assert len(conv_names) == 20
    with pytest.raises(DenoiseRepError, match=r"layers='mlp' matched no layer in ResNet; use layers='conv'"):
        convert(make(*RESNET[:2]), layers="mlp")


def test_depth_schedule_runs_from_the_shallowest_layer_down():
    swin = convert(make(*SWIN[:2]), layers="mlp")
    info = describe(swin)
    assert [(p["name"], p["t"]) for p in info["per_layer"]] == [
        ("layers.0.blocks.0.mlp.fc1", 4),
        ("layers.0.blocks.0.mlp.fc2", 3),
        ("layers.1.blocks.0.mlp.fc1", 2),
        ("layers.1.blocks.0.mlp.fc2", 1),
    ]
    assert info["schedule"] == "depth" and info["num_layers"] == 4


@pytest.mark.parametrize("depth", [2, 3])
def test_reference_schedule_gives_every_block_the_same_pair(depth):
    name, kwargs, _ = VIT
    vit = convert(make(name, {**kwargs, "depth": depth}), layers="mlp", schedule="reference")
    steps = [layer.step.t for _, layer in denoising_layers(vit)]
    # The public code's 0-based (2B, 2B-1) is the 1-based (2B + 1, 2B).
    assert steps == [2 * depth + 1, 2 * depth] * depth
    with pytest.raises(DenoiseRepError, match=f"pass timesteps >= {2 * depth + 1}"):
        convert(make(name, {**kwargs, "depth": depth}), layers="mlp", schedule="reference", timesteps=3)


def test_the_task_loss_trains_the_backbone_and_only_the_denoising_loss_trains_the_denoisers():
    model = convert(make(*VIT[:2], torch.float32), layers="mlp").train()
    x = torch.randn(2, 3, *VIT[2])
    model(x).square().mean().backward()
    assert all(p.grad is None for p in denoiser_parameters(model))
    assert all(p.grad is not None for p in backbone_parameters(model) if p.requires_grad)
    denoise_loss(model).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in denoiser_parameters(model))
