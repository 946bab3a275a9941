"""BYOL's networks and loss, and the BYORL attack on the online view (eq. 4-7 of the paper)."""

import copy

import torch
from torch import nn
from torch.nn import functional as F

from training.attacks import APGD, PGD
from training.models import MLP, create_model


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
        return self.projector(self.encoder.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """kappa = q o g o e: the online prediction."""
        return self.predictor(self.project(x))


def make_target(online: OnlineNetwork) -> OnlineNetwork:
    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """xi <- tau xi + (1 - tau) theta, on weights only: the target runs on batch statistics
    during training, so its BatchNorm running averages are never used."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), 1 - tau)


def make_attack(method: str, loss_fn, norm: str, eps: float, steps: int, step_size=None):
    """The inner optimisation of eq. 6: AutoPGD (the paper's default) or fixed-step PGD."""
    if method == "apgd":
        return APGD(loss_fn, norm, eps, steps)
    if method == "pgd":
        return PGD(loss_fn, norm, eps, steps, step_size)
    raise ValueError(f"attack method must be 'apgd' or 'pgd', got {method!r}")
