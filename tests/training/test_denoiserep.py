"""DenoiseRep layers, schedule, loss, phases and errors (training/denoiserep).

Whole-network equivalence lives in test_denoiserep_networks.py.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from training.denoiserep import (
    DenoiseRepError,
    DenoisingConv2d,
    DenoisingLinear,
    DiffusionSchedule,
    backbone_parameters,
    convert,
    denoise_loss,
    denoiser_parameters,
    denoising_layers,
    describe,
    fuse,
    is_converted,
    set_phase,
)

SETTINGS = {"layers": "test", "schedule": "depth", "timesteps": 1000, "beta": [1e-4, 2e-3]}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def randomize(
    layer: DenoisingLinear | DenoisingConv2d, generator: torch.Generator, strength: float = 0.3
) -> None:
    """Nonzero denoisers scaled so that c1 * (D y + d) changes a layer's output by about ``strength``."""
    c1 = layer.step.c1
    with torch.no_grad():
        for p in layer.denoiser_parameters():
            fan = p.shape[-1] if p.dim() > 1 else 1
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float64)
            p.copy_(noise * strength / (c1 * math.sqrt(fan)))


class TinyNet(nn.Module):
    """Linear -> ReLU -> Linear with a classifier: enough structure for phases and losses."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8, bias=False))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


# --------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("t", [1, 2, 37, 500, 1000])
def test_step_coefficients_match_the_definition(t):
    beta_1, beta_T, T = 1e-4, 2e-3, 1000
    betas = [beta_1 + (beta_T - beta_1) * i / (T - 1) for i in range(T)]
    abar = 1.0
    for b in betas[:t]:
        abar *= 1.0 - b
    beta_t, alpha_t = betas[t - 1], 1.0 - betas[t - 1]
    step = DiffusionSchedule(T, (beta_1, beta_T)).step(t)
    assert step.t == t
    assert step.beta == pytest.approx(beta_t, rel=1e-12)
    assert step.c1 == pytest.approx(beta_t / (math.sqrt(alpha_t) * math.sqrt(1 - abar)), rel=1e-10)
    assert step.c3 == pytest.approx(1 / math.sqrt(alpha_t), rel=1e-12)
    assert step.sqrt_abar**2 + step.sqrt_one_minus_abar**2 == pytest.approx(1.0, rel=1e-12)
    assert step.sqrt_abar == pytest.approx(math.sqrt(abar), rel=1e-12)


@pytest.mark.parametrize(
    ("timesteps", "beta"),
    [
        (0, (1e-4, 2e-3)),
        (2.5, (1e-4, 2e-3)),
        (10, (0.0, 2e-3)),
        (10, (2e-3, 1e-4)),
        (10, (1e-4, 1.0)),
        (10, (1e-4,)),
    ],
)
def test_bad_schedule_settings_are_refused(timesteps, beta):
    with pytest.raises(DenoiseRepError, match=r"timesteps|beta"):
        convert(TinyNet(), layers="linear", timesteps=timesteps, beta=beta)


# --------------------------------------------------------------------------- single layers


@settings(max_examples=40, deadline=None)
@given(
    in_features=st.integers(1, 12),
    out_features=st.integers(1, 12),
    bias=st.booleans(),
    lead=st.sampled_from([(3,), (2, 5)]),  # 2-D (batch, feature) and 3-D (batch, tokens, feature) inputs
    dtype=st.sampled_from([torch.float64, torch.float32]),
    t=st.integers(1, 1000),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_fused_equals_unfused(in_features, out_features, bias, lead, dtype, t, seed):
    g = torch.Generator().manual_seed(seed)
    source = nn.Linear(in_features, out_features, bias=bias).to(dtype)
    layer = DenoisingLinear(source, DiffusionSchedule(1000, (1e-4, 2e-3)).step(t), SETTINGS).eval()
    randomize(layer, g)
    x = torch.randn((*lead, in_features), generator=g, dtype=torch.float64).to(dtype)

    # The eval forward is the documented maths: W (c3 x - c1 (D x + d)) + b, here in float64.
    W, D = source.weight.double(), layer.denoiser_weight.double()
    d = layer.denoiser_bias.double() if bias else torch.zeros(in_features, dtype=torch.float64)
    b = source.bias.double() if bias else torch.zeros(out_features, dtype=torch.float64)
    c1, c3 = layer.step.c1, layer.step.c3
    expected = (c3 * x.double() - c1 * (x.double() @ D.T + d)) @ W.T + b
    with torch.no_grad():
        unfused = layer(x)
        plain = layer.plain_layer()
        fused = plain(x)
        train_forward = layer.train()(x)  # the differentiable fused path used in training
    assert type(plain) is nn.Linear
    assert (plain.bias is None) == (not bias)
    assert plain.weight.dtype == dtype
    assert rel_err(unfused, expected) <= TOLERANCE[dtype]
    assert rel_err(fused, unfused) <= TOLERANCE[dtype]
    assert rel_err(train_forward, unfused) <= TOLERANCE[dtype]


CONV_CASES = st.fixed_dictionaries(
    {
        "kernel": st.sampled_from([1, 3, 5, 7]),
        "stride": st.sampled_from([1, 2]),
        "same_padding": st.booleans(),  # 0, or dilation * (k - 1) // 2 ("same" at stride 1)
        "dilation": st.sampled_from([1, 2]),
        "groups": st.sampled_from(["1", "2", "depthwise"]),
        "multiplier": st.sampled_from([1, 2]),  # out channels per group relative to in channels per group
        "bias": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "zeros", "reflect", "circular"]),
        "dtype": st.sampled_from([torch.float64, torch.float32]),
        "t": st.integers(1, 1000),
        "seed": st.integers(0, 2**31 - 1),
        "side": st.sampled_from(["input", "output"]),
    }
)


@settings(max_examples=60, deadline=None)
@given(case=CONV_CASES)
def test_conv_fused_equals_unfused(case):
    g = torch.Generator().manual_seed(case["seed"])
    dtype, k, dil = case["dtype"], case["kernel"], case["dilation"]
    in_ch = 4
    groups = {"1": 1, "2": 2, "depthwise": in_ch}[case["groups"]]
    out_ch = in_ch * case["multiplier"]
    padding = dil * (k - 1) // 2 if case["same_padding"] else 0
    source = nn.Conv2d(
        in_ch,
        out_ch,
        k,
        stride=case["stride"],
        padding=padding,
        dilation=dil,
        groups=groups,
        bias=case["bias"],
        padding_mode=case["padding_mode"],
    ).to(dtype)
    side = case["side"]
    step = DiffusionSchedule(1000, (1e-4, 2e-3)).step(case["t"])
    layer = DenoisingConv2d(source, step, SETTINGS, side=side).eval()
    randomize(layer, g)
    mixed = in_ch if side == "input" else out_ch
    assert layer.denoiser_weight.shape == (groups, mixed // groups, mixed // groups)
    assert (layer.denoiser_bias is not None) == (side == "output" and case["bias"])
    x = torch.randn((2, in_ch, 15, 14), generator=g, dtype=torch.float64).to(dtype)

    # Reference: the 1x1 denoiser as a dense block-diagonal matrix over channels, applied to the
    # input before the conv (input side) or to the conv output (output side).
    c1, c3 = layer.step.c1, layer.step.c3
    with torch.no_grad():
        dense = torch.block_diag(*layer.denoiser_weight.double())
        if side == "input":
            x64 = x.double()
            denoised = c3 * x64 - c1 * torch.einsum("ic,nchw->nihw", dense, x64)
            y = source.double()(x64)
            expected = source.double()(denoised)
            source.to(dtype)
        else:
            y = source(x).double()
            d = layer.denoiser_bias.double() if case["bias"] else torch.zeros(out_ch, dtype=torch.float64)
            expected = c3 * y - c1 * (torch.einsum("oc,nchw->nohw", dense, y) + d[:, None, None])
        unfused = layer(x)
        plain = layer.plain_layer()
        fused = plain(x)
        train_forward = layer.train()(x)
    assert type(plain) is nn.Conv2d
    assert (plain.stride, plain.padding, plain.dilation, plain.groups, plain.padding_mode) == (
        source.stride,
        source.padding,
        source.dilation,
        source.groups,
        source.padding_mode,
    )
    assert (plain.bias is None) == (not case["bias"])
    # The denoiser must matter, or the equivalence below would prove nothing.
    assert rel_err(expected, y) > 0.01
    assert rel_err(unfused, expected) <= TOLERANCE[dtype]
    assert rel_err(fused, unfused) <= TOLERANCE[dtype]
    assert rel_err(train_forward, unfused) <= TOLERANCE[dtype]


@pytest.mark.parametrize("kind", ["linear", "conv-input", "conv-output"])
def test_train_forward_gradients_equal_the_unfused_maths_and_never_reach_the_denoiser(kind):
    """The fused training forward gives W and b the gradients of the explicit maths; D and d get none.

    The task loss must not train the denoisers (they learn from their own label-free loss only).
    """
    g = torch.Generator().manual_seed(3)
    step = DiffusionSchedule(1000, (1e-4, 2e-3)).step(7)
    if kind == "linear":
        layer = DenoisingLinear(nn.Linear(5, 4).double(), step, SETTINGS)
    else:
        source = nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=True).double()
        layer = DenoisingConv2d(source, step, SETTINGS, side=kind.split("-")[1])
    randomize(layer, g)
    x = torch.randn((3, 5) if kind == "linear" else (2, 4, 6, 6), generator=g, dtype=torch.float64)
    params = [layer.weight, layer.bias]

    def task_loss(mode: str) -> torch.Tensor:
        out = layer.train(mode == "train")(x)
        weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape)
        return (out * weights).sum()

    for a, b in zip(
        torch.autograd.grad(task_loss("train"), params),
        torch.autograd.grad(task_loss("eval"), params),
        strict=True,
    ):
        assert a.abs().max() > 0
        assert rel_err(a, b) <= 1e-10
    layer.pop_loss()
    denoiser_grads = torch.autograd.grad(
        task_loss("train"), layer.denoiser_parameters(), allow_unused=True, materialize_grads=True
    )
    assert all(not grad.any() for grad in denoiser_grads)
    layer.pop_loss()


def test_fresh_conversion_is_the_baseline_up_to_c3():
    torch.manual_seed(0)
    net = TinyNet().double().eval()
    x = torch.randn(4, 6, dtype=torch.float64)
    with torch.no_grad():
        baseline = net.body[0](x)
    convert(net, layers=lambda name, m: name == "body.0")
    assert all(not p.detach().any() for p in denoiser_parameters(net))
    c3 = net.body[0].step.c3
    with torch.no_grad():
        converted = net.body[0](x)
    # W (c3 x) + b: only the W x part scales.
    assert torch.allclose(converted - net.body[0].bias, c3 * (baseline - net.body[0].bias), rtol=1e-12)
    assert 1.0 < c3 < 1.001


# --------------------------------------------------------------------------- conversion and its errors


def test_convert_reuses_parameter_objects_and_keeps_order():
    net = TinyNet()
    before = {name: p for name, p in net.named_parameters()}
    assert convert(net, layers="linear") is net
    names = [name for name, _ in denoising_layers(net)]
    assert names == ["body.0", "body.2"]  # the head is the classifier and stays plain
    assert net.body[0].weight is before["body.0.weight"]
    assert net.body[0].bias is before["body.0.bias"]
    assert net.body[2].weight is before["body.2.weight"]
    assert net.body[2].bias is None and net.body[2].denoiser_bias is None  # bias-free Linear: no d
    assert type(net.head) is nn.Linear
    assert [t["t"] for t in describe(net)["per_layer"]] == [2, 1]
    assert is_converted(net)


def test_convert_twice_is_refused():
    net = convert(TinyNet(), layers="linear")
    with pytest.raises(DenoiseRepError, match="already converted"):
        convert(net, layers="linear")


def test_unknown_layer_spec_lists_the_options():
    with pytest.raises(DenoiseRepError, match="'mlp', 'linear', 'conv'"):
        convert(TinyNet(), layers="attention")


def test_spec_matching_nothing_suggests_another():
    with pytest.raises(
        DenoiseRepError, match=r"layers='mlp' matched no layer in TinyNet; use layers='linear'"
    ):
        convert(TinyNet(), layers="mlp")
    with pytest.raises(DenoiseRepError, match="no convertible"):
        convert(nn.Sequential(nn.ReLU()), layers="conv")
    with pytest.raises(DenoiseRepError, match="matched no layer"):
        convert(TinyNet(), layers=lambda name, module: False)


def test_predicate_picking_an_unconvertible_layer_is_refused():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(DenoiseRepError, match=r"'1' \(LayerNorm\)"):
        convert(net, layers=lambda name, module: True)


def test_unknown_schedule_and_reference_on_non_mlp_are_refused():
    with pytest.raises(DenoiseRepError, match="unknown schedule"):
        convert(TinyNet(), layers="linear", schedule="cosine")
    with pytest.raises(DenoiseRepError, match="only defined for the MLP linears"):
        convert(TinyNet(), layers="linear", schedule="reference")


def test_too_few_timesteps_is_refused():
    with pytest.raises(DenoiseRepError, match="pass timesteps >= 2"):
        convert(TinyNet(), layers="linear", timesteps=1)


def test_shared_layer_is_refused():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(DenoiseRepError, match="shared layer"):
        convert(net, layers="linear")


def test_layers_a_string_spec_cannot_convert_are_skipped_with_a_warning(caplog):
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.proj = nn.Linear(8, 8)

    net = WithAttention()
    with caplog.at_level(logging.WARNING, logger="training.denoiserep.selection"):
        convert(net, layers="linear")
    assert [name for name, _ in denoising_layers(net)] == ["proj"]
    assert "attn.out_proj" in caplog.text


@pytest.mark.parametrize(
    "call",
    [fuse, denoise_loss, describe, denoiser_parameters, backbone_parameters, lambda m: set_phase(m, "joint")],
)
def test_operations_on_an_unconverted_model_say_convert_first(call):
    with pytest.raises(DenoiseRepError, match=r"never converted: call training\.denoiserep\.convert"):
        call(TinyNet())
    assert not is_converted(TinyNet())


def test_describe_is_json_and_complete():
    net = convert(TinyNet(), layers="linear", timesteps=50, beta=(1e-4, 1e-2))
    info = json.loads(json.dumps(describe(net)))
    # D = 0: W' = c3 W, so ||W' - W|| / ||W|| is c3 - 1 of each layer's step (t = 2 > t = 1).
    c3_change, c3_change_t1 = net.body[0].step.c3 - 1, net.body[2].step.c3 - 1
    assert c3_change > c3_change_t1 > 0
    assert info == {
        "layers": "linear",
        "schedule": "depth",
        "timesteps": 50,
        "beta": [1e-4, 1e-2],
        "conv_side": "input",
        "num_layers": 2,
        "weight_change": {
            "mean": pytest.approx((c3_change + c3_change_t1) / 2),
            "max": pytest.approx(c3_change),
        },
        "per_layer": [
            {"name": "body.0", "kind": "linear", "t": 2, "weight_change": pytest.approx(c3_change)},
            {"name": "body.2", "kind": "linear", "t": 1, "weight_change": pytest.approx(c3_change_t1)},
        ],
    }
    predicate = convert(TinyNet(), layers=lambda name, module: name == "head")
    assert describe(predicate)["layers"].startswith("predicate:")


# --------------------------------------------------------------------------- denoising loss


def test_linear_loss_is_the_noise_prediction_loss():
    g = torch.Generator().manual_seed(5)
    source = nn.Linear(6, 3).double()
    layer = DenoisingLinear(source, DiffusionSchedule(1000, (1e-4, 2e-3)).step(40), SETTINGS)
    randomize(layer, g)
    x = torch.randn(2, 4, 6, generator=g, dtype=torch.float64)
    torch.manual_seed(11)
    layer.train()(x)
    recorded = layer.pop_loss()
    torch.manual_seed(11)
    eps = torch.randn_like(x)  # the same draw the layer made
    x_t = layer.step.sqrt_abar * x + layer.step.sqrt_one_minus_abar * eps
    predicted = x_t @ layer.denoiser_weight.detach().T + layer.denoiser_bias.detach()
    # Summed over the feature, averaged over the 2 x 4 rows: the gradient on D does not shrink with width.
    expected = ((predicted - eps).abs().sum(-1) + (predicted - eps).square().sum(-1)).mean()
    assert recorded is not None
    assert float(recorded.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    assert layer.pop_loss() is None


@pytest.mark.parametrize("side", ["input", "output"])
def test_conv_loss_is_on_the_detached_feature_the_denoiser_reads(side):
    g = torch.Generator().manual_seed(6)
    source = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False).double()
    layer = DenoisingConv2d(source, DiffusionSchedule(1000, (1e-4, 2e-3)).step(3), SETTINGS, side=side)
    randomize(layer, g)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(12)
    layer.train()(x)
    recorded = layer.pop_loss()
    with torch.no_grad():
        y = x.detach() if side == "input" else source(x)
    rows = y.movedim(1, -1).reshape(-1, y.shape[1])  # one feature vector per pixel
    torch.manual_seed(12)
    eps = torch.randn_like(rows)  # the layer's draw, one noise vector per pixel
    x_t = layer.step.sqrt_abar * rows + layer.step.sqrt_one_minus_abar * eps
    dense = torch.block_diag(*layer.denoiser_weight.detach())
    predicted = x_t @ dense.T
    expected = ((predicted - eps).abs().sum(1) + (predicted - eps).square().sum(1)).mean()
    assert float(recorded.detach()) == pytest.approx(float(expected.detach()), rel=1e-12)
    # The loss trains the denoiser only: no gradient flows back into the input or the conv weight.
    recorded.backward()
    assert x.grad is None and source.weight.grad is None
    assert layer.denoiser_weight.grad.abs().max() > 0


def test_denoise_loss_is_label_free_sums_forwards_and_resets():
    torch.manual_seed(0)
    net = convert(TinyNet(), layers="linear").train()
    x = torch.randn(4, 6)
    torch.manual_seed(1)
    net(x)
    first = denoise_loss(net)
    torch.manual_seed(2)
    net(x)
    second = denoise_loss(net)
    torch.manual_seed(1)
    net(x)
    torch.manual_seed(2)
    net(x)
    both = denoise_loss(net)
    a, b, a_and_b = (float(loss.detach()) for loss in (first, second, both))
    assert a > 0 and b > 0 and a != b
    assert a_and_b == pytest.approx(a + b, rel=1e-6)
    assert first.requires_grad
    # D = 0 at first, yet the loss has a gradient with respect to it.
    first.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in denoiser_parameters(net))
    empty = denoise_loss(net)  # nothing recorded since the last read
    assert float(empty.detach()) == 0.0 and not empty.requires_grad


def test_no_loss_is_recorded_in_eval_or_in_the_backbone_phase_and_one_is_under_no_grad():
    net = convert(TinyNet(), layers="linear")
    x = torch.randn(2, 6)
    net.eval()(x)
    assert float(denoise_loss(net).detach()) == 0.0
    set_phase(net, "backbone")
    net.train()(x)
    assert float(denoise_loss(net).detach()) == 0.0
    set_phase(net, "joint")
    net(x)
    assert float(denoise_loss(net).detach()) > 0.0
    # A denoiser phase runs the backbone without autograd; the denoisers still get their loss.
    set_phase(net, "denoiser")
    with torch.no_grad():
        out = net(x)
    loss = denoise_loss(net)
    assert not out.requires_grad
    assert loss.requires_grad and float(loss.detach()) > 0.0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in denoiser_parameters(net))


def test_a_converted_model_with_a_pending_loss_can_be_copied_and_pickled():
    net = convert(TinyNet(), layers="linear").train()
    net(torch.randn(2, 6))  # leaves a loss that is part of an autograd graph
    clone = copy.deepcopy(net)
    restored = pickle.loads(pickle.dumps(net))
    assert float(denoise_loss(clone).detach()) == 0.0
    assert float(denoise_loss(restored).detach()) == 0.0
    assert float(denoise_loss(net).detach()) > 0.0  # the original keeps its own


# --------------------------------------------------------------------------- phases with one optimiser


def _snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in net.named_parameters()}


def _changed(net: nn.Module, before: dict[str, torch.Tensor]) -> set[str]:
    return {name for name, p in net.named_parameters() if not torch.equal(p.detach(), before[name])}


def test_phases_with_one_optimiser_built_before_conversion():
    torch.manual_seed(0)
    net = TinyNet()
    backbone_optimizer_params = list(net.parameters())
    convert(net, layers="linear")
    optimizer = torch.optim.AdamW(
        [
            {"params": backbone_parameters(net), "lr": 1e-2},
            {"params": denoiser_parameters(net), "lr": 1e-2, "weight_decay": 0.0},
        ],
        weight_decay=0.05,
    )
    # The Parameters an optimiser built before conversion holds are the model's own.
    assert [id(p) for p in backbone_parameters(net)] == [id(p) for p in backbone_optimizer_params]
    all_ids = [id(p) for p in net.parameters()]
    denoiser_names = {name for name, _ in net.named_parameters() if "denoiser" in name}
    backbone_names = {name for name, _ in net.named_parameters()} - denoiser_names
    assert denoiser_names == {"body.0.denoiser_weight", "body.0.denoiser_bias", "body.2.denoiser_weight"}
    x, target = torch.randn(8, 6), torch.randn(8, 3)

    def step(phase: str) -> set[str]:
        set_phase(net, phase)
        before = _snapshot(net)
        optimizer.zero_grad(set_to_none=True)
        out = net.train()(x)
        loss = F.mse_loss(out, target) + 0.1 * denoise_loss(net)
        loss.backward()
        optimizer.step()
        assert [id(p) for p in net.parameters()] == all_ids  # no Parameter was replaced
        return _changed(net, before)

    assert step("denoiser") == denoiser_names
    assert step("backbone") == backbone_names
    assert step("joint") == denoiser_names | backbone_names
    assert step("denoiser") == denoiser_names
    optimizer_ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimizer_ids == set(all_ids)


def test_unknown_phase_is_refused():
    net = convert(TinyNet(), layers="linear")
    with pytest.raises(DenoiseRepError, match="'denoiser', 'backbone', 'joint'"):
        set_phase(net, "both")


# --------------------------------------------------------------------------- fuse on a small model


def test_fuse_is_a_new_plain_model_and_leaves_the_input_untouched():
    torch.manual_seed(0)
    net = convert(TinyNet(), layers="linear").double()
    g = torch.Generator().manual_seed(1)
    for _, layer in denoising_layers(net):
        randomize(layer, g)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    ids = [id(p) for p in net.parameters()]
    fused = fuse(net)
    again = fuse(net)
    assert fused is not net and fused.training
    assert not is_converted(fused)
    assert type(fused.body[0]) is nn.Linear and fused.body[2].bias is None
    assert all("denoiser" not in key for key in fused.state_dict())
    assert [id(p) for p in net.parameters()] == ids
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    for key, value in fused.state_dict().items():
        assert torch.equal(value, again.state_dict()[key])
    vanilla = TinyNet().double()
    vanilla.load_state_dict(fused.state_dict(), strict=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(vanilla(x), net.eval()(x)) <= 1e-10
