"""Encoders (pre-activation ResNets) behind a tiny timm-like registry (the BYOL MLP heads are in
byorl.py).

Every encoder takes pixels in [0, 1] and normalises inside, so attacks work in pixel space.
`forward_features(x)` returns the pooled representation h used downstream.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2471, 0.2435, 0.2616)


class PreActBlock(nn.Module):
    """He et al. (2016) pre-activation basic block: BN-ReLU-conv, BN-ReLU-conv, plus shortcut."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """CIFAR-style pre-activation ResNet: 3x3 stride-1 stem, no max-pool, global average pool."""

    def __init__(
        self,
        blocks: tuple[int, ...],
        widths: tuple[int, ...],
        mean: tuple[float, ...] = CIFAR_MEAN,
        std: tuple[float, ...] = CIFAR_STD,
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.stem = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(PreActBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.num_features = cin

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.layers(self.stem(x))
        x = F.relu(self.bn(x))
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _resnet(blocks: tuple[int, ...], base: int) -> Callable[..., PreActResNet]:
    def make(width: int = 1, **kw) -> PreActResNet:
        return PreActResNet(blocks, tuple(base * width * 2**i for i in range(4)), **kw)

    return make


_REGISTRY: dict[str, Callable[..., PreActResNet]] = {
    # One block per stage: the fast CPU network (widths 32-256) and a tiny one for smoke tests.
    "preact_resnet_tiny": _resnet((1, 1, 1, 1), 8),
    "preact_resnet_small": _resnet((1, 1, 1, 1), 32),
    "preact_resnet18": _resnet((2, 2, 2, 2), 64),
    "preact_resnet34": _resnet((3, 4, 6, 3), 64),
}


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, width: int = 1, **kw) -> PreActResNet:
    """Build an encoder by name; `width` is the paper's width multiplier (x1, x2, x4)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; choose one of {list_models()}")
    if width < 1:
        raise ValueError(f"width multiplier must be >= 1, got {width}")
    return _REGISTRY[name](width=width, **kw)
