import math

import pytest
import torch
from torch import nn

from byorl.training.optim import LARS, get_lr, get_tau, lars_param_groups


def test_warmup_then_cosine_values():
    assert get_lr(0, 100, 10, 2.0) == pytest.approx(0.2)
    assert get_lr(9, 100, 10, 2.0) == pytest.approx(2.0)
    assert get_lr(10, 100, 10, 2.0) == pytest.approx(2.0)
    assert get_lr(55, 100, 10, 2.0) == pytest.approx(1.0)  # half-way through the cosine
    assert get_lr(100, 100, 10, 2.0) == pytest.approx(0.0, abs=1e-12)


def test_tau_schedule_end_points():
    assert get_tau(0, 1000, 0.996) == pytest.approx(0.996)
    assert get_tau(500, 1000, 0.996) == pytest.approx(0.998)
    assert get_tau(1000, 1000, 0.996) == pytest.approx(1.0)


def test_lars_excludes_biases_and_batchnorm():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    regular, excluded = lars_param_groups(model, 5e-4)
    assert {id(p) for p in regular["params"]} == {id(model[0].weight), id(model[2].weight)}
    assert len(excluded["params"]) == 4  # two biases, BN weight and bias
    assert excluded["weight_decay"] == 0 and not excluded["lars"]
    assert regular["weight_decay"] == 5e-4 and regular["lars"]


def test_lars_step_closed_form():
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(3))
    gw, gb = torch.randn(3, 4), torch.randn(3)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt = LARS([{"params": [w], "weight_decay": 0.1, "lars": True},
                {"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.5, eta=1e-3)
    opt.step()
    d = gw + 0.1 * w0
    trust = 1e-3 * w0.norm() / d.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * d)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)  # plain step: no decay, no trust ratio
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()  # momentum 0.9: the second step moves b by 0.5 * (0.9 gb + gb)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb - 0.5 * 1.9 * gb)
    assert math.isfinite(w.detach().sum().item())


def test_schedules_hold_their_end_values_past_the_end():
    assert get_lr(150, 100, 10, 2.0) == pytest.approx(0.0, abs=1e-12)
    assert get_lr(5, 100, 0, 2.0) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.05)))
    assert get_lr(10, 10, 10, 2.0) == pytest.approx(2.0)  # a schedule that is all warm-up
    assert get_tau(1500, 1000, 0.996) == pytest.approx(1.0)
    assert get_tau(0, 1000) == pytest.approx(0.996)  # BYOL's tau_base by default


def test_lars_defaults_frozen_and_zero_weights():
    """BYOL's eta 1e-3 and momentum 0.9; frozen parameters are left out; a zero weight (or a
    zero update) has no trust ratio to take and steps by the plain update."""
    w = nn.Parameter(torch.zeros(2, 2))
    frozen = nn.Parameter(torch.ones(2, 2), requires_grad=False)
    model = nn.ParameterList([w, frozen])
    groups = lars_param_groups(model, 0.0)
    assert [len(g["params"]) for g in groups] == [1, 0]
    opt = LARS(groups, lr=0.1)
    assert opt.defaults["eta"] == 1e-3 and opt.defaults["momentum"] == 0.9
    w.grad = torch.ones(2, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((2, 2), -0.1))
    assert opt.step(closure=lambda: 3.0) == 3.0


def test_lars_on_plain_parameters_scales_small_weights_and_skips_zero_gradients():
    """Without group options: no weight decay, trust ratio on. The ratio applies whatever the
    norms' size (here both below 1); a zero gradient moves nothing (and makes no NaN)."""
    w, still = nn.Parameter(torch.full((2, 2), 0.1)), nn.Parameter(torch.full((2, 2), 0.3))
    w.grad, still.grad = torch.full((2, 2), 0.2), torch.zeros(2, 2)
    LARS([w, still], lr=0.5).step()
    trust = 1e-3 * 0.2 / 0.4  # eta |w| / |g| with |w| = 0.2, |g| = 0.4
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 0.1 - 0.5 * trust * 0.2))
    torch.testing.assert_close(still.detach(), torch.full((2, 2), 0.3))
