"""BYOL's networks (the encoder and its projector and predictor heads) and loss, and the BYORL
attack on the online view (eq. 4-7 of the paper)."""

import copy
import functools
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from byorl.training.attacks import APGD, PGD
from byorl.training.batchnorm import frozen_bn_stats
from byorl.training.models import create_model


class MLP(nn.Sequential):
    """BYOL projector/predictor: Linear -> BatchNorm -> ReLU -> Linear."""

    def __init__(self, dim_in: int, hidden: int = 4096, dim_out: int = 256):
        super().__init__(
            nn.Linear(dim_in, hidden),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, dim_out),
        )


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Per-example 2 - 2 cos(p, z) (eq. 4); z is a target and gets no gradient."""
    return 2 - 2 * F.cosine_similarity(p.float(), z.detach().float(), dim=-1)


class OnlineNetwork(nn.Module):
    """Encoder e, projector g and predictor q. The target network is a copy without q's use."""

    def __init__(self, arch: str, width: int = 1, proj_hidden: int = 4096, proj_dim: int = 256):
        super().__init__()
        self.encoder = create_model(arch, width=width)
        self.projector = MLP(self.encoder.num_features, proj_hidden, proj_dim)
        self.predictor = MLP(proj_dim, proj_hidden, proj_dim)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """gamma = g o e: the projection (what the target network outputs)."""
        return self.projector(self.encoder(x))  # the encoder's forward: its features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """kappa = q o g o e: the online prediction."""
        return self.predictor(self.project(x))


def make_target(online: OnlineNetwork) -> OnlineNetwork:
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta, on weights only: the target runs on batch statistics
    during training, so its BatchNorm running averages are never used."""
    targets, onlines = list(target.parameters()), list(online.parameters())
    if len(targets) != len(onlines):
        raise ValueError(f"target has {len(targets)} parameters, online {len(onlines)}")
    with torch.no_grad():  # one fused kernel per device and dtype (timm ModelEmaV3)
        torch._foreach_lerp_(targets, [o.detach() for o in onlines], 1 - tau)


class StepLoss(NamedTuple):
    loss: torch.Tensor  # the symmetrised loss, a scalar
    p: torch.Tensor  # online predictions of the attacked views, [v + d; v' + d']
    z: torch.Tensor  # the target projection each prediction is paired with, [z'; z]
    views: torch.Tensor  # the clean views, [v; v']


def per_view(fn, v1: torch.Tensor, v2: torch.Tensor, separate: bool) -> torch.Tensor:
    """[fn(v); fn(v')]: each view a batch of its own (its own BatchNorm statistics, as the
    published BYOL), or both in one batch (`separate=False`: statistics of the two mixed)."""
    if separate:
        return torch.cat([fn(v1), fn(v2)])
    return fn(torch.cat([v1, v2]))


def symmetric_loss(
    online: nn.Module, target: OnlineNetwork, v1: torch.Tensor, v2: torch.Tensor, attack=None,
    bf16: bool = False, separate: bool = True,
) -> StepLoss:
    """L(v, v') + L(v', v) of eq. 7, each averaged over the batch: every view, attacked through
    the online network (batch statistics, running averages left alone), is predicted against
    the target projection of the *other* view. `attack.perturb(views, z)` maximises the loss.
    Every pass (target, attack, loss) sees the views as `per_view` does."""
    if v1.shape != v2.shape:
        raise ValueError(f"the two views must have one shape, got {v1.shape} and {v2.shape}")
    b = len(v1)
    autocast = functools.partial(torch.autocast, v1.device.type, torch.bfloat16, enabled=bf16)
    with torch.no_grad(), autocast():
        z = per_view(target.project, v1, v2, separate).float()
    z = torch.cat([z[b:], z[:b]])
    v_adv = torch.cat([v1, v2])
    if attack is not None:
        with frozen_bn_stats(online):
            if separate:
                v_adv = torch.cat([attack.perturb(v1, z[:b]), attack.perturb(v2, z[b:])])
            else:
                v_adv = attack.perturb(v_adv, z)
    with autocast():
        p = per_view(online, v_adv[:b], v_adv[b:], separate)
    return StepLoss(2 * byol_loss(p, z).mean(), p, z, torch.cat([v1, v2]))


def make_attack(method: str, loss_fn, norm: str, eps: float, steps: int, step_size=None,
                any_rank=None):
    """The inner optimisation of eq. 6: AutoPGD (the paper's default) or fixed-step PGD.
    `any_rank` (AutoPGD) makes its data-dependent extra pass a decision of all processes."""
    if method == "apgd":
        return APGD(loss_fn, norm, eps, steps, any_rank=any_rank)
    if method == "pgd":
        return PGD(loss_fn, norm, eps, steps, step_size)
    raise ValueError(f"attack method must be 'apgd' or 'pgd', got {method!r}")
