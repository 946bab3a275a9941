"""LARS and the schedules of the outer optimisation: warm-up + cosine learning rate, EMA tau."""

import math

import torch
from torch import nn


def get_lr(step: int, total_steps: int, warmup_steps: int, base_lr: float) -> float:
    """Linear warm-up from 0 to base_lr, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def get_tau(step: int, total_steps: int, tau_base: float = 0.996) -> float:
    """BYOL's target decay 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2, per optimizer step k."""
    return 1 - (1 - tau_base) * (math.cos(math.pi * min(step, total_steps) / total_steps) + 1) / 2


def lars_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Biases and BatchNorm parameters (1-d) get neither weight decay nor trust-ratio adaptation."""
    regular, excluded = [], []
    for p in model.parameters():
        if p.requires_grad:
            (excluded if p.ndim <= 1 else regular).append(p)
    return [
        {"params": regular, "weight_decay": weight_decay, "lars": True},
        {"params": excluded, "weight_decay": 0.0, "lars": False},
    ]


class LARS(torch.optim.Optimizer):
    """LARS (You et al. 2017) as in BYOL: decay, then scale by eta*||w||/||g||, then momentum."""

    def __init__(
        self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 1e-3
    ):
        super().__init__(
            params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True)
        )

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        with torch.no_grad():
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        self._update(p, p.grad, group)
        return loss

    def _update(self, p: torch.Tensor, d: torch.Tensor, group: dict) -> None:
        if group["weight_decay"]:
            d = d.add(p, alpha=group["weight_decay"])
        if group["lars"]:
            w_norm, d_norm = p.norm(), d.norm()
            trust = torch.where(
                (w_norm > 0) & (d_norm > 0),
                group["eta"] * w_norm / d_norm,
                torch.ones_like(w_norm),
            )
            d = d * trust
        state = self.state[p]
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(p)
        buf.mul_(group["momentum"]).add_(d)
        p.add_(buf, alpha=-group["lr"])
