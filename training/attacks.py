"""Pixel-space attacks: PGD, AutoPGD (Croce & Hein 2020, Algorithm 1) and MultiTargeted (Gowal
et al. 2019, the evaluation suite's targeted margin attack).

An attack holds its budget and a function, never the model: `loss_fn(x_adv, y)` returns one
loss per example that the attack *maximises*, MultiTargeted's `logits_fn(x)` the logits (the
caller closes over whatever network it needs).
`perturb(x, y)` returns x_adv with ||x_adv - x|| <= eps and pixels in [0, 1].
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from byorl.training.config import NORMS

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ThreatModel:
    """The set S of allowed perturbations: an l_p ball of radius eps around the image."""

    norm: str = "linf"
    eps: float = 8 / 255

    def __post_init__(self):
        check_budget(self.norm, self.eps)


def check_budget(norm: str, eps: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


def _l2_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-example l2 norm, shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """Project onto the eps-ball around x, then onto [0, 1] (clipping only shrinks the norm)."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _l2_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def normalized_step(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest-ascent direction for the norm: sign for linf, unit l2 direction for l2."""
    if norm == "linf":
        return grad.sign()
    return grad / _l2_norm(grad).clamp_min(1e-12)


def random_start(x: torch.Tensor, norm: str, eps: float) -> torch.Tensor:
    """A random point of the eps-ball around x (uniform for linf, uniform radius for l2)."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        d = torch.randn_like(x)
        r = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = d / _l2_norm(d).clamp_min(1e-12) * eps * r
    return project(x + delta, x, norm, eps)


def _loss_and_grad(loss_fn: LossFn, x_adv: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor]:
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x_adv, y)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach().float(), grad.detach()


class PGD:
    """Projected gradient ascent with a random start and K fixed-size steps (Madry et al.)."""

    def __init__(
        self,
        loss_fn: LossFn,
        norm: str = "linf",
        eps: float = 8 / 255,
        steps: int = 10,
        step_size: float | None = None,
        random_init: bool = True,
    ):
        check_budget(norm, eps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.loss_fn, self.norm, self.eps, self.steps = loss_fn, norm, eps, steps
        self.step_size = step_size if step_size is not None else 2.5 * eps / steps
        self.random_init = random_init

    def perturb(self, x: torch.Tensor, y) -> torch.Tensor:
        x = x.detach()
        x_adv = random_start(x, self.norm, self.eps) if self.random_init else x.clone()
        for _ in range(self.steps):
            _, grad = _loss_and_grad(self.loss_fn, x_adv, y)
            x_adv = project(
                x_adv + self.step_size * normalized_step(grad, self.norm), x, self.norm, self.eps
            )
        return x_adv.detach()


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations where AutoPGD may halve its step (p0=0, p1=0.22,
    p_j+1 = p_j + max(p_j - p_j-1 - 0.03, 0.06))."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 6)) for q in p if q <= 1})


class APGD:
    """AutoPGD: momentum 0.75, per-example step size halved at checkpoints when progress stalls.

    Returns, per example, the point of highest loss seen over all iterations and restarts.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        norm: str = "linf",
        eps: float = 8 / 255,
        steps: int = 40,
        restarts: int = 1,
        random_init: bool = True,
        rho: float = 0.75,
        any_rank: Callable[[torch.Tensor], bool] | None = None,
    ):
        check_budget(norm, eps)
        if steps < 1 or restarts < 1:
            raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
        self.loss_fn, self.norm, self.eps = loss_fn, norm, eps
        self.steps, self.restarts, self.random_init, self.rho = steps, restarts, random_init, rho
        # Whether any example needs the extra pass: under DDP with cross-replica BatchNorm every
        # process must make it (a collective), so the caller can make this a global decision.
        self.any_rank = any_rank or (lambda flags: bool(flags.any()))

    def perturb(self, x: torch.Tensor, y) -> torch.Tensor:
        x = x.detach()
        best_x, best_loss = x.clone(), torch.full((x.shape[0],), -math.inf, device=x.device)
        for _ in range(self.restarts):
            x_adv, loss = self._run(x, y)
            better = loss > best_loss
            best_x[better], best_loss[better] = x_adv[better], loss[better]
        return best_x

    def _run(self, x: torch.Tensor, y) -> tuple[torch.Tensor, torch.Tensor]:
        norm, eps, n = self.norm, self.eps, x.shape[0]
        view = (n, *([1] * (x.dim() - 1)))
        checkpoints = set(apgd_checkpoints(self.steps)[1:])
        x_k = random_start(x, norm, eps) if self.random_init else x.clone()
        loss_k, grad = _loss_and_grad(self.loss_fn, x_k, y)
        x_max, f_max = x_k.clone(), loss_k.clone()
        eta = torch.full(view, 2.0 * eps, device=x.device, dtype=x.dtype)
        x_prev, increases = x_k.clone(), torch.zeros(n, device=x.device)
        last_ck, f_max_at_ck = 0, f_max.clone()
        eta_reduced_at_ck = torch.ones(n, dtype=torch.bool, device=x.device)
        for k in range(self.steps):
            z = project(x_k + eta * normalized_step(grad, norm), x, norm, eps)
            alpha = 1.0 if k == 0 else 0.75
            x_next = project(x_k + alpha * (z - x_k) + (1 - alpha) * (x_k - x_prev), x, norm, eps)
            loss_next, grad_next = _loss_and_grad(self.loss_fn, x_next, y)
            increases += (loss_next > loss_k).float()
            improved = loss_next > f_max
            x_max[improved], f_max[improved] = x_next[improved], loss_next[improved]
            x_prev, x_k, loss_k, grad = x_k, x_next, loss_next, grad_next
            if k + 1 in checkpoints:
                stalled = increases < self.rho * (k + 1 - last_ck)
                stuck = ~eta_reduced_at_ck & (f_max_at_ck >= f_max)
                halve = stalled | stuck
                eta[halve] /= 2.0
                x_k[halve] = x_max[halve]
                if self.any_rank(halve):  # restart from the best point: its loss and gradient
                    loss_k, grad = _loss_and_grad(self.loss_fn, x_k, y)
                eta_reduced_at_ck, f_max_at_ck = halve, f_max.clone()
                increases.zero_()
                last_ck = k + 1
        return x_max, f_max


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """max_{j != y} z_j - z_y: positive exactly when the example is misclassified."""
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return other - logits.gather(1, y[:, None]).squeeze(1)


class MultiTargeted:
    """MultiTargeted (Gowal et al. 2019): restart r maximises z_t - z_y for one wrong class t.

    Targets are the wrong classes ranked by their clean logit, cycled over the restarts (20
    restarts over 9 CIFAR-10 targets visit the top two three times). Each restart optimises
    with AutoPGD and only attacks points that no earlier restart fooled. `logits_fn(x)` gives
    the (N, classes) logits (a classifier module, or a closure over one).
    """

    def __init__(self, logits_fn: Callable[[torch.Tensor], torch.Tensor], norm: str,
                 eps: float, steps: int, restarts: int):
        check_budget(norm, eps)
        self.logits_fn, self.norm, self.eps = logits_fn, norm, eps
        self.steps, self.restarts = steps, restarts

    def _targeted_margin(self, x_adv: torch.Tensor, yt: torch.Tensor) -> torch.Tensor:
        z = self.logits_fn(x_adv)
        return (z.gather(1, yt[:, 1:]) - z.gather(1, yt[:, :1])).squeeze(1)

    def perturb(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, x_adv = x.detach(), x.detach().clone()
        with torch.no_grad():
            logits = self.logits_fn(x)
        fooled = logits.argmax(1) != y
        targets = logits.scatter(1, y[:, None], -math.inf).argsort(1, descending=True)
        targets = targets[:, : logits.shape[1] - 1]
        for r in range(self.restarts):
            todo = (~fooled).nonzero().squeeze(1)
            if len(todo) == 0:
                break
            t = targets[todo, r % targets.shape[1]]
            attack = APGD(self._targeted_margin, self.norm, self.eps, self.steps)
            found = attack.perturb(x[todo], torch.stack([y[todo], t], 1))
            with torch.no_grad():
                hit = self.logits_fn(found).argmax(1) != y[todo]
            x_adv[todo[hit]], fooled[todo[hit]] = found[hit], True
        return x_adv
