"""Folding frozen denoisers for a backbone phase, and the cheaper exact road of the train forward.

What must hold: folding changes no function (train and eval forward, gradients, fuse, state_dict),
the round trip gives W back, a folded backbone step costs exactly the plain model's FLOPs, nothing
trains a folded denoiser by accident, and the engine's folded backbone phase trains the same model
as the unfolded one up to the documented reparametrisation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from training import denoiserep as dr
from training.denoiserep.folding import (
    unfuse_conv_input_parameters,
    unfuse_conv_parameters,
    unfuse_linear_parameters,
)
from training.denoiserep.layers import (
    fuse_conv_input_parameters,
    fuse_conv_parameters,
    fuse_linear_parameters,
)

F64 = torch.float64


def _net(side: str = "input") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 12, 3, padding=1, groups=2),
        nn.BatchNorm2d(12),
        nn.ReLU(),
        nn.Conv2d(12, 6, 1, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 16),
        nn.ReLU(),
        nn.Linear(16, 4, bias=False),
    ).to(F64)
    dr.convert(
        net, layers=lambda n, m: isinstance(m, (nn.Conv2d, nn.Linear)), conv_side=side, beta=(1e-4, 0.05)
    )
    with torch.no_grad():
        for _, layer in dr.denoising_layers(net):
            layer.denoiser_weight.normal_(0, 0.2)
            if layer.denoiser_bias is not None:
                layer.denoiser_bias.normal_(0, 0.2)
    return net.train()


@settings(max_examples=25, deadline=None)
@given(
    groups=st.sampled_from([1, 2, 4]),
    kernel=st.sampled_from([1, 3]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_every_unfuse_inverts_its_fuse_in_float64(groups: int, kernel: int, bias: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    c1, c3 = 0.05, 1.01

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=F64)

    w, b, dlin, dbias = r(5, 8), r(5) if bias else None, 0.3 * r(8, 8), r(8) if bias else None
    back = unfuse_linear_parameters(*fuse_linear_parameters(w, b, dlin, dbias, c1, c3), dlin, dbias, c1, c3)
    assert torch.allclose(back[0], w, atol=1e-10)
    assert (back[1] is None) == (b is None) and (b is None or torch.allclose(back[1], b, atol=1e-10))

    conv_w = r(8, 8 // groups, kernel, kernel)
    d_in = 0.3 * r(groups, 8 // groups, 8 // groups)
    fused = fuse_conv_input_parameters(conv_w, b[:1].repeat(8) if bias else None, d_in, None, c1, c3)
    back = unfuse_conv_input_parameters(*fused, d_in, None, c1, c3)
    assert torch.allclose(back[0], conv_w, atol=1e-10)

    conv_b = r(8) if bias else None
    d_out = 0.3 * r(groups, 8 // groups, 8 // groups)
    d_out_bias = r(8) if bias else None
    fused = fuse_conv_parameters(conv_w, conv_b, d_out, d_out_bias, c1, c3)
    back = unfuse_conv_parameters(*fused, d_out, d_out_bias, c1, c3)
    assert torch.allclose(back[0], conv_w, atol=1e-10)
    assert conv_b is None or torch.allclose(back[1], conv_b, atol=1e-10)


@pytest.mark.parametrize("side", ["input", "output"])
def test_folding_changes_no_function_and_round_trips(side: str) -> None:
    net = _net(side)
    dr.set_phase(net, "backbone")
    x = torch.randn(3, 8, 5, 5, dtype=F64, requires_grad=True)
    ref = net(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    state = copy.deepcopy(net.state_dict())
    changes = dr.weight_changes(net)
    plain = dr.fuse(net).state_dict()
    weights_before = [layer.weight.detach().clone() for _, layer in dr.denoising_layers(net)]

    assert dr.fold(net) == 4
    folded_weights = [layer.weight.detach() for _, layer in dr.denoising_layers(net)]
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(folded_weights, weights_before, strict=True))
    out = net(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(grad, ref_grad, atol=1e-12)
    # Everything that reads the weights sees the layers' own (W, b), as if unfolded (the
    # BatchNorm's running statistics, key "1.*", moved with the second train forward).
    # Keys: W, b and D of each layer, d where a layer has a bias (the output-side conv 0 too).
    kept = {k: v for k, v in net.state_dict().items() if not k.startswith("1.")}
    assert len(kept) == (11 if side == "input" else 12) and all(
        torch.allclose(v, state[k], atol=1e-12) for k, v in kept.items()
    )
    fused = {k: v for k, v in dr.fuse(net).state_dict().items() if not k.startswith("1.")}
    assert all(torch.allclose(v, plain[k], atol=1e-12) for k, v in fused.items())
    assert dr.weight_changes(net) == pytest.approx(changes, rel=1e-9)
    net.eval()
    assert torch.allclose(net(x), dr.fuse(net).eval()(x), atol=1e-12)
    net.train()

    dr.unfold(net)
    for (_, layer), before in zip(dr.denoising_layers(net), weights_before, strict=True):
        assert not layer.folded and torch.allclose(layer.weight, before, atol=1e-12)


def _step_flops(net: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        net(x).square().sum().backward()
    return counter.get_total_flops()


def test_a_folded_backbone_step_costs_exactly_the_plain_models_flops() -> None:
    torch.manual_seed(1)
    x = torch.randn(64, 8, 5, 5, dtype=F64)  # enough rows that the unfolded forward fuses weights
    net = _net()
    plain = dr.fuse(net)
    dr.set_phase(net, "backbone")
    unfolded = _step_flops(net, x)
    dr.fold(net)
    assert _step_flops(net, x) == _step_flops(plain, x) < unfolded


def test_nothing_trains_a_folded_denoiser_by_accident() -> None:
    net = _net()
    with pytest.raises(dr.DenoiseRepError, match="backbone"):
        dr.fold(net)  # a fresh conversion trains everything: D too
    dr.set_phase(net, "backbone")
    dr.fold(net)
    layer = dr.denoising_layers(net)[0][1]
    layer.denoiser_weight.requires_grad_(True)
    with pytest.raises(dr.DenoiseRepError, match="unfold"):
        net(torch.randn(2, 8, 5, 5, dtype=F64))
    layer.denoiser_weight.requires_grad_(False)
    with pytest.raises(dr.DenoiseRepError, match="unfold"):
        net.load_state_dict(net.state_dict())
    dr.set_phase(net, "denoiser")  # a phase that trains D unfolds first
    assert not any(layer.folded for _, layer in dr.denoising_layers(net))
    net(torch.randn(2, 8, 5, 5, dtype=F64))
    assert dr.denoise_loss(net).requires_grad


def test_a_layer_whose_step_is_far_from_the_identity_stays_unfolded_and_exact() -> None:
    net = _net()
    dr.set_phase(net, "backbone")
    strong = dr.denoising_layers(net)[1][1]
    with torch.no_grad():
        strong.denoiser_weight.mul_(1e4)
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    ref = net(x)
    assert dr.fold(net) == 3 and not strong.folded
    assert torch.allclose(net(x), ref, atol=1e-9)


def _through_fused_weights(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The definition: the layer's op on (W', b') built from (W, b) and a detached (D, d)."""
    denoiser_bias = None if layer.denoiser_bias is None else layer.denoiser_bias.detach()
    step = layer.step
    weight, bias = layer._fuse(
        layer.weight, layer.bias, layer.denoiser_weight.detach(), denoiser_bias, c1=step.c1, c3=step.c3
    )
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, bias)
    return nn.functional.linear(x, weight, bias)


@pytest.mark.parametrize("rows", [2, 64])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_both_roads_of_the_train_forward_are_the_same_function(rows: int, kind: str) -> None:
    """Few rows take the denoised-input road, many the fused-weight road: same outputs and gradients."""
    torch.manual_seed(2)
    if kind == "conv":
        source, x = nn.Conv2d(32, 8, 1), torch.randn(rows, 32, 1, 1)
    else:
        source, x = nn.Linear(32, 48), torch.randn(rows, 32)
    layer = dr.convert(nn.Sequential(source.to(F64)), layers=lambda n, m: True, beta=(1e-4, 0.05))[0]
    with torch.no_grad():
        layer.denoiser_weight.normal_(0, 0.2)
    dr.set_phase(layer, "joint")
    x = x.to(F64).requires_grad_(True)
    wanted = (x, layer.weight, layer.bias)
    out = layer(x)
    grads = torch.autograd.grad(out.square().sum(), wanted)
    expected = _through_fused_weights(layer, x)
    expected_grads = torch.autograd.grad(expected.square().sum(), wanted)
    assert torch.allclose(out, expected, atol=1e-12)
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(grads, expected_grads, strict=True))
    assert dr.denoise_loss(layer).requires_grad  # the denoising loss is recorded on either road


def test_the_train_forward_takes_the_cheaper_road() -> None:
    """A 1x1 conv 256 -> 16 at 4 pixels: denoising 4 pixels beats fusing 16 x 256 x 256 weights."""
    torch.manual_seed(3)
    layer = dr.convert(nn.Sequential(nn.Conv2d(256, 16, 1)), layers=lambda n, m: True)[0]
    dr.set_phase(layer, "backbone")
    x = torch.randn(4, 256, 1, 1)
    with FlopCounterMode(display=False) as chosen:
        layer(x).sum().backward()
    with FlopCounterMode(display=False) as fused:
        _through_fused_weights(layer, x).sum().backward()
    assert chosen.get_total_flops() < fused.get_total_flops() / 4
