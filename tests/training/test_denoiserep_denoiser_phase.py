"""The cheap denoiser phase: fused weights reused for ``fused_refresh`` steps, loss rows gathered.

What must hold: within a refresh period the forward is exactly the model with the denoisers of the
period's start (and each layer's loss uses its current D), the weights are rebuilt after the period
or as soon as W changes or trains, ``fused_refresh`` 1 is the exact definition, the rebuilds saved
show as FLOPs, and the loss's sampled rows are the same pixels the moved-and-flattened map gives.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from tests.training.test_denoiserep_folding import _net
from training import denoiserep as dr
from training.config import config_from_dict
from training.denoiserep.errors import DenoiseRepError

F64 = torch.float64


def _denoiser_step(net: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = net(x)
    loss = dr.denoise_loss(net)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return out


def _exact_forward(net: nn.Module, denoisers: list[list[torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """The train forward of ``net`` with the given (D, d) per layer, rebuilt (fused_refresh 1)."""
    probe = copy.deepcopy(net)
    dr.set_fused_refresh(probe, 1)
    with torch.no_grad():
        for (_, layer), tensors in zip(dr.denoising_layers(probe), denoisers, strict=True):
            for p, t in zip(layer.denoiser_parameters(), tensors, strict=True):
                p.copy_(t)
        return probe(x)


def _denoisers(net: nn.Module) -> list[list[torch.Tensor]]:
    return [
        [p.detach().clone() for p in layer.denoiser_parameters()] for _, layer in dr.denoising_layers(net)
    ]


def test_a_refresh_period_runs_the_denoisers_of_its_start_then_rebuilds() -> None:
    net = _net()
    dr.set_phase(net, "denoiser")
    dr.set_fused_refresh(net, 3)
    optimizer = torch.optim.Adam(dr.denoiser_parameters(net), lr=1e-2)
    x = torch.randn(4, 8, 5, 5, dtype=F64)
    start = _denoisers(net)
    outs = [_denoiser_step(net, optimizer, x)]
    outs.append(_denoiser_step(net, optimizer, x))  # D moved once: the forward still uses `start`
    moved = _denoisers(net)
    assert any((a[0] - b[0]).abs().max() > 1e-4 for a, b in zip(start, moved, strict=True))
    assert torch.allclose(outs[1], _exact_forward(net, start, x), rtol=0, atol=1e-12)
    assert not torch.allclose(outs[1], _exact_forward(net, moved, x), rtol=0, atol=1e-9)
    _denoiser_step(net, optimizer, x)
    current = _denoisers(net)
    rebuilt = _denoiser_step(net, optimizer, x)  # the 4th forward starts a new period
    assert torch.allclose(rebuilt, _exact_forward(net, current, x), rtol=0, atol=1e-12)


def test_each_layers_loss_uses_its_current_denoiser_inside_a_period() -> None:
    layer = dr.convert(nn.Sequential(nn.Linear(6, 3)).to(F64), layers="linear")[0]
    with torch.no_grad():
        layer.denoiser_weight.normal_(0, 0.2)
    dr.set_phase(layer, "denoiser")
    dr.set_fused_refresh(layer, 4)
    x = torch.randn(5, 6, dtype=F64)
    layer.train()(x)
    layer.pop_loss()
    with torch.no_grad():
        layer.denoiser_weight.add_(0.3)  # as an optimiser step would, mid-period
    reference = copy.deepcopy(layer)
    dr.set_fused_refresh(reference, 1)
    torch.manual_seed(3)
    layer(x)
    torch.manual_seed(3)
    reference(x)
    assert float(layer.pop_loss().detach()) == pytest.approx(float(reference.pop_loss().detach()), rel=1e-12)


def test_fused_weights_are_rebuilt_when_w_changes_or_trains() -> None:
    net = _net()
    dr.set_phase(net, "denoiser")
    dr.set_fused_refresh(net, 100)
    x = torch.randn(4, 8, 5, 5, dtype=F64)
    with torch.no_grad():
        net(x)
        dr.denoise_loss(net)
        first = dr.denoising_layers(net)[0][1]
        first.weight.mul_(1.5)  # e.g. a checkpoint loaded in place
        after = net(x)
    dr.denoise_loss(net)
    assert torch.allclose(after, _exact_forward(net, _denoisers(net), x), rtol=0, atol=1e-12)

    with torch.no_grad():
        for _, layer in dr.denoising_layers(net):
            layer.denoiser_weight.mul_(0.5)
    dr.set_phase(net, "joint")  # W trains: every forward rebuilds, differentiably in W
    out = net(x)
    dr.denoise_loss(net)
    assert torch.allclose(out, _exact_forward(net, _denoisers(net), x), rtol=0, atol=1e-12)
    out.sum().backward()
    assert first.weight.grad is not None


def test_reusing_the_fused_weights_saves_their_flops() -> None:
    def flops(refresh: int, steps: int) -> int:
        net = _net()
        dr.set_phase(net, "denoiser")
        dr.set_fused_refresh(net, refresh)
        optimizer = torch.optim.Adam(dr.denoiser_parameters(net), lr=1e-3)
        x = torch.randn(16, 8, 5, 5, dtype=F64)
        with FlopCounterMode(display=False) as counter:
            for _ in range(steps):
                _denoiser_step(net, optimizer, x)
        return counter.get_total_flops()

    def build_flops() -> int:
        net = _net()
        with FlopCounterMode(display=False) as counter:
            for _, layer in dr.denoising_layers(net):
                layer.fused_parameters()
        return counter.get_total_flops()

    rebuilt, reused = flops(1, 4), flops(4, 4)
    # Four steps with one build instead of four (the rebuilt road may take the cheaper rows road).
    assert reused < rebuilt
    assert rebuilt - reused <= 3 * build_flops()


def test_fused_refresh_one_is_the_exact_definition() -> None:
    a, b = _net(), _net()
    dr.set_phase(a, "denoiser")
    dr.set_phase(b, "denoiser")
    dr.set_fused_refresh(b, 1)
    x = torch.randn(4, 8, 5, 5, dtype=F64)
    oa = torch.optim.Adam(dr.denoiser_parameters(a), lr=1e-2)
    ob = torch.optim.Adam(dr.denoiser_parameters(b), lr=1e-2)
    for step in range(3):
        torch.manual_seed(step)
        ya = _denoiser_step(a, oa, x)
        torch.manual_seed(step)
        yb = _denoiser_step(b, ob, x)
        assert torch.equal(ya, yb)  # a freshly converted model rebuilds every forward (refresh 1)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
def test_loss_rows_are_the_pixels_of_the_moved_map_and_predicted_per_group(groups: int, bias: bool) -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias).to(F64)
    layer = dr.convert(nn.Sequential(conv), layers="conv", conv_side="output" if bias else "input")[0]
    with torch.no_grad():
        for p in layer.denoiser_parameters():
            p.normal_(0, 0.3)
    layer.loss_rows = 10
    width = layer.denoiser_weight.shape[0] * layer.denoiser_weight.shape[-1]
    clean = torch.randn(3, width, 4, 5, dtype=F64)
    torch.manual_seed(7)
    rows = layer._loss_rows_of(clean, 1)
    torch.manual_seed(7)
    expected = clean.movedim(1, -1).reshape(-1, width)[torch.randint(3 * 4 * 5, (10,))]
    assert torch.equal(rows, expected)
    as_maps = layer.predict_noise(rows[:, :, None, None])[:, :, 0, 0]
    assert torch.allclose(layer._predict_rows(rows), as_maps, rtol=0, atol=1e-12)


def test_bad_fused_refresh_values_are_refused() -> None:
    net = _net()
    for bad in (0, -1, True, 2.0):
        with pytest.raises(DenoiseRepError, match="positive integer"):
            dr.set_fused_refresh(net, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fused_refresh"):
        config_from_dict({"denoiserep": {"fused_refresh": 0}})
