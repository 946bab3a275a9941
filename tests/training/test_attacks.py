import pytest
import torch

from byorl.training.attacks import (
    APGD,
    PGD,
    MultiTargeted,
    ThreatModel,
    apgd_checkpoints,
    margin_loss,
    normalized_step,
    project,
    random_start,
)
from byorl.training.byorl import OnlineNetwork, byol_loss
from tests.training.conftest import exact_linf_robust, synthetic_linear

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


def two_peaks(x: torch.Tensor) -> torch.Tensor:
    """max(-|x - 5/16|, 1/16 - |x - 11/16|): the higher peak at 11/16, a lower one at 5/16."""
    return torch.maximum(-(x - 5 / 16).abs(), 1 / 16 - (x - 11 / 16).abs())


def test_apgd_follows_croce_hein_algorithm_1_by_hand():
    """One pixel at 0.5, linf eps 1/4 (the ball is [1/4, 3/4]), 18 steps: checkpoints at
    4, 8, 11, ...; eta starts at 2 eps = 1/2. Example 0 climbs `two_peaks`, example 1 the
    line f(x) = x. Worked by hand for example 0 (every number is exact in float32):
      k=0  plain step (alpha = 1): z = P(0.5 + 1/2) = 0.75 = x1, f 0 (up, best).
      k=1  momentum 0.75: x2 = x1 + 0.75 (P(x1 - 1/2) - x1) + 0.25 (x1 - x0) = 0.4375 (down).
      k=2  x3 = P(0.4375 + 0.75 (0.25 - 0.4375) + 0.25 (0.4375 - 0.75)) = P(0.21875) = 0.25 (up).
      k=3  x4 = 0.25 + 0.75 (0.75 - 0.25) + 0.25 (0.25 - 0.4375) = 0.578125 (up).
      checkpoint 4: 3 increases >= 0.75 * 4, so eta stays 1/2 (example 1, stuck at the
      border with 1 increase, halves: step sizes are per example).
      k=4..7: 0.75 (up), 0.41796875 (down), 0.25 (up), 0.5830078125 (up), best still 0 at 0.75.
      checkpoint 8: 3 of 4 increases, so condition 1 does not hold, but eta was not reduced at 4
      and the best loss did not grow since (condition 2): eta = 1/4, restart from x_max = 0.75.
      k=8  x9 = 0.75 + 0.75 (P(0.75 - 1/4) - 0.75) + 0.25 (0.75 - 0.25) = 0.6875, the top.
      k=9  the gradient is 0 there, only momentum moves: 0.6875 + 0.25 (0.6875 - 0.75) = 0.671875.
      k=10 0.671875 + 0.75 (0.75 - 0.671875) + 0.25 (0.671875 - 0.6875) = 0.7265625.
      checkpoint 11: 1 increase < 0.75 * 3 (condition 1): eta = 1/8, restart from 0.6875.
    """
    queries = []

    def loss_fn(x_adv, which):
        queries.append(x_adv.detach().flatten().tolist())
        return torch.where(which == 0, two_peaks(x_adv), x_adv).flatten()

    apgd = APGD(loss_fn, "linf", 0.25, steps=18, random_init=False)
    x_adv = apgd.perturb(torch.full((2, 1), 0.5), torch.tensor([[0], [1]]))
    visited = visited_points(queries)  # x0, x1..x8, x_max, x9..x11, x_max, ...
    assert visited[0][:14] == [0.5, 0.75, 0.4375, 0.25, 0.578125, 0.75, 0.41796875, 0.25,
                               0.5830078125, 0.75, 0.6875, 0.671875, 0.7265625, 0.6875]
    assert visited[1] == [0.5, 0.75]  # straight to the border, where it stays
    assert len(queries) >= 19  # x0 and 18 steps, plus re-evaluations at restarts
    assert x_adv.flatten().tolist() == [0.6875, 0.75]  # the best points



def visited_points(queries: list[list[float]]) -> list[list[float]]:
    """Per example, the points evaluated, a repeated evaluation of one point counted once (the
    batch is re-evaluated when any example restarts)."""
    return [[q[i] for j, q in enumerate(queries) if j == 0 or q[i] != queries[j - 1][i]]
            for i in range(len(queries[0]))]


def test_apgd_step_size_rule_on_single_peaks_by_hand():
    """f = -|x - c| from 0.5, linf eps 1/4, 10 steps: checkpoints 3, 5, 6, 7, 8, 9, 10.
    c = 11/16: 0.75 (up, best), 0.4375 (down), 0.59375 (up); checkpoint 3: 2 increases
      < 0.75 * 3, eta = 1/4, restart from 0.75; 0.640625, 0.6953125 (both up, best);
      checkpoint 5: 2 of 2, eta kept; 0.521484375 (down); checkpoint 6: halve, restart from
      0.6953125; then every checkpoint halves (no increase) until 10 (one increase, kept).
    c = 7/16: checkpoints 6, 8 and 9 keep eta (1 increase of 1, best improved), 3, 5, 7 and
      10 halve; the window of each checkpoint starts at the previous one.
    """
    queries = []

    def loss_fn(x_adv, c):
        queries.append(x_adv.detach().flatten().tolist())
        return -(x_adv - c).abs().flatten()

    peaks = torch.tensor([[11 / 16], [7 / 16]])
    apgd = APGD(loss_fn, "linf", 0.25, steps=10, random_init=False)
    x_adv = apgd.perturb(torch.full((2, 1), 0.5), peaks)
    assert visited_points(queries) == [
        [0.5, 0.75, 0.4375, 0.59375, 0.75, 0.640625, 0.6953125, 0.521484375, 0.6953125,
         0.6015625, 0.6953125, 0.6484375, 0.6953125, 0.671875, 0.6953125, 0.68359375],
        [0.5, 0.25, 0.5625, 0.40625, 0.5546875, 0.404296875, 0.40625, 0.462890625,
         0.38330078125, 0.462890625, 0.416015625, 0.451171875, 0.4130859375, 0.451171875],
    ]
    assert x_adv.flatten().tolist() == [0.68359375, 0.451171875]

@pytest.mark.parametrize(("norm", "eps"), BUDGETS)
def test_random_start_spreads_over_the_ball(norm, eps):
    """Uniform in the linf box (both signs, up to eps); in the l2 ball at radii spread over
    [0, eps] rather than all on its sphere."""
    torch.manual_seed(0)
    x = torch.full((256, 3, 4, 4), 0.5)
    size = norms(random_start(x, norm, eps) - x)[norm]
    if norm == "linf":
        delta = random_start(x, norm, eps) - x
        assert delta.min() < -0.9 * eps and delta.max() > 0.9 * eps
        assert abs(delta.mean().item()) < 0.05 * eps
    else:
        assert size.min() < 0.1 * eps and size.max() > 0.9 * eps
        assert size.mean().item() == pytest.approx(eps / 2, rel=0.15)
    assert (size <= eps + 1e-6).all()


@pytest.mark.parametrize("attack_cls", [PGD, APGD])
def test_random_init_starts_in_the_ball_unless_switched_off(attack_cls):
    """A loss with no gradient leaves the attack at its start: random, or x itself."""

    def flat(xa, _):
        return xa.flatten(1).sum(1) * 0

    x = torch.full((4, 3, 4, 4), 0.5)
    moved = attack_cls(flat, "linf", 0.1, steps=1).perturb(x, None)
    assert (moved - x).abs().max() > 0.05 and (moved - x).abs().max() <= 0.1 + 1e-6
    stayed = attack_cls(flat, "linf", 0.1, steps=1, random_init=False).perturb(x, None)
    assert torch.equal(stayed, x)


def test_apgd_keeps_the_best_of_its_restarts():
    """Restarts from random points under a piecewise-constant loss (no gradient, so each run
    stays at its start): the result is the start with the highest loss, per example."""
    starts = []

    def steps_of_a_stair(xa, _):
        starts.append(xa.detach().clone())
        return torch.floor(8 * xa).flatten(1).sum(1)

    torch.manual_seed(0)
    x = torch.full((6, 1, 1, 2), 0.5)
    best = APGD(steps_of_a_stair, "linf", 0.25, steps=1, restarts=4).perturb(x, None)
    # a run evaluates only its start (repeatedly): one start per change of the queried point
    runs = [s for i, s in enumerate(starts) if i == 0 or not torch.equal(s, starts[i - 1])]
    assert len(runs) == 4
    losses = torch.stack([torch.floor(8 * s).flatten(1).sum(1) for s in runs])  # (restart, n)
    first_best = losses.argmax(0)  # ties keep the earliest restart
    assert torch.equal(best, torch.stack([runs[r][i] for i, r in enumerate(first_best)]))


def test_pgd_default_step_is_madrys_and_budgets_are_checked():
    assert PGD(lambda x, y: x, "linf", 0.1, steps=4).step_size == pytest.approx(2.5 * 0.1 / 4)
    assert PGD(lambda x, y: x, "linf", 0.0, steps=1).eps == 0  # a zero budget is allowed
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match="eps"):
            ThreatModel("linf", bad)
    with pytest.raises(ValueError, match="steps"):
        PGD(lambda x, y: x, "linf", 0.1, steps=0)
    with pytest.raises(ValueError, match="restarts"):
        APGD(lambda x, y: x, "linf", 0.1, steps=1, restarts=0)


def test_attack_defaults_are_the_papers():
    """linf 8/255; PGD takes 10 steps, AutoPGD the paper's K = 40, one restart, rho 0.75."""
    pgd, apgd = PGD(pixel_sum), APGD(pixel_sum)
    assert (pgd.norm, pgd.eps, pgd.steps, pgd.random_init) == ("linf", 8 / 255, 10, True)
    assert (apgd.norm, apgd.eps, apgd.steps, apgd.restarts) == ("linf", 8 / 255, 40, 1)
    assert apgd.random_init and apgd.rho == 0.75


def pixel_sum(x: torch.Tensor, _) -> torch.Tensor:
    return x.flatten(1).sum(1)


def test_l2_steps_are_unit_directions():
    """The l2 step is the gradient over its norm, whatever that norm (here 0.3 and 30)."""
    grad = torch.tensor([[0.0, 0.3], [18.0, 24.0]]).view(2, 1, 1, 2)
    step = normalized_step(grad, "l2")
    torch.testing.assert_close(step.flatten(1), torch.tensor([[0.0, 1.0], [0.6, 0.8]]))
    assert torch.equal(normalized_step(grad, "linf"), grad.sign())


def test_apgd_first_l2_step_is_the_plain_projected_step():
    """From a random start x0, x1 = P(x0 + 2 eps g/|g|): alpha = 1, no momentum, projected on
    the ball around the clean image (not around x0)."""
    w = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    queries = []

    def linear(xa, _):
        queries.append(xa.detach().clone())
        return (xa * w).flatten(1).sum(1)

    torch.manual_seed(0)
    x = torch.full((3, 1, 1, 2), 0.5)
    APGD(linear, "l2", 0.2, steps=2).perturb(x, None)
    x0, x1 = queries[0], queries[1]
    assert not torch.equal(x0, x)  # a random start
    torch.testing.assert_close(x1, project(x0 + 2 * 0.2 * w / 5, x, "l2", 0.2))


def test_margin_loss_is_best_other_logit_minus_true_logit():
    logits = torch.tensor([[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]])
    assert margin_loss(logits, torch.tensor([0, 1])).tolist() == [2.0, -1.0]


@pytest.mark.parametrize("threat", [ThreatModel("linf", 8 / 255), ThreatModel("l2", 1.0)])
def test_multitargeted_fools_an_undefended_model(data, convnet, threat):
    x, y = data[2], data[3]
    with torch.no_grad():
        correct = convnet(x).argmax(1) == y
    x, y = x[correct], y[correct]
    x_adv = MultiTargeted(convnet, threat.norm, threat.eps, steps=20, restarts=3).perturb(x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if threat.norm == "linf" else delta.norm(dim=1)
    assert size.max() <= threat.eps * (1 + 1e-5)
    assert 0 <= x_adv.min() and x_adv.max() <= 1
    with torch.no_grad():
        fooled = convnet(x_adv).argmax(1) != y
    assert fooled.float().mean() >= 0.9


def test_multitargeted_takes_wrong_classes_in_order_of_their_clean_logit():
    """One restart attacks only the best-ranked wrong class; three cover all of them and reach
    the exact worst case (at this eps one point falls only to its second or third class)."""
    model, x, y = synthetic_linear()
    eps = 0.03
    w, b, flat = model[1].weight.detach(), model[1].bias.detach(), x.flatten(1)
    with torch.no_grad():
        logits = model(x)
    correct = logits.argmax(1) == y
    top_wrong = logits.scatter(1, y[:, None], -float("inf")).argmax(1)
    c = w[top_wrong] - w[y]  # exact best move toward that class, clipped to [0, 1]
    gain = ((flat + eps * c.sign()).clamp(0, 1) * c).sum(1) + b[top_wrong] - b[y]
    exact = exact_linf_robust(model, x, y, eps)
    assert exact.sum() < (correct & (gain <= 0)).sum()
    for restarts, robust in ((1, correct & (gain <= 0)), (3, exact)):
        x_adv = MultiTargeted(model, "linf", eps, steps=10, restarts=restarts).perturb(x, y)
        with torch.no_grad():
            assert torch.equal(model(x_adv).argmax(1) == y, robust)
        assert (x_adv - x).abs().max() <= eps + 1e-6
    # a budget that fools everything, the whole batch or a single point: stops once all are
    mt = MultiTargeted(model, "linf", 0.5, steps=5, restarts=3)
    for xs, ys in ((x, y), (x[6:7], y[6:7])):
        with torch.no_grad():
            assert (model(mt.perturb(xs, ys)).argmax(1) != ys).all()


def test_l2_attacks_agree_with_torchattacks_and_the_closed_form_on_a_linear_model():
    """An independent check of the l2 attacks: the project's PGD, AutoPGD and MultiTargeted and
    torchattacks' PGDL2, APGD (norm L2) and APGD-T (norm L2), on one linear classifier whose l2
    robustness is known exactly (`l2_distance_to_boundary`): each stays in the ball and [0, 1]
    and fools exactly the points closer than eps to a boundary; on the points none can fool,
    the project's PGD and AutoPGD raise the cross-entropy as far as torchattacks' PGDL2."""
    import torchattacks
    from torch.nn import functional as F

    from byorl.training.evaluate import library_attack
    from tests.training.conftest import interior_linear, l2_distance_to_boundary

    torch.set_num_threads(1)
    model, x, y = interior_linear(n=48, size=8, seed=1)
    eps, steps = 0.1, 20  # boundary distances nearest to eps: 0.079 and 0.116
    assert x.min() >= eps and x.max() <= 1 - eps  # the box cannot bind
    robust = l2_distance_to_boundary(model, x, y) > eps
    assert 0 < robust.sum() < (model(x).argmax(1) == y).sum()

    def ce(x_adv, y):
        return F.cross_entropy(model(x_adv), y, reduction="none")

    torch.manual_seed(0)
    found = {
        "pgd": PGD(ce, "l2", eps, steps).perturb(x, y),
        "apgd": APGD(ce, "l2", eps, steps).perturb(x, y),
        "multitargeted": MultiTargeted(model, "l2", eps, steps, restarts=3).perturb(x, y),
        "apgd (torchattacks)": library_attack(torchattacks.APGD, steps=steps, n_restarts=1,
                                              loss="ce")(model, x, y, "l2", eps),
        "apgd-t (torchattacks)": library_attack(torchattacks.APGDT, steps=steps, n_restarts=1,
                                                n_classes=4)(model, x, y, "l2", eps),
    }
    with torch.random.fork_rng():
        found["pgdl2 (torchattacks)"] = torchattacks.PGDL2(
            model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)(x, y)
    for name, x_adv in found.items():
        assert (norms(x_adv - x)["l2"] <= eps * (1 + 1e-5)).all(), name
        assert x_adv.min() >= 0 and x_adv.max() <= 1, name
        with torch.no_grad():
            assert torch.equal(model(x_adv).argmax(1) == y, robust), name
    with torch.no_grad():
        reached = {k: ce(found[k], y)[robust].mean().item()
                   for k in ("pgd", "apgd", "pgdl2 (torchattacks)")}
    assert reached["apgd"] >= reached["pgdl2 (torchattacks)"] * (1 - 1e-3), reached
    assert reached["pgd"] == pytest.approx(reached["pgdl2 (torchattacks)"], rel=1e-2), reached
