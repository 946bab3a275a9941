import torch

from training.byorl import OnlineNetwork, byol_loss, ema_update, make_target


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


def test_online_network_shapes():
    net = OnlineNetwork("preact_resnet_tiny", proj_hidden=16, proj_dim=8)
    x = torch.rand(4, 3, 32, 32)
    assert net.encoder.forward_features(x).shape == (4, net.encoder.num_features)
    assert net.project(x).shape == net(x).shape == (4, 8)
