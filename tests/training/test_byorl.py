import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from byorl.training.attacks import APGD, PGD
from byorl.training.byorl import (
    OnlineNetwork,
    byol_loss,
    ema_update,
    make_attack,
    make_target,
    symmetric_loss,
)


def test_byol_loss_closed_form():
    p = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 5.0], [6.0, 8.0]])
    torch.testing.assert_close(byol_loss(p, z), torch.tensor([0.0, 4.0, 2.0, 0.0]))


def test_byol_loss_gives_no_gradient_to_target():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z).sum().backward()
    assert p.grad is not None and z.grad is None


def test_ema_update_closed_form():
    torch.manual_seed(0)
    online = OnlineNetwork("preact_resnet_tiny", proj_hidden=16, proj_dim=8)
    target = make_target(online)
    before = [t.detach().clone() for t in target.parameters()]
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    ema_update(target, online, tau=0.9)
    for t, o, t0 in zip(target.parameters(), online.parameters(), before, strict=True):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * o.detach())
        assert not t.requires_grad


def test_online_network_defaults_are_the_papers():
    """Width x1, projector and predictor MLPs of hidden size 4096 and output 256 (sec. 4.1)."""
    net = OnlineNetwork("preact_resnet_tiny")
    assert net.encoder.num_features == 64  # preact_resnet_tiny at x1: 8, 16, 32, 64
    assert net.project(torch.rand(2, 3, 32, 32)).shape == (2, 256)
    hidden = [m.out_features for m in net.modules() if isinstance(m, nn.Linear)]
    assert hidden == [4096, 256, 4096, 256]
    assert OnlineNetwork("preact_resnet_tiny", width=2, proj_hidden=8).encoder.num_features == 128


def test_online_network_shapes():
    net = OnlineNetwork("preact_resnet_tiny", proj_hidden=16, proj_dim=8)
    x = torch.rand(4, 3, 32, 32)
    assert net.encoder.forward_features(x).shape == (4, net.encoder.num_features)
    assert net.project(x).shape == net(x).shape == (4, 8)


class LinearNet(nn.Module):
    """online(x) = project(x) = W x on 2-pixel "images": a network known by hand."""

    def __init__(self, weight: list[list[float]]):
        super().__init__()
        self.linear = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)

    project = forward


# Online: the identity; target projection: z([a, b]) = [a, a + b]. Two views of two images.
V1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # v:  z(v)  = [[1, 1], [0, 1]]
V2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])  # v': z(v') = [[0, 1], [1, 2]]


def test_symmetric_loss_pairs_each_view_with_the_other_views_target():
    """By hand, 2 - 2 cos(p, z) per pair, each direction averaged over the 2 images:
    L(v, v')  = mean(cos-loss([1,0],[0,1]) = 2, cos-loss([0,1],[1,2]) = 2 - 4/sqrt5);
    L(v', v)  = mean(cos-loss([0,1],[1,1]) = 2 - sqrt2, cos-loss([1,1],[0,1]) = 2 - sqrt2).
    Pairing each view with its own target, or one direction twice, gives other numbers."""
    online, target = LinearNet([[1, 0], [0, 1]]), LinearNet([[1, 0], [1, 1]])
    out = symmetric_loss(online, target, V1, V2)
    cross = (2 + 2 - 4 / math.sqrt(5)) / 2 + (2 - math.sqrt(2))
    same_view = (2 - math.sqrt(2) + 0 + 0 + 2 - 6 / math.sqrt(10)) / 2
    assert out.loss.item() == pytest.approx(cross, abs=1e-6)
    for wrong in (same_view, 2 * (2 + 2 - 4 / math.sqrt(5)) / 2, 2 * (2 - math.sqrt(2))):
        assert abs(out.loss.item() - wrong) > 0.4
    torch.testing.assert_close(out.z, torch.tensor([[0.0, 1], [1, 2], [1, 1], [0, 1]]))
    torch.testing.assert_close(out.views, torch.cat([V1, V2]))
    out.loss.backward()  # the target gets no gradient (stop-gradient), the online network does
    assert target.linear.weight.grad is None and online.linear.weight.grad is not None


def test_symmetric_loss_attacks_each_view_against_the_other_views_target():
    """The attack sees the stacked views and their cross-view targets, and the loss is taken
    at the points it returns: a deterministic PGD run by hand on those gives the same loss."""
    online, target = LinearNet([[1, 0], [0, 1]]), LinearNet([[1, 0], [1, 1]])
    v1, v2 = 0.25 + 0.5 * V1, 0.25 + 0.5 * V2  # inside [0, 1], room to move both ways

    def loss_fn(x_adv, z):
        return byol_loss(online(x_adv), z)

    attack = PGD(loss_fn, "linf", 0.1, steps=3, random_init=False)
    out = symmetric_loss(online, target, v1, v2, attack)
    z_cross = torch.cat([target.project(v2), target.project(v1)]).detach()
    by_hand = attack.perturb(torch.cat([v1, v2]), z_cross)
    torch.testing.assert_close(out.loss, 2 * byol_loss(online(by_hand), z_cross).mean())
    torch.testing.assert_close(out.p, online(by_hand))
    clean = symmetric_loss(online, target, v1, v2)
    assert out.loss > clean.loss + 0.01  # the attack really raised the loss


def test_symmetric_loss_refuses_views_of_different_shapes():
    net = LinearNet([[1, 0], [0, 1]])
    with pytest.raises(ValueError, match="one shape"):
        symmetric_loss(net, net, V1, V2[:1])


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def record_bn_calls(net: nn.Module) -> tuple[dict, list]:
    """Per BatchNorm of `net`, every forward call's (batch size, mean, unbiased variance of its
    input, whether it normalised with exactly those batch statistics); and the hooks."""
    calls = {m: [] for m in batch_norms(net)}

    def record(m, inputs, output):
        x = inputs[0].detach()
        dims = [0] + list(range(2, x.dim()))
        batch_normed = F.batch_norm(x, None, None, m.weight, m.bias, True, 0.0, m.eps)
        calls[m].append((len(x), x.mean(dims), x.var(dims, unbiased=True),
                         torch.allclose(output, batch_normed, atol=1e-5)))

    return calls, [m.register_forward_hook(record) for m in calls]


@pytest.mark.parametrize("separate", [False, True])
def test_attack_passes_use_batch_statistics_and_leave_running_averages_alone(separate):
    """In a BYORL step every forward pass normalises with the batch's own statistics, yet the
    running averages move only by the loss pass: (1 - m) before + m batch stats, once for the
    concatenated views, once per view (v, then v') when each view is a batch of its own; and
    then every pass (2 attack steps, the loss) sees one view only, never the two mixed."""
    torch.manual_seed(0)
    online = OnlineNetwork("preact_resnet_tiny", proj_hidden=16, proj_dim=8).train()
    target = make_target(online)
    before = {m: (m.running_mean.clone(), m.running_var.clone()) for m in batch_norms(online)}
    calls, hooks = record_bn_calls(online)
    attack = PGD(lambda xa, z: byol_loss(online(xa), z), "linf", 8 / 255, steps=2)
    x = torch.rand(4, 3, 32, 32)
    symmetric_loss(online, target, x, x.flip(-1), attack, separate=separate)
    for h in hooks:
        h.remove()
    for m, seen in calls.items():
        assert all(used_batch_stats for *_, used_batch_stats in seen)
        assert m.momentum == 0.1 and m.training
        mean, var = before[m]
        if separate:
            assert [size for size, *_ in seen] == [4] * 6  # v: 2 attack passes, v': 2, loss: 2
            for _, view_mean, view_var, _ in seen[-2:]:
                mean, var = 0.9 * mean + 0.1 * view_mean, 0.9 * var + 0.1 * view_var
        else:
            assert [size for size, *_ in seen] == [8] * 3  # two attack passes, the loss pass
            _, batch_mean, batch_var, _ = seen[-1]
            mean, var = 0.9 * mean + 0.1 * batch_mean, 0.9 * var + 0.1 * batch_var
        torch.testing.assert_close(m.running_mean, mean)
        torch.testing.assert_close(m.running_var, var)


def test_per_view_loss_is_each_view_through_the_networks_alone():
    """separate=True (the default) is, by hand, L(v, v') + L(v', v) with every network called
    on one view at a time; the concatenated variant normalises the two views together and so
    gives another loss (same weights, same views)."""
    torch.manual_seed(0)
    online = OnlineNetwork("preact_resnet_tiny", proj_hidden=16, proj_dim=8).train()
    target = make_target(online)
    v1, v2 = torch.rand(6, 3, 32, 32), torch.rand(6, 3, 32, 32) * 0.5
    ref_online, ref_target = copy.deepcopy(online), copy.deepcopy(target)
    with torch.no_grad():
        z1, z2 = ref_target.project(v1), ref_target.project(v2)
    by_hand = (byol_loss(ref_online(v1), z2).mean() + byol_loss(ref_online(v2), z1).mean())
    out = symmetric_loss(online, target, v1, v2)
    torch.testing.assert_close(out.loss, by_hand)
    torch.testing.assert_close(out.z, torch.cat([z2, z1]))
    concat = symmetric_loss(copy.deepcopy(ref_online), copy.deepcopy(ref_target), v1, v2,
                            separate=False)
    assert abs(concat.loss.item() - by_hand.item()) > 1e-3


def test_make_attack_builds_the_configured_attack():
    def loss(x, y):
        return x.flatten(1).sum(1)

    apgd = make_attack("apgd", loss, "l2", 0.5, 7)
    assert isinstance(apgd, APGD)
    assert (apgd.loss_fn, apgd.norm, apgd.eps, apgd.steps) == (loss, "l2", 0.5, 7)
    pgd = make_attack("pgd", loss, "linf", 0.1, 3, 0.05)
    assert isinstance(pgd, PGD)
    assert (pgd.loss_fn, pgd.norm, pgd.eps, pgd.steps) == (loss, "linf", 0.1, 3)
    assert pgd.step_size == 0.05
    with pytest.raises(ValueError, match="'apgd' or 'pgd'"):
        make_attack("fgsm", loss, "linf", 0.1, 3)


def test_ema_update_refuses_networks_of_different_shapes():
    with pytest.raises(ValueError):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), 0.9)
