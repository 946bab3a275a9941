import pytest
import torch

from training.attacks import APGD, PGD, ThreatModel, apgd_checkpoints, project, random_start
from training.byorl import OnlineNetwork, byol_loss

BUDGETS = [("linf", 8 / 255), ("l2", 0.5)]


def norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = delta.flatten(1)
    return {"linf": flat.abs().amax(1), "l2": flat.norm(dim=1)}


@pytest.mark.parametrize(("norm", "eps"), BUDGETS)
def test_projection_stays_in_ball_and_pixel_range(norm, eps):
    torch.manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    far = x + 3 * torch.randn_like(x)
    out = project(far, x, norm, eps)
    assert (norms(out - x)[norm] <= eps + 1e-6).all()
    assert out.min() >= 0 and out.max() <= 1
    start = random_start(x, norm, eps)
    assert (norms(start - x)[norm] <= eps + 1e-6).all() and start.min() >= 0 and start.max() <= 1
    inside = project(x + 0.5 * (start - x), x, norm, eps)  # a point already inside is kept
    torch.testing.assert_close(inside, x + 0.5 * (start - x))


@pytest.mark.parametrize("attack_cls", [PGD, APGD])
@pytest.mark.parametrize(("norm", "eps"), BUDGETS)
def test_linear_loss_reaches_closed_form_optimum(attack_cls, norm, eps):
    """max over the ball of w.x is attained at x + eps sign(w) (linf) or x + eps w/|w| (l2)."""
    torch.manual_seed(1)
    w = torch.randn(1, 3, 4, 4)
    x = torch.full((2, 3, 4, 4), 0.5)

    def loss_fn(xa, _):
        return (xa * w).flatten(1).sum(1)

    x_adv = attack_cls(loss_fn, norm, eps, steps=20, random_init=False).perturb(x, None)
    best = x + (eps * w.sign() if norm == "linf" else eps * w / w.norm())
    torch.testing.assert_close(loss_fn(x_adv, None), loss_fn(best, None), rtol=1e-3, atol=1e-3)
    assert (norms(x_adv - x)[norm] <= eps + 1e-6).all()


@pytest.mark.parametrize(("norm", "eps"), BUDGETS)
def test_byorl_attack_lowers_cosine_far_more_than_noise(norm, eps):
    torch.manual_seed(0)
    net = OnlineNetwork("preact_resnet_tiny", proj_hidden=64, proj_dim=32).eval()
    x = torch.rand(16, 3, 32, 32)
    with torch.no_grad():
        z = net.project(x.flip(-1))  # the target: another view of the same images

    def loss_fn(xa, target):
        return byol_loss(net(xa), target)

    for attack in (PGD(loss_fn, norm, eps, steps=10), APGD(loss_fn, norm, eps, steps=10)):
        x_adv = attack.perturb(x, z)
        assert torch.isfinite(x_adv).all() and x_adv.min() >= 0 and x_adv.max() <= 1
        delta = x_adv - x
        assert (norms(delta)[norm] <= eps + 1e-6).all()
        noise = torch.randn_like(x)  # random noise of the same norm as the attack
        noise = noise * (norms(delta)[norm] / norms(noise)[norm]).view(-1, 1, 1, 1)
        with torch.no_grad():
            noisy_x = project(x + noise, x, norm, eps)
            clean, adv, noisy = (byol_loss(net(v), z).mean() for v in (x, x_adv, noisy_x))
        assert adv - clean > 5 * (noisy - clean).abs() + 1e-4


def test_apgd_checkpoints_match_croce_hein():
    assert apgd_checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="norm"):
        ThreatModel("l1", 0.1)
    with pytest.raises(ValueError, match="eps"):
        PGD(lambda x, y: x.sum(), "linf", -1.0)
    with pytest.raises(ValueError, match="steps"):
        APGD(lambda x, y: x.sum(), "l2", 0.5, steps=0)
