"""DenoiseRep learns what its maths says: the closed-form optimum, SGD approaching it, a change that
survives BatchNorm and half precision, the public code's 0-based timesteps, and sensible defaults.

These are the checks a "loss > 0 after one step" test cannot make: each one fails if the denoisers
cannot learn (weight decay, a width-shrunk gradient), if the conv form is cancelled by BatchNorm, or
if the eval step loses its correction in bf16.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

from training.denoiserep import (
    DenoiseRepError,
    DenoisingConv2d,
    DiffusionSchedule,
    convert,
    denoise_loss,
    denoiser_parameters,
    denoising_layers,
    fuse,
    set_loss_rows,
    set_phase,
    weight_changes,
)
from training.denoiserep.calibration import (
    FeatureMoments,
    calibrate,
    denoiser_tensors,
    expected_l2_loss,
    optimal_denoiser,
)
from training.denoiserep.schedule import reference_timesteps

K = 16


def planted(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gaussian feature with eigenvalues from 1e-3 to 3 and a nonzero mean: (mixing A, mean mu)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    lam = torch.logspace(-3, 0.5, K, dtype=torch.float64)
    return q * lam.sqrt(), 0.5 * torch.randn(K, generator=g, dtype=torch.float64)


def sample(mixing: torch.Tensor, mean: torch.Tensor, n: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randn(n, K, generator=g, dtype=torch.float64) @ mixing.T + mean).float()


def one_layer(beta: float = 0.05) -> nn.Sequential:
    # One timestep of beta = 0.05: s = 0.22, a noise level at which 800 Adam steps can get close.
    torch.manual_seed(0)
    return convert(nn.Sequential(nn.Linear(K, 8)), layers="linear", timesteps=1, beta=(beta, beta))


def test_calibration_is_the_population_optimum_and_lowers_the_loss():
    mixing, mean = planted()
    net = one_layer()
    step = net[0].step
    g = torch.Generator().manual_seed(1)
    found = calibrate(net, [sample(mixing, mean, 20000, g) for _ in range(5)])
    weight, bias = denoiser_tensors(net[0])
    # The population optimum, from the true mean and covariance.
    a, s = step.sqrt_abar, step.sqrt_one_minus_abar
    truth = s * torch.linalg.inv(a * a * (mixing @ mixing.T) + s * s * torch.eye(K, dtype=torch.float64))
    assert float((weight[0] - truth).norm() / truth.norm()) < 0.05
    assert float((bias[0] + a * truth @ mean).norm() / (a * truth @ mean).norm()) < 0.05
    moments = found["0"].moments
    at_zero = expected_l2_loss(torch.zeros_like(weight), torch.zeros_like(bias), moments, a, s)
    at_optimum = expected_l2_loss(weight, bias, moments, a, s)
    assert at_zero == pytest.approx(K)
    assert at_optimum < 0.6 * at_zero
    # Any perturbation of the optimum is worse (it is the minimiser, not just a decrease).
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        bumped = weight + 0.01 * torch.randn(weight.shape, generator=g, dtype=torch.float64)
        assert expected_l2_loss(bumped, bias, moments, a, s) > at_optimum


def test_expected_loss_matches_a_monte_carlo_estimate():
    mixing, mean = planted(3)
    g = torch.Generator().manual_seed(4)
    moments = FeatureMoments()
    x = sample(mixing, mean, 50000, g).double()
    moments.add(x[:, None, :])
    weight = 0.3 * torch.randn(1, K, K, generator=g, dtype=torch.float64)
    bias = 0.1 * torch.randn(1, K, generator=g, dtype=torch.float64)
    a, s = 0.9, 0.4
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    residual = eps - (a * x + s * eps) @ weight[0].T - bias[0]
    monte_carlo = float(residual.square().sum(-1).mean())
    assert expected_l2_loss(weight, bias, moments, a, s) == pytest.approx(monte_carlo, rel=0.02)
    no_bias_weight, no_bias = optimal_denoiser(moments, a, s, with_bias=False)
    assert no_bias is None
    assert expected_l2_loss(no_bias_weight, None, moments, a, s) < expected_l2_loss(
        weight, None, moments, a, s
    )


def test_label_free_sgd_approaches_the_closed_form_optimum():
    """The training loss (L1 + L2, summed over the feature) with Adam, no weight decay, converges to D*.

    For a Gaussian feature the residual is Gaussian for every (D, d), so the L1 term has the same
    minimiser as the L2 term, and D* is the target of the whole loss.
    """
    mixing, mean = planted()
    g = torch.Generator().manual_seed(1)
    calibrated = one_layer()
    found = calibrate(calibrated, [sample(mixing, mean, 20000, g) for _ in range(5)])
    target, target_bias = denoiser_tensors(calibrated[0])
    step = calibrated[0].step
    moments = found["0"].moments

    net = one_layer()
    set_phase(net, "denoiser")
    optimizer = torch.optim.Adam(denoiser_parameters(net), lr=1e-2)
    torch.manual_seed(5)
    for _ in range(800):
        with torch.no_grad():  # the backbone runs without autograd: only the denoiser learns
            net(sample(mixing, mean, 256, g))
        loss = denoise_loss(net)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weight, bias = denoiser_tensors(net[0])
    assert float((weight - target).norm() / target.norm()) < 0.1
    reached = expected_l2_loss(weight, bias, moments, step.sqrt_abar, step.sqrt_one_minus_abar)
    minimum = expected_l2_loss(target, target_bias, moments, step.sqrt_abar, step.sqrt_one_minus_abar)
    assert reached < 1.02 * minimum
    assert reached < 0.6 * K  # far below the D = 0 value


def test_the_gradient_on_d_does_not_shrink_with_width():
    """Summed over the feature, the per-entry gradient at D = 0 is about equal at widths 16 and 256."""
    norms = {}
    for width in (16, 256):
        torch.manual_seed(0)
        net = convert(nn.Sequential(nn.Linear(width, 4)), layers="linear").train()
        net(torch.randn(512, width))
        loss = denoise_loss(net)
        (grad,) = torch.autograd.grad(loss, [net[0].denoiser_weight])
        norms[width] = float(grad.diagonal().abs().mean())
    assert 0.5 < norms[256] / norms[16] < 2.0


def _conv_bn(side: str) -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
    return convert(net, layers="conv", conv_side=side)


@pytest.mark.parametrize("side", ["input", "output"])
def test_the_fused_change_survives_a_train_mode_batchnorm_on_the_input_side_only(side):
    """A diagonal D: on the output side it is one scale per channel, which a train-mode BatchNorm cancels."""
    net = _conv_bn(side)
    layer = net[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        diagonal = torch.diag_embed(torch.rand(1, 8, generator=g) * 40.0)
        layer.denoiser_weight.copy_(diagonal)
    plain = fuse(net).train()
    baseline = copy.deepcopy(plain)
    baseline[0].weight.data.copy_(layer.weight.detach())
    x = torch.randn(4, 8, 9, 9, generator=g)
    with torch.no_grad():
        out, ref = plain(x), baseline(x)
    change_after_bn = float((out - ref).norm() / ref.norm())
    change_of_weight = weight_changes(net)["0"]
    assert change_of_weight > 0.05
    if side == "input":
        assert change_after_bn > 0.2 * change_of_weight
    else:
        assert change_after_bn < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_eval_step_keeps_its_correction_under_autocast(dtype):
    """The residual form: in half precision the error of the step is small against the correction itself."""
    torch.manual_seed(0)
    net = convert(nn.Sequential(nn.Linear(64, 8)), layers="linear").eval()
    layer = net[0]
    with torch.no_grad():
        layer.denoiser_weight.copy_(torch.randn(64, 64) / 8.0 * 0.3 / layer.step.c1)
    x = torch.randn(32, 64)
    with torch.no_grad():
        x64 = x.double()
        d64 = layer.denoiser_weight.double()
        exact = x64 - layer.step.c1 * (x64 @ d64.T + layer.denoiser_bias.double()) + (layer.step.c3 - 1) * x64
        with torch.autocast("cpu", dtype=dtype):
            low = layer.denoise(x)
    correction = (exact - x64).norm()
    assert float(correction / x64.norm()) > 0.1
    assert float((low.double() - exact).norm() / correction) < 0.05


def test_reference_schedule_is_the_public_codes_zero_based_pair():
    blocks = [f"blocks.{i // 2}.mlp" for i in range(24)]  # a 12-block ViT: fc1, fc2 per block
    assigned = reference_timesteps(blocks, 1000)
    assert assigned[:2] == [25, 24]
    fc1 = DiffusionSchedule(1000, (1e-4, 2e-3)).step(assigned[0])
    assert fc1.sqrt_one_minus_abar == pytest.approx(0.0554, abs=5e-5)
    assert fc1.c1 == pytest.approx(2.631e-3, abs=5e-7)


def test_auto_layers_pick_mlp_linears_in_transformers_and_dense_convs_in_cnns():
    vit = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=32,
        depth=2,
        embed_dim=64,
        num_heads=2,
    )
    convert(vit)
    names = [name for name, _ in denoising_layers(vit)]
    assert names and all(".mlp.fc" in name for name in names)
    cnn = timm.create_model("mobilenetv2_035", pretrained=False, num_classes=0)
    convert(cnn)
    layers = denoising_layers(cnn)
    assert layers
    assert all(isinstance(m, DenoisingConv2d) and m.side == "input" for _, m in layers)
    assert all(m.in_channels // m.groups > 1 for _, m in layers)  # depthwise convs are left alone


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_row_subsampled_loss_is_an_unbiased_estimate(kind):
    torch.manual_seed(0)
    if kind == "linear":
        net = convert(nn.Sequential(nn.Linear(12, 4)), layers="linear")
        x = torch.randn(8, 50, 12) + 0.5
    else:
        net = convert(nn.Sequential(nn.Conv2d(6, 4, 3, padding=1, groups=2, bias=False)), layers="conv")
        x = torch.randn(4, 6, 16, 16) + 0.5
    layer = net[0]
    with torch.no_grad():
        layer.denoiser_weight.copy_(0.5 * torch.randn(layer.denoiser_weight.shape))
    net.train()

    def mean_loss(rows: int | None, draws: int) -> float:
        set_loss_rows(net, rows)
        total = 0.0
        for _ in range(draws):
            with torch.no_grad():
                net(x)
            total += float(denoise_loss(net).detach())
        return total / draws

    full = mean_loss(None, 200)
    sampled = mean_loss(32, 2000)
    assert sampled == pytest.approx(full, rel=0.02)
    set_loss_rows(net, 32)
    with torch.no_grad():
        net(x)
    loss = denoise_loss(net)
    assert loss.requires_grad  # still trains D
    with pytest.raises(DenoiseRepError, match="positive integer"):
        set_loss_rows(net, 0)
